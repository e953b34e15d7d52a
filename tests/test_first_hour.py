"""A newcomer's first hour: mistakes caught before any weights load, trial runs that stay short,
a CLI that says what it can do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lit_rlhf.models import ModelConfig, load_model, load_tokenizer
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An RM run folder as the RM stage leaves it, an SFT model, and an RM export without statistics."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = load_tokenizer("demo")
    export = root / "rm" / "lightning_logs" / "version_0" / "export"
    rm = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), tokenizer, task="seq_cls")
    rm.save_pretrained(export)
    tokenizer.save_pretrained(export)
    (export / "lit_rlhf.json").write_text(json.dumps({"reward_mean": 0.5, "reward_std": 2.0}))
    (root / "rm" / "lightning_logs" / "version_0" / "config.yaml").write_text("model: {}\n")
    sft = root / "sft-model"
    load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), tokenizer).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    no_stats = root / "rm-no-stats"
    rm.save_pretrained(no_stats)
    tokenizer.save_pretrained(no_stats)
    (no_stats / "lit_rlhf.json").write_text(json.dumps({"reward_mean": None, "reward_std": None}))
    return root


def test_reward_model_references_are_checked_at_construction(runs):
    from lit_rlhf.rewards import RewardModelReward

    key = "model.init_args.reward.init_args.path"
    cases = [
        ("runs/rm/lightning_logs/version_9/export", FileNotFoundError, f"{key}: no such directory"),
        (str(runs / "rm"), ValueError, f"{key}: {runs / 'rm'} is a training run's folder, not a reward model; "
                                       f"give {runs / 'rm' / 'lightning_logs' / 'version_0' / 'export'}"),
        (str(runs / "rm" / "lightning_logs" / "version_0"), ValueError, "give " + str(runs / "rm" / "lightning_logs"
                                                                               / "version_0" / "export")),
        (str(runs / "sft-model"), ValueError, f"{key}: {runs / 'sft-model'} is a LlamaForCausalLM, not a reward model"),
        (str(runs / "rm-no-stats"), ValueError, "normalize: .*has no reward mean/std"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=re.escape(message) if ".*" not in message else message):
            RewardModelReward(path)
    reward = RewardModelReward(str(runs / "rm" / "lightning_logs" / "version_0" / "export"))  # the right one
    scores = reward(["a film"], [" that was fine"])
    assert scores.shape == (1,) and reward.mean == 0.5 and reward.std == 2.0
    RewardModelReward(str(runs / "rm-no-stats"), normalize=False)  # raw scores, asked for


def test_model_references_never_fall_through_to_the_hub(runs, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model.init_args.lm.name_or_path: no such directory 'my/runs/sft'"):
        ModelConfig(name_or_path="my/runs/sft")  # two slashes: a path, never a hub id
    with pytest.raises(ValueError, match=r"is a training run's folder, not a model; give .*version_0/export"):
        ModelConfig(name_or_path=str(runs / "rm" / "lightning_logs"))
    (runs / "empty-run" / "lightning_logs").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"give .*empty-run/lightning_logs/version_N/model/ or adapter/ or export/ "
                                         r"of a finished run \(none is there yet\)"):
        ModelConfig(name_or_path=str(runs / "empty-run"))
    ModelConfig(name_or_path="org/name")  # a hub id: left to the loader
    monkeypatch.chdir(runs)
    with pytest.raises(FileNotFoundError, match="model.init_args.lm.name_or_path: no such directory 'rm/nope'"):
        ModelConfig(name_or_path="rm/nope")  # one slash, but rm/ is a folder here: a path


def test_too_few_prompts_for_one_global_batch_fail_at_setup(tmp_path, tokenizer):
    from lit_rlhf.data import PromptDataModule

    rows = tmp_path / "prompts.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Review {i}:"}) for i in range(10)))
    data = PromptDataModule(str(rows), batch_size=8, val_size=4, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"6 prompts \(after filtering\) are fewer than one global batch of 8 "
                                         r"\(data.batch_size=8 x 1 device\(s\)\)"):
        data.setup("fit")


def test_trial_runs_adapt_validation_and_logging_intervals():
    from jsonargparse import Namespace

    from lit_rlhf.cli.lightning import fit_short_run

    trainer = Namespace(limit_train_batches=2, val_check_interval=50, max_epochs=1, max_steps=-1, log_every_n_steps=10)
    notes = fit_short_run(trainer)
    assert trainer.val_check_interval == 2 and trainer.log_every_n_steps == 2
    assert notes[0] == ("trainer.val_check_interval=50 is beyond trainer.limit_train_batches=2: validating after "
                        "batch 2")
    trainer = Namespace(limit_train_batches=1.0, val_check_interval=25, max_epochs=None, max_steps=5,
                        log_every_n_steps=10)
    assert fit_short_run(trainer) == ["trainer.val_check_interval=25 is beyond trainer.max_steps=5: validating after "
                                      "step 5",
                                      "trainer.log_every_n_steps=10 is beyond the run's 5 steps: logging every 5"]
    assert trainer.val_check_interval == 5 and trainer.log_every_n_steps == 5
    long = Namespace(limit_train_batches=200, val_check_interval=20, max_epochs=1, max_steps=-1, log_every_n_steps=1)
    assert fit_short_run(long) == [] and long.val_check_interval == 20


@pytest.mark.parametrize("arg, hint", [
    ("--trainer.max_step=7", "--trainer.max_steps"),
    ("--model.init_args.lm.dtyp=float32", "--model.init_args.lm.dtype"),
    ("--model.init_args.lm.lora.rr=3", "--model.init_args.lm.lora.r"),
    ("--data.init_args.seq_lenght=64", "--data.init_args.seq_length"),
])
def test_unknown_keys_are_errors_with_the_nearest_valid_key(cli, arg, hint):
    out = cli.run(["fit", "-c", "configs/sft/demo.yaml", arg, "--trainer.max_steps=1"])
    assert out.code == 2, out.stderr[-2000:]
    assert out.error_lines[-1] == f"error: unrecognized arguments: {arg} (did you mean {hint}?)"


def test_short_class_names_and_the_command_list(capsys):
    from lit_rlhf.cli import main, short_class_names
    from lit_rlhf.recipes import compose

    assert short_class_names(["fit", "--model.help", "SFTModule", "--model=PPOModule", "--data.init_args.path=demo",
                              "--model.init_args.reward=lit_rlhf.rewards.JudgeReward"]) == [
        "fit", "--model.help", "lit_rlhf.modules.SFTModule", "--model=lit_rlhf.modules.PPOModule",
        "--data.init_args.path=demo", "--model.init_args.reward=lit_rlhf.demo.JudgeReward"]  # a moved class
    composed = compose([str(ROOT / "configs/ppo/demo.yaml")])
    overlay = {"model": {"class_path": "PPOModule", "init_args": {"reward": {"class_path": "ExactAnswerReward"},
                                                                  "judge": {"class_path": "lit_rlhf.rewards.JudgeReward"}}}}
    from lit_rlhf.recipes import full_class_paths, merge_configs

    merged = merge_configs(composed, full_class_paths(overlay))
    assert merged["model"]["class_path"] == "lit_rlhf.modules.PPOModule"
    assert "lm" in merged["model"]["init_args"]  # the same class: merged, not replaced
    assert merged["model"]["init_args"]["reward"]["class_path"] == "lit_rlhf.rewards.ExactAnswerReward"
    assert merged["model"]["init_args"]["judge"]["class_path"] == "lit_rlhf.demo.JudgeReward"  # its old path
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "pipeline", "estimate", "export"):
        assert re.search(rf"^  {command} +\S", out, re.M), command
    assert re.findall(r"^  (\w+) ", out, re.M) == ["fit", "validate", "pipeline", "estimate", "export"]


def test_every_key_an_error_message_names_exists():
    import dataclasses
    import inspect

    from lit_rlhf.models import LoraSettings
    from lit_rlhf.modules import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule

    text = "\n".join(p.read_text() for p in (ROOT / "lit_rlhf").rglob("*.py"))
    lm_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for field in set(re.findall(r"model\.init_args\.lm\.(\w+)", text)):
        assert field in lm_fields, field
    for field in set(re.findall(r"model\.init_args\.lm\.lora\.(\w+)", text)) - {"{key}"}:
        assert field in {f.name for f in dataclasses.fields(LoraSettings)}, field
    module_args = {p for cls in (SFTModule, RewardModule, DPOModule, PPOModule, GRPOModule)
                   for p in inspect.signature(cls.__init__).parameters}
    for arg in set(re.findall(r"[\"'`(]model\.init_args\.(\w+)", text)) - {"lm"}:
        assert arg in module_args, arg
    assert not re.search(r"[\"'`]model\.(chat_template|quantization|tokenizer|lora|arch|attn_implementation)\b", text)


def test_grpo_logs_each_reward_function_and_steps_the_schedule_with_the_optimizer(tmp_path):
    import lightning as L

    from lit_rlhf.models import LoraSettings
    from lit_rlhf.modules import GRPOModule
    from lit_rlhf.modules.grpo import GRPOConfig
    from lit_rlhf.modules.online import SamplingConfig
    from lit_rlhf.optim import OptimConfig
    from tests.modules.ppo_helpers import LetterReward, make_data

    def fit(reward, **grpo):
        module = GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
                            reward, optim=OptimConfig(lr=1e-3, warmup_steps=2), rollout_batch_size=4,
                            grpo=GRPOConfig(num_generations=4, **grpo),
                            sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4))
        trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu",
                            default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False,
                            log_every_n_steps=1)
        with pytest.warns() as caught:
            trainer.fit(module, make_data(module, 4))
        return module, trainer, caught

    module, trainer, _ = fit(LetterReward())
    assert "rewards/letter" in trainer.callback_metrics  # a reward function that reports nothing itself
    assert module.lr_schedulers().last_epoch == trainer.global_step == 2

    def constant(prompts, responses):
        return torch.zeros(len(responses))

    # Every group's rewards are equal: no update, so no optimizer step, so no schedule step.
    module, trainer, caught = fit(constant, skip_zero_std_groups=True)
    assert trainer.global_step == 0 and module.lr_schedulers().last_epoch == 0
    assert "rewards/constant" in trainer.callback_metrics
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_a_trial_run_prints_no_dependency_noise_and_a_readable_progress_bar(cli, tmp_path):
    out = cli.run(["fit", "-c", "configs/sft/demo.yaml", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                   f"--trainer.default_root_dir={tmp_path}"])
    assert out.code == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for noise in ("is deprecated", "litlogger", "IterableDataset", "No seed found"):
        assert noise not in text, noise
    assert "v_num" not in text and "Epoch 0/-2" not in text
    assert "[lit_rlhf] trainer.log_every_n_steps=10 is beyond the run's 2 steps: logging every 2" in out.stderr
    events = list((tmp_path / "lightning_logs").rglob("events.out.tfevents.*"))
    assert events, "a 2-step run logs its scalars"
