"""Kill-and-resume harness: run a stage uninterrupted, run it again killed with SIGKILL right
after a mid-run checkpoint, resume that one from ``last.ckpt``, and compare the two ends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


class KillAt(L.Callback):
    """SIGKILL this process as step ``step + 1`` begins, i.e. right after the checkpoint at
    ``step`` is on disk (ModelCheckpoint saves at the end of the step). Every DDP rank kills
    itself: nothing gets to clean up, as with a preempted job or an OOM kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def overlay(tmp: Path, name: str, recipe: str, steps: int, every: int, kill_at: int | None, extra: dict) -> Path:
    """A config over ``recipe``: step-based checkpoints into ``tmp/name``, no validation.

    Its ``trainer.callbacks`` replaces the recipe's list (see lit_rlhf.recipes)."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / name / "ckpt"), "every_n_train_steps": every,
                                "save_top_k": -1, "save_last": True}}]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.resume.KillAt", "init_args": {"step": kill_at}})
    config = {
        "config": str(ROOT / recipe),
        "seed_everything": 7,
        "trainer": {"max_steps": steps, "limit_val_batches": 0, "callbacks": callbacks,
                    "default_root_dir": str(tmp / name), "enable_progress_bar": False,
                    "val_check_interval": None, "check_val_every_n_epoch": None, **extra.pop("trainer", {})},
        **extra,
    }
    path = tmp / f"{name}-{'kill' if kill_at is not None else 'run'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(cli, config: Path, *args: str, expect_kill: bool = False) -> None:
    """``train.py fit -c config *args`` in its own process (``cli``: a :class:`CLIRunner`)."""
    out = cli.run(["fit", "-c", str(config), *args])
    assert out.code == (-signal.SIGKILL if expect_kill else 0), out.stderr[-3000:]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as one dict: a file, or an fsdp2 checkpoint folder (one shard file per rank,
    gathered here into whole tensors, with the optimizer states under ``optimizer_states``)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = path.parent / f"{path.name}.whole.pt"
    dcp_to_torch_save(path, whole)
    state = torch.load(whole, map_location="cpu", weights_only=True)
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    optimizers = [state.pop(k) for k in sorted(k for k in state if k.startswith("optimizer_"))]
    return {**meta, **state, "optimizer_states": optimizers}


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two checkpoints' trainable weights and optimizer
    moments; also asserts that they hold the same tensors."""
    ca, cb = (load_checkpoint(p) for p in (a, b))
    assert ca["global_step"] == cb["global_step"]
    pairs = [(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"]]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for oa, ob in zip(ca["optimizer_states"], cb["optimizer_states"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        for k in oa["state"]:
            pairs += [(oa["state"][k][m], ob["state"][k][m]) for m in oa["state"][k]]
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in pairs)


def kill_and_resume(cli, tmp: Path, recipe: str, *, steps: int = 6, kill_at: int = 3, args: tuple = (),
                    extra: dict | None = None) -> float:
    """Max weight/optimizer difference at ``steps`` between an uninterrupted run and one
    killed after the checkpoint at ``kill_at`` and resumed from its ``last.ckpt``."""
    fit(cli, overlay(tmp, "whole", recipe, steps, kill_at, None, dict(extra or {})), *args)
    fit(cli, overlay(tmp, "killed", recipe, steps, kill_at, kill_at, dict(extra or {})), *args, expect_kill=True)
    last = tmp / "killed" / "ckpt" / "last.ckpt"
    meta = last / "meta.pt" if last.is_dir() else last  # an fsdp2 checkpoint is a folder
    assert torch.load(meta, map_location="cpu", weights_only=True)["global_step"] == kill_at
    resumed = overlay(tmp, "killed", recipe, steps, kill_at, None, dict(extra or {}))
    fit(cli, resumed, *args, f"--ckpt_path={last}")
    name = f"epoch=0-step={steps}.ckpt"
    return max_difference(tmp / "whole" / "ckpt" / name, tmp / "killed" / "ckpt" / name)
