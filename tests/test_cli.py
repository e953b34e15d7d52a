"""Every YAML under configs/ parses through the real CLI; bad input ends in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.cli import main, parser_error_cause

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "base.yaml")


def test_there_are_recipes():
    assert {p.parent.name for p in RECIPES} >= {"sft", "rm", "ppo"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} should start with a comment giving its launch command"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(path), "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].startswith("lit_rlhf.modules.")
    assert config["data"]["class_path"].startswith("lit_rlhf.data.")
    lm = config["model"]["init_args"]["lm"]
    assert (lm["name_or_path"] is None) != (lm["arch"] is None)
    assert lm["trust_remote_code"] is False


def test_classic_recipe_values():
    neox = ROOT / "configs/sft/gpt-neox-20b-imdb.yaml"
    lora = yaml.safe_load(neox.read_text())["model"]["init_args"]["lm"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (16, 32, 0.05)
    llama = yaml.safe_load((ROOT / "configs/sft/llama-7b-stack-exchange.yaml").read_text())
    assert llama["data"]["init_args"]["seq_length"] == 1024
    assert llama["model"]["init_args"]["lm"]["quantization"] == "8bit"


# Bad input through the real command lines: tests/test_bad_input.py.


@pytest.mark.parametrize("message, cause", [
    ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
     "    - Problem with given class_path 'x.Y':\n        Parser key \"lm.dtype\":\n"
     "          Expected a str. Got value: 3\n    - Expected a <class 'NoneType'>\n  Given value: Namespace(a=1)",
     "model.init_args.lm.dtype: Expected a str. Got value: 3"),
    ("Does not validate against any of the Union subtypes\nSubtypes: [A, B]\nErrors:\n  - data.x must be > 0\n"
     "  - Expected a <class 'NoneType'>\nGiven value type: T\nGiven value: Namespace()", "data.x must be > 0"),
    ("data file not found: /x.jsonl", "data file not found: /x.jsonl"),
])
def test_parser_error_cause_keeps_the_field_and_the_reason(message, cause):
    assert parser_error_cause(message) == cause


def _printed(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_null_works_for_any_optional_field_on_the_command_line(capsys):
    config = _printed(capsys, "-c", str(ROOT / "configs/sft/demo.yaml"), "--model.init_args.lm.lora=null",
                      "--model.init_args.lm.arch", "null", "--model.init_args.lm.name_or_path=some/model")
    lm = config["model"]["init_args"]["lm"]
    assert lm["lora"] is None and lm["arch"] is None and lm["name_or_path"] == "some/model"


def test_an_overlays_list_replaces_the_bases_list(tmp_path, capsys):
    # configs/sft/base.yaml has a val/loss-monitoring ModelCheckpoint at position 2 of its list.
    overlay = tmp_path / "steps.yaml"
    overlay.write_text(f"config: {ROOT / 'configs/sft/demo.yaml'}\ntrainer:\n  callbacks:\n"
                       "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                       "      init_args:\n        every_n_train_steps: 5\n")
    callbacks = _printed(capsys, "-c", str(overlay))["trainer"]["callbacks"]
    assert len(callbacks) == 1
    assert callbacks[0]["init_args"]["every_n_train_steps"] == 5
    assert callbacks[0]["init_args"]["monitor"] is None  # not inherited from the base's callback


def test_composition_rule():
    from lit_rlhf.recipes import merge_configs

    base = {"a": {"x": 1, "y": [1, 2]}, "m": {"class_path": "A", "init_args": {"p": 1}}, "k": 1}
    over = {"a": {"y": [3]}, "m": {"class_path": "B", "init_args": {"q": 2}}, "k": None}
    assert merge_configs(base, over) == {"a": {"x": 1, "y": [3]}, "m": {"class_path": "B", "init_args": {"q": 2}},
                                         "k": None}
    same = {"m": {"class_path": "A", "init_args": {"q": 2}}}
    assert merge_configs(base, same)["m"] == {"class_path": "A", "init_args": {"p": 1, "q": 2}}
    assert merge_configs(base, {"m": {"init_args": {"q": 2}}})["m"]["init_args"] == {"p": 1, "q": 2}


def test_weighted_rule_rewards_compose_in_a_config(tmp_path, capsys):
    # The README's example: several reward functions with weights, and the row field they need.
    overlay = tmp_path / "rewards.yaml"
    overlay.write_text(
        f"config: {ROOT / 'configs' / 'grpo' / 'arithmetic.yaml'}\n"
        "model:\n  init_args:\n    reward:\n      class_path: lit_rlhf.rewards.WeightedRewards\n      init_args:\n"
        "        functions:\n          - class_path: lit_rlhf.rewards.ExactAnswerReward\n"
        "          - class_path: lit_rlhf.rewards.RegexFormatReward\n            init_args: {pattern: '\\d+'}\n"
        "        weights: [1.0, 0.1]\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(overlay), "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    reward = config["model"]["init_args"]["reward"]
    assert reward["class_path"] == "lit_rlhf.rewards.WeightedRewards"
    assert [f["class_path"] for f in reward["init_args"]["functions"]] == [
        "lit_rlhf.rewards.ExactAnswerReward", "lit_rlhf.rewards.RegexFormatReward"]
    assert reward["init_args"]["weights"] == [1.0, 0.1]
    assert config["data"]["init_args"]["fields"] == ["answer"]


def _tiny_sft_run(tmp_path) -> list[str]:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"text": "review {i}: a fine film, and a long one."}}\n' for i in range(24)))
    return ["fit", "-c", "sft/demo.yaml", "--model.init_args.lm.arch=demo-tiny", f"--data.init_args.path={rows}",
            "--data.init_args.val_size=4", "--data.init_args.batch_size=2", "--data.init_args.seq_length=32",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"]


def _raise(err: Exception):
    def hook(self, *args, **kwargs):
        raise err
    return hook


@pytest.mark.parametrize("hook, err, code", [
    ("setup", ValueError("data.init_args.path: bad rows"), 2),  # before the run: the config's inputs
    ("training_step", NonFiniteLossError("train/loss is nan at step 1: stopping"), 1),  # a diverged run
    ("training_step", ValueError("a bug in the middle of a run"), None),  # keeps its traceback
], ids=["setup-one-line", "diverged-one-line", "training_step-traceback"])
def test_only_errors_before_the_run_starts_become_one_line(tmp_path, monkeypatch, capsys, hook, err, code):
    from lit_rlhf.modules import SFTModule

    monkeypatch.setattr(SFTModule, hook, _raise(err))
    if code is None:  # raised on: the interpreter prints the traceback
        with pytest.raises(ValueError, match="a bug in the middle of a run"):
            main(_tiny_sft_run(tmp_path))
        assert "error:" not in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as exit_:
        main(_tiny_sft_run(tmp_path))
    assert exit_.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {err}"
