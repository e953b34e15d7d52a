"""Killed with SIGKILL right after a mid-run checkpoint and resumed with ``--ckpt_path
.../last.ckpt``, every stage ends with the uninterrupted run's trainable weights and optimizer
moments, bit for bit: on one process, and PPO on two (gloo)."""

from __future__ import annotations

import json

import pytest

from tests.resume import kill_and_resume

PPO_TINY = (  # a random-init policy scored by the rule-based judge: no trained models needed
    "--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
    "--model.init_args.lm.tokenizer=demo", "--model.init_args.reward=lit_rlhf.demo.JudgeReward",
    "--model.init_args.judge=null", "--model.init_args.sampling.min_new_tokens=4",
    "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.ppo.ppo_epochs=1",
    "--model.init_args.ppo.mini_batch_size=8", "--data.init_args.batch_size=8",
)


@pytest.fixture
def sft_rows(tmp_path, demo):
    rows = demo.train_file.read_text().splitlines()[:400]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(rows) + "\n")
    assert json.loads(rows[0])["text"]
    return path


@pytest.mark.slow
def test_sft_resumes_mid_epoch_exactly(cli, tmp_path, sft_rows):
    # LoRA dropout on: the resumed run must also draw the same dropout masks (RNG restored).
    args = (f"--data.init_args.path={sft_rows}", "--data.init_args.val_size=20",
            "--model.init_args.lm.lora.dropout=0.1")
    assert kill_and_resume(cli, tmp_path, "configs/sft/demo.yaml", args=args) == 0.0


@pytest.mark.slow
def test_reward_model_resumes_mid_epoch_exactly(cli, tmp_path):
    args = ("--data.init_args.max_train_pairs=64", "--data.init_args.batch_size=8")  # 8 batches/epoch
    assert kill_and_resume(cli, tmp_path, "configs/rm/demo.yaml", args=args) == 0.0


@pytest.mark.slow
def test_ppo_resumes_exactly(cli, tmp_path):
    assert kill_and_resume(cli, tmp_path, "configs/ppo/demo.yaml", args=PPO_TINY) == 0.0


@pytest.mark.slow
def test_ppo_resumes_exactly_on_two_processes(cli, tmp_path):
    # Each rank samples with its own generator: every rank's state is in the checkpoint.
    args = (*PPO_TINY, "--trainer.devices=2", "--trainer.strategy=ddp")
    assert kill_and_resume(cli, tmp_path, "configs/ppo/demo.yaml", args=args) == 0.0


@pytest.mark.slow
def test_dpo_resumes_mid_epoch_exactly(cli, tmp_path):
    args = ("--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
            "--model.init_args.lm.tokenizer=demo", "--data.init_args.max_train_pairs=64",
            "--data.init_args.batch_size=8")
    assert kill_and_resume(cli, tmp_path, "configs/dpo/demo.yaml", args=args) == 0.0
