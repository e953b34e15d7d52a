"""The one-command pipeline, shrunk to seconds: outputs, resume, and re-running what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_rlhf import pipeline

ROOT = Path(__file__).resolve().parents[1]


def _overlay(path: Path, base: str, body: str) -> Path:
    path.write_text(f"# test overlay\nconfig: {ROOT / base}\n{body}")
    return path


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = _overlay(tmp_path / "sft.yaml", "configs/sft/demo.yaml",
                   "trainer:\n  max_steps: 8\n  val_check_interval: 4\n  limit_val_batches: 2\n")
    rm = _overlay(tmp_path / "rm.yaml", "configs/rm/demo.yaml",
                  "data:\n  class_path: lit_rlhf.data.PreferenceDataModule\n  init_args:\n    max_train_pairs: 128\n"
                  "trainer:\n  max_steps: 8\n  val_check_interval: 8\n  limit_val_batches: 2\n")
    ppo = _overlay(tmp_path / "ppo.yaml", "configs/ppo/demo.yaml",
                   "data:\n  class_path: lit_rlhf.data.PromptDataModule\n  init_args:\n    batch_size: 16\n"
                   "trainer:\n  limit_train_batches: 2\n  val_check_interval: 2\n  limit_val_batches: 1\n")
    dpo = _overlay(tmp_path / "dpo.yaml", "configs/dpo/demo.yaml",
                   "data:\n  class_path: lit_rlhf.data.PreferenceDataModule\n  init_args:\n    max_train_pairs: 64\n"
                   "trainer:\n  max_steps: 4\n  val_check_interval: 4\n  limit_val_batches: 1\n")
    grpo = _overlay(tmp_path / "grpo.yaml", "configs/grpo/demo.yaml",
                    "data:\n  class_path: lit_rlhf.data.PromptDataModule\n  init_args:\n    batch_size: 4\n"
                    "trainer:\n  limit_train_batches: 2\n  val_check_interval: 2\n  limit_val_batches: 1\n")
    out = tmp_path / "out"
    args = ["--output_dir", str(out), "--methods", "ppo,dpo,grpo", "--sft_config", str(sft), "--rm_config", str(rm),
            "--ppo_config", str(ppo), "--dpo_config", str(dpo), "--grpo_config", str(grpo),
            "--eval_prompts", "8", "--eval_max_new_tokens", "6", "--quiet"]
    pipeline.main(args)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"task", "methods", "eval", "sft", "rm", "ppo", "dpo", "grpo", "wall_s"}
    assert summary["task"] == "reviews" and summary["methods"] == ["ppo", "dpo", "grpo"]
    assert summary["sft"]["val_loss_end"] < summary["sft"]["val_loss_start"]
    assert 0.0 <= summary["rm"]["val_accuracy"] <= 1.0
    for name in ("sft", "ppo", "dpo", "grpo"):
        block = summary[name]
        assert -1.0 <= block["judge_score"] <= 1.0 and 0.0 <= block["distinct_2"] <= 1.0
        assert 1.0 <= block["mean_length"] <= 6.0  # at most eval_max_new_tokens
    assert summary["sft"]["kl_to_sft"] == 0.0
    assert all(summary[m]["kl_to_sft"] != 0.0 for m in ("ppo", "dpo", "grpo"))  # each moved off SFT
    # Plain transformers loads every exported model, without lit_rlhf.
    for name in ("sft", "ppo", "dpo", "grpo"):
        AutoModelForCausalLM.from_pretrained(summary[name]["model_dir"])
    AutoModelForSequenceClassification.from_pretrained(summary["rm"]["model_dir"])
    assert (out / "report.png").stat().st_size > 10_000
    samples = (out / "samples.md").read_text().splitlines()
    assert samples[2] == "| prompt | SFT | PPO | DPO | GRPO |" and len(samples) == 4 + 8
    printed = capsys.readouterr().out
    assert all(f"\n{name} " in printed for name in ("sft", "ppo", "dpo", "grpo"))

    # Run again: nothing to redo. Change the PPO overlay: only PPO runs again.
    stages = ("sft", "rm", "ppo", "dpo", "grpo")
    done = {s: json.loads((out / s / "DONE.json").read_text()) for s in stages}
    ppo.write_text(ppo.read_text().replace("limit_train_batches: 2", "limit_train_batches: 3"))
    pipeline.main(args)
    again = {s: json.loads((out / s / "DONE.json").read_text()) for s in stages}
    assert all(again[s] == done[s] for s in ("sft", "rm", "dpo", "grpo"))
    assert again["ppo"]["key"] != done["ppo"]["key"]
    assert len(list((out / "ppo" / "lightning_logs").glob("version_*"))) == 2
    assert len(list((out / "sft" / "lightning_logs").glob("version_*"))) == 1


@pytest.mark.slow
def test_pipeline_arithmetic_task(tmp_path, capsys):
    sft = _overlay(tmp_path / "sft.yaml", "configs/sft/arithmetic.yaml",
                   "trainer:\n  max_steps: 6\n  val_check_interval: 3\n  limit_val_batches: 2\n")
    grpo = _overlay(tmp_path / "grpo.yaml", "configs/grpo/arithmetic.yaml",
                    "data:\n  class_path: lit_rlhf.data.PromptDataModule\n  init_args:\n    batch_size: 8\n"
                    "model:\n  init_args:\n    grpo:\n      mini_batch_size: 32\n"
                    "trainer:\n  limit_train_batches: 2\n  val_check_interval: 2\n  limit_val_batches: 1\n")
    out = tmp_path / "out"
    pipeline.main(["--output_dir", str(out), "--task", "arithmetic", "--sft_config", str(sft),
                   "--grpo_config", str(grpo), "--eval_prompts", "16", "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"task", "methods", "eval", "sft", "grpo", "wall_s"}  # no reward model to train
    assert summary["task"] == "arithmetic" and summary["methods"] == ["grpo"]
    for name in ("sft", "grpo"):
        assert 0.0 <= summary[name]["greedy_accuracy"] <= 1.0 and 0.0 <= summary[name]["judge_score"] <= 1.0
        assert summary[name]["distinct_2"] is None
    assert "greedy acc" in capsys.readouterr().out


def test_methods_are_checked_against_the_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["--output_dir", str(tmp_path), "--task", "arithmetic", "--methods", "dpo"])
    assert exit_.value.code == 2
    assert "--methods dpo: not a method of --task arithmetic (choose from grpo)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.main(["--output_dir", str(tmp_path), "--methods", "ppo,sft"])
    assert "--methods sft: not a method of --task reviews (choose from ppo,dpo,grpo)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_stage_key_follows_configs_overrides_and_upstream(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("# b\ntrainer:\n  max_steps: 1\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# r\nconfig: base.yaml\n")
    stage = pipeline.Stage("ppo", recipe, upstream=["sft"])
    key = pipeline.stage_key(stage, {"sft": "aaa"})
    assert pipeline.stage_key(stage, {"sft": "aaa"}) == key
    assert pipeline.stage_key(stage, {"sft": "bbb"}) != key
    assert pipeline.stage_key(pipeline.Stage("ppo", recipe, ["--x=1"], ["sft"]), {"sft": "aaa"}) != key
    base.write_text("# b\ntrainer:\n  max_steps: 2\n")  # an included file changed
    assert pipeline.stage_key(stage, {"sft": "aaa"}) != key


def test_missing_stage_config_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--output_dir", str(tmp_path), "--sft_config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["--output_dir", str(tmp_path / "taken")])
    assert exit_.value.code == 2
    assert f"--output_dir {tmp_path / 'taken'}: exists and is not a directory" in capsys.readouterr().err


def test_a_failing_stage_ends_in_one_line_naming_it(tmp_path, capfd):
    # The config is fine (the up-front check passes); the data file, read when the stage
    # runs, is empty.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = _overlay(tmp_path / "bad.yaml", "configs/sft/demo.yaml", f"data:\n  init_args:\n    path: {empty}\n")
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["--output_dir", str(tmp_path / "out"), "--sft_config", str(bad), "--quiet"])
    assert exit_.value.code == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == "error: pipeline stage sft failed (exit code 2); see its output above"
    assert f"error: {empty}: the file is empty" in err  # the stage's own line, just above
    assert not any("Traceback" in line for line in err), "\n".join(err)


def test_a_bad_stage_config_is_found_before_any_stage_trains(tmp_path, capfd):
    bad = _overlay(tmp_path / "bad.yaml", "configs/rm/demo.yaml", "data:\n  init_args:\n    batch_size: 0\n")
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["--output_dir", str(tmp_path / "out"), "--rm_config", str(bad), "--quiet"])
    assert exit_.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: pipeline stage rm ({bad}): data.batch_size must be >= 1, got 0"
    assert not (tmp_path / "out" / "sft" / "lightning_logs").exists()  # SFT never started


def test_samples_table_has_one_row_per_prompt_whatever_the_text(tmp_path):
    # A barely trained model samples any byte; "\x1c" and "\u2028" are line breaks to
    # str.splitlines and to many markdown viewers.
    evals = pipeline.EvalSet(["a|b", "Return to"], None, "judge")
    results = {"sft": {"responses": [" foo\x1cbar\u2028baz\r\n", "ok"], "scores": [0.1, -0.2]},
               "ppo": {"responses": ["x\ny", "|"], "scores": [0.3, 0.4]}}
    pipeline.write_samples(tmp_path / "samples.md", evals, results)
    lines = (tmp_path / "samples.md").read_text().splitlines()
    assert lines[2:] == ["| prompt | SFT | PPO |", "|---|---|---|",
                         "| a\\|b | foo bar baz (0.10) | x y (0.30) |", "| Return to | ok (-0.20) | \\| (0.40) |"]
