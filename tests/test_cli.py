"""Every YAML under configs/ parses through the real CLI; bad input ends in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def _run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bad_input_is_one_line_before_any_model_loads(tmp_path):
    out = _run("fit", "-c", "configs/sft/demo.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--data.init_args.path=/no/such/file.jsonl")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: data file not found: /no/such/file.jsonl"
    assert "Traceback" not in out.stderr


def test_seq_length_beyond_positions_via_cli(tmp_path):
    out = _run("fit", "-c", "configs/sft/demo.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--data.init_args.seq_length=4096")
    assert out.returncode == 2
    assert "seq_length=4096 exceeds the model's 512 positions" in out.stderr


PPO_TINY = """
model:
  init_args:
    lm:
      name_or_path: null
      arch: demo-tiny
      tokenizer: demo
"""

BAD_VALUES = [
    ("sft", "--data.init_args.seq_length=0", "error: data.seq_length must be >= 2, got 0"),
    ("sft", "--data.init_args.batch_size=0", "error: data.batch_size must be >= 1, got 0"),
    ("sft", "--model.init_args.lm.lora.r=0", "error: lora.r must be >= 1, got 0"),
    ("sft", "--model.init_args.optim.lr=-1", "error: optim.lr must be > 0, got -1.0"),
    ("sft", "--model.init_args.lm.quantization=3bit",
     "error: model.init_args.lm.quantization: Expected a typing.Literal['none', '8bit', '4bit-nf4', '4bit-fp4']. "
     "Got value: 3bit"),
    ("sft", "--model.init_args.lm.dtype=float8", "error: model.init_args.lm.dtype: Expected a typing.Literal"),
    ("sft", "--model.class_path=lit_rlhf.modules.NoSuchModule", "NoSuchModule"),
    ("sft", "--trainer.max_steps=abc", "error: trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
    ("ppo", "--model.init_args.sampling.temperature=0", "error: sampling.temperature must be > 0, got 0.0"),
    ("ppo", "--model.init_args.sampling.min_new_tokens=30", "need 1 <= min_new_tokens <= max_new_tokens, got 30 > 24"),
    ("ppo", "--model.init_args.ppo.mini_batch_size=5", "ppo.mini_batch_size=5 does not divide the rollout batch size"),
    ("ppo", "--model.init_args.kl.estimator=k2", "error: model.init_args.kl.estimator: Expected a typing.Literal"),
]


@pytest.mark.parametrize("stage, override, expected", BAD_VALUES, ids=[b[1].split("=")[0].split(".")[-1] + "-" + b[0]
                                                                          for b in BAD_VALUES])
def test_a_bad_value_anywhere_in_a_config_is_one_line_naming_it(stage, override, expected, tmp_path, capsys):
    args = ["fit", "-c", str(ROOT / f"configs/{stage}/demo.yaml")]
    if stage == "ppo":  # a tiny random policy, so that no demo model is built for this
        (tmp_path / "tiny.yaml").write_text(PPO_TINY)
        args += ["-c", str(tmp_path / "tiny.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, f"--trainer.default_root_dir={tmp_path}", override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err[-2000:]
    assert "Given value" not in err and "Namespace(" not in err and "Traceback" not in err


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
