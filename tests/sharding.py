"""FSDP2 equivalence runs: each stage trained a few steps through the CLI, on one process with
the global batch, and sharded over two gloo processes with half of it each; their exports
compared tensor by tensor.

The two-process runs of every stage share one process group: ``OUT=dir RUNS="sft-full rm-lora ..."
python -m tests.sharding`` runs them one after the other (Lightning launches the second rank
as the same command, with the same environment), so the suite pays Python's imports and the
group's start once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ("--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
        "--model.init_args.lm.tokenizer=demo")
# Responses of one length on every rank: the per-rank token means that DDP and FSDP2 average
# are then the global batch's token mean (see the README: token means are per rank).
ONLINE = (*TINY, "--model.init_args.reward=lit_rlhf.demo.JudgeReward", "--model.init_args.judge=null",
          "--model.init_args.sampling.min_new_tokens=6", "--model.init_args.sampling.max_new_tokens=6",
          "--model.init_args.sampling.stop_at_eos=false", "--trainer.limit_train_batches=2")
LORA = '--model.init_args.lm.lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}'
NO_LORA = "--model.init_args.lm.lora=null"

# name -> (recipe, arguments, global batch -> per-device batch arguments)
STAGES: dict[str, tuple[str, tuple[str, ...], object]] = {
    "sft": ("configs/sft/demo.yaml", ("--trainer.max_steps=3", "--data.init_args.shuffle_buffer=0"),
            lambda b: (f"--data.init_args.batch_size={b}",)),
    "rm": ("configs/rm/demo.yaml", (*TINY, "--trainer.max_steps=3", "--data.init_args.max_train_pairs=64"),
           lambda b: (f"--data.init_args.batch_size={b}",)),
    "dpo": ("configs/dpo/demo.yaml", (*TINY, "--trainer.max_steps=3", "--data.init_args.max_train_pairs=64"),
            lambda b: (f"--data.init_args.batch_size={b}",)),
    "ppo": ("configs/ppo/demo.yaml", (*ONLINE, "--model.init_args.ppo.ppo_epochs=2"),
            lambda b: (f"--data.init_args.batch_size={b}", f"--model.init_args.ppo.mini_batch_size={b}")),
    "grpo": ("configs/grpo/demo.yaml", (*ONLINE, "--model.init_args.grpo.num_generations=2"),
             lambda b: (f"--data.init_args.batch_size={b}", f"--model.init_args.grpo.mini_batch_size={2 * b}")),
}
GLOBAL_BATCH = 8


def arguments(name: str, out: Path, world: int) -> list[str]:
    """The ``fit`` command line of run ``name`` (``<stage>-full`` or ``<stage>-lora``) on
    ``world`` processes, logging under ``out/<name>-<world>``."""
    stage, kind = name.split("-")
    recipe, args, per_device = STAGES[stage]
    strategy = ("--trainer.strategy=fsdp2", f"--trainer.devices={world}") if world > 1 else ("--trainer.devices=1",)
    return ["fit", "-c", recipe, *args, *per_device(GLOBAL_BATCH // world), LORA if kind == "lora" else NO_LORA,
            *strategy, "--seed_everything=7", "--model.init_args.optim.lr=5e-5", "--model.init_args.optim.warmup_steps=0", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false", f"--trainer.default_root_dir={out / f'{name}-{world}'}"]


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file a run exported, keyed ``<file>/<tensor>``."""
    files = sorted(run_dir.rglob("*.safetensors"))
    assert files, f"{run_dir}: nothing exported"
    return {f"{f.relative_to(run_dir)}/{k}": v for f in files for k, v in load_file(f).items()}


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the exports of two runs (which hold the same tensors)."""
    ta, tb = exported(a), exported(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


if __name__ == "__main__":
    from lit_rlhf.cli import main

    # From the environment: LightningCLI reads the command line unless it is empty (each run's
    # goes by `args`), and Lightning starts the second rank with this command line.
    out, runs = Path(os.environ["OUT"]), os.environ["RUNS"].split()
    for run in runs:
        main(arguments(run, out, 2))
