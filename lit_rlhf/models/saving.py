"""Atomic saving: a reader never sees a half-written adapter, export or model folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
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
    remove_stale_temporaries(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{_owner()}-")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _rmtree(old)
    except BaseException:
        _rmtree(tmp)
        raise


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# .<name>.tmp-<host>-<pid>-<random> and .<name>.old-<host>-<pid>-: see atomic_dir.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-\w*$")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what :func:`atomic_dir` left in ``folder`` when its process was killed.

    A temporary folder is stale when its name says it was made on this host by a process
    that no longer runs; others (another process saving right now, another node) stay.
    """
    removed = []
    for path in folder.glob(".*.*-*-*") if folder.is_dir() else ():
        match = _TEMPORARY.match(path.name)
        if match and match["host"] == socket.gethostname() and not _alive(int(match["pid"])):
            _rmtree(path)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_pretrained_atomic(model: nn.Module, target: str | Path, tokenizer=None, adapters: list[str] | None = None,
                           check=None, state_dict: dict | None = None, **meta) -> Path:
    """``save_pretrained`` (safetensors) into ``target`` atomically, plus the tokenizer.

    ``adapters``: for a peft model, the adapters to save (all by default; a policy that also
    carries a reward adapter saves only its own). ``check(folder)``, when given, runs on the
    written folder before it replaces ``target`` (e.g. its headers against the model). ``meta`` is written to
    ``target/lit_rlhf.json`` (e.g. reward statistics, the base the adapter was trained on).
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered).
    """
    extra = {"selected_adapters": adapters} if adapters else {}
    if state_dict is not None:
        extra["state_dict"] = state_dict
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        if state_dict is not None:
            _unwrapped_architectures(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / "lit_rlhf.json").write_text(json.dumps(meta, indent=2))
        if check is not None:
            check(tmp)
    return Path(target)


def _unwrapped_architectures(folder: Path) -> None:
    """``fully_shard`` gives a model the class ``FSDP<Class>``, which ``save_pretrained`` writes
    into config.json's ``architectures``: written back as the model's own class name."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    names = config.get("architectures") or []
    fixed = [n[len("FSDP"):] if n.startswith("FSDP") else n for n in names]
    if fixed != names:
        config["architectures"] = fixed
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
