"""Atomic saving: a reader never sees a half-written adapter, export or model folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    Readers never see a half-written adapter or export: the old directory stays until the
    new one is complete, then ``os.replace`` swaps them.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _rmtree(old)
    except BaseException:
        _rmtree(tmp)
        raise


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_pretrained_atomic(model: nn.Module, target: str | Path, tokenizer=None, **meta) -> Path:
    """``save_pretrained`` (safetensors) into ``target`` atomically, plus the tokenizer.

    ``meta`` is written to ``target/lit_rlhf.json`` (e.g. reward statistics, step).
    """
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / "lit_rlhf.json").write_text(json.dumps(meta, indent=2))
    return Path(target)
