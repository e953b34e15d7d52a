"""Config files composed from a base and overlays (``config: base.yaml`` inside a recipe), the
recipes shipped in the package, and what a config's ``trainer.strategy`` and ``precision`` may say.

Below the CLI so that every command reading a config composes it the same way: the CLI
(which composes the ``-c`` files before LightningCLI parses, :mod:`lit_rlhf.cli.arguments`),
``lit-rlhf estimate`` (which reads a config without LightningCLI), the pipeline (which hashes
every file a stage's config builds on) and the demo (which builds its models from recipes).
Nothing here imports the rest of the package: a short class name is looked up by name when a
config is composed (:data:`CLASS_MODULES`), as jsonargparse looks up a ``class_path``. The
small commands that read configs and runs (pipeline, export) also take their one-line usage
errors from here (:class:`OneLineParser`).

The recipes live in ``lit_rlhf/configs/`` (package data, in the wheel too; the repository's
top-level ``configs/`` links to it). A ``-c`` file that does not exist where it is named is
looked up there, with or without a leading ``configs/``: ``-c sft/demo.yaml`` and
``-c configs/sft/demo.yaml`` run the shipped SFT demo from any directory (a local file of
that name wins); so is a ``config:`` base that is not beside the file naming it, so a user's
overlay can build on a shipped recipe (``config: sft/demo.yaml``).

The one rule of composition, applied file after file in command-line order (``-c a.yaml -c
b.yaml``: ``b`` over ``a``; a file's ``config:`` bases come before it):

* mappings merge key by key, recursively;
* everything else replaces: a list in an overlay replaces the base's list whole (an overlay's
  ``trainer.callbacks`` is the complete list, it does not inherit fields of the base's
  callback at the same position), and so does a scalar or ``null``;
* a mapping whose ``class_path`` differs from the base's replaces it whole (the base's
  ``init_args`` belong to another class).

Dotted command-line overrides (``--trainer.max_steps=10``) apply after the files, as usual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def default_precision(accelerator: Any, bf16_gpu: bool) -> str:
    """The trainer precision of a config that sets none: ``bf16-mixed`` on a bf16-capable CUDA
    GPU (``bf16_gpu``), else ``32-true``; a config that asks for the CPU gets ``32-true`` also on
    a machine that has a GPU. The CLI passes the machine's GPU, the estimator its target's."""
    wants_gpu = str(accelerator or "auto").lower() in ("auto", "gpu", "cuda")
    return "bf16-mixed" if wants_gpu and bf16_gpu else "32-true"


# trainer.strategy names lit_rlhf's modules cannot run under (matched in the lower-case name or
# class path): their sharded or split parameters need the modules' own support, which fsdp2 has.
UNSUPPORTED_STRATEGIES = ("fsdp", "deepspeed", "model_parallel", "modelparallel")
SUPPORTED_STRATEGIES = "auto, ddp, ddp_spawn, ddp_find_unused_parameters_true, single_device or fsdp2"


def strategy_name(strategy: Any) -> str:
    """``trainer.strategy`` (a name, or a ``class_path`` mapping) as one string."""
    name = strategy.get("class_path") if hasattr(strategy, "get") else strategy
    return str(name or "auto")


def is_fsdp2(strategy: Any) -> bool:
    """True for lit_rlhf's sharded strategy, by name (``fsdp2``) or class."""
    name = strategy_name(strategy)
    return name.lower() == "fsdp2" or name.rsplit(".", 1)[-1] == "FSDP2Strategy"


def strategy_problem(strategy: Any, quantization: str | None = None, precision: Any = None) -> str | None:
    """Why ``trainer.strategy`` cannot run lit_rlhf's modules with this base's ``quantization``
    and the trainer's ``precision``, or None."""
    name = strategy_name(strategy)
    if is_fsdp2(strategy):
        if quantization not in (None, "none"):
            return (f"trainer.strategy={name!r}: model.init_args.lm.quantization={quantization!r} cannot be sharded "
                    "(bitsandbytes' packed weights are not FSDP2 parameters): shard a bf16 base "
                    "(LoRA or full fine-tuning), or train the quantized base with ddp")
        if str(precision) in ("16-mixed", "16", "16-true"):
            return (f"trainer.strategy={name!r} with trainer.precision={precision!r}: fp16 under sharding needs a "
                    "gradient scaler that agrees across ranks; use bf16-mixed (or 32-true)")
        return None
    if any(kind in name.lower() for kind in UNSUPPORTED_STRATEGIES):
        return (f"trainer.strategy={name!r} is not supported by lit_rlhf's modules: to shard a model, use fsdp2 "
                f"(FSDP2, see the README); else {SUPPORTED_STRATEGIES}")
    return None


RECIPES = Path(__file__).resolve().parent / "configs"  # lit_rlhf/configs, inside the wheel too
"""The recipes shipped in the package: ``<method>/<recipe>.yaml``."""


def recipe_path(name: str | Path) -> Path:
    """The shipped recipe ``name`` (``sft/demo.yaml``, or ``configs/sft/demo.yaml``)."""
    rel = Path(name)
    if rel.parts[:1] == ("configs",):
        rel = Path(*rel.parts[1:])
    path = RECIPES / rel
    if rel.is_absolute() or not path.is_file():
        shipped = ", ".join(sorted(str(p.relative_to(RECIPES)) for p in RECIPES.glob("*/*.yaml")
                                   if p.name != "base.yaml"))
        raise FileNotFoundError(f"config file not found: {name} (neither here nor among the recipes shipped "
                                f"with lit_rlhf: {shipped})")
    return path


def find_config(value: str) -> Path:
    """A ``-c`` argument as a file: where it is named, else the shipped recipe of that name."""
    return Path(value) if names_a_file(value) else recipe_path(value)


def read_config(path: Path) -> dict:
    """One YAML config file as a mapping; a syntax error names the file and line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: invalid YAML: {problem} (fix the file's syntax)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of keys, got a {type(data).__name__}")
    return data


def config_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """The config files ``path`` builds on (its ``config:`` key, relative to it), then itself."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config include cycle: {' -> '.join(map(str, (*seen, path)))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    base = read_config(path).get("config")
    bases = [base] if isinstance(base, str) else list(base or [])
    # A base is relative to the file naming it, else a shipped recipe (`config: sft/demo.yaml`).
    files = [f for b in bases for f in config_chain(_base_file(path.parent / b, b), (*seen, path))]
    return [*files, str(path)]


def _base_file(beside: Path, name: str) -> Path:
    if beside.is_file():
        return beside
    try:
        return recipe_path(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {beside}") from None


def merge_configs(base: Any, overlay: Any) -> Any:
    """``overlay`` over ``base`` by the module's rule (mappings merge, all else replaces)."""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    if "class_path" in overlay and overlay["class_path"] != base.get("class_path", overlay["class_path"]):
        return overlay
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = merge_configs(base[key], value) if key in base else value
    return merged


def compose(files: list[str]) -> dict:
    """The files merged in order, without their ``config:`` include keys (short class names
    resolved first, so ``class_path: PPOModule`` over ``lit_rlhf.modules.PPOModule`` merges)."""
    merged: dict = {}
    for file in files:
        data = {k: v for k, v in read_config(Path(file)).items() if k != "config"}
        merged = merge_configs(merged, full_class_paths(data))
    return merged


# Where a short class name (`PPOModule`, `ExactAnswerReward`, `ModelCheckpoint`) is looked up.
CLASS_MODULES = ("lit_rlhf.modules", "lit_rlhf.data", "lit_rlhf.rewards", "lit_rlhf.callbacks", "lit_rlhf.demo",
                 "lightning.pytorch.callbacks", "lightning.pytorch.loggers")


# Classes that moved, by their old path: configs written before the move keep working.
MOVED_CLASSES = {"lit_rlhf.rewards.JudgeReward": "lit_rlhf.demo.JudgeReward"}


def class_path_of(name: str) -> str:
    """The full class path of a short class name of :data:`CLASS_MODULES` (or of a class's old
    path, :data:`MOVED_CLASSES`); anything else unchanged."""
    import importlib
    import inspect

    if "." in name:
        return MOVED_CLASSES.get(name, name)
    for module_name in CLASS_MODULES:
        found = getattr(importlib.import_module(module_name), name, None)
        if inspect.isclass(found):
            return f"{module_name}.{name}"
    return name


def full_class_paths(config: Any) -> Any:
    """``config`` with every short ``class_path`` value replaced by its full path."""
    if isinstance(config, list):
        return [full_class_paths(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {k: full_class_paths(v) for k, v in config.items()}
    if isinstance(out.get("class_path"), str):
        out["class_path"] = class_path_of(out["class_path"])
    return out


def nested(key: str, value: Any) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def names_a_file(value: str) -> bool:
    """True when a ``-c`` value is an existing file (rather than a recipe name or inline YAML)."""
    try:
        return Path(value).is_file()
    except OSError:  # e.g. an inline YAML config longer than a file name may be
        return False


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` that reports a usage mistake as one ``error:`` line (exit 2), as the CLI does:
    for the small commands that read configs and runs (export, pipeline)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
