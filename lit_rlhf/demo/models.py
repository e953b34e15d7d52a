"""The demo's names for the model loader, and the demo models built on first use.

:func:`register` (the ``lit_rlhf.sources`` entry point of this package, see
:mod:`lit_rlhf.models.sources`) makes these names work wherever a model, tokenizer or
architecture is named:

* ``demo``: the demo's byte-level BPE tokenizer (:func:`lit_rlhf.demo.prepare_demo`);
* ``demo-tiny``: the demo's tiny Llama architecture (:data:`lit_rlhf.demo.TINY_LLAMA`);
* ``demo-sft``, ``demo-rm``: the SFT policy and the reward model that the PPO demo starts
  from. If the cache lacks them, the single-stage demos run once (the same
  ``configs/<stage>/demo.yaml`` files a user runs) and their results are exported to the
  cache as plain HF models;
* ``arithmetic`` (tokenizer) and ``arithmetic-sft`` (the SFT model the arithmetic GRPO demo
  starts from, built by ``configs/sft/arithmetic.yaml``);
* ``calculator`` (tokenizer) and ``calculator-sft`` (built by ``configs/sft/calculator.yaml``),
  for the multi-turn tool-use demo.

This module sits above the loader and the exporter: it runs the CLI in a subprocess and
exports its run; the loader never imports it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> (cache folder, the config that builds it)
DEMO_MODELS = {"demo-sft": ("sft", "sft/demo.yaml"), "demo-rm": ("rm", "rm/demo.yaml"),
               "arithmetic-sft": ("arithmetic-sft", "sft/arithmetic.yaml"),
               "calculator-sft": ("calculator-sft", "sft/calculator.yaml")}
# name -> what building it costs (measured on 2 CPU cores, 2026-12-02) and the key that skips it
BUILD_NOTES = {
    "demo-sft": ("about 2.5 minutes", "--model.init_args.lm.name_or_path=<your SFT model>"),
    "demo-rm": ("about 1.5 minutes", "--model.init_args.reward.init_args.path=<your RM export>"),
    "arithmetic-sft": ("about 1.5 minutes", "--model.init_args.lm.name_or_path=<your SFT model>"),
    "calculator-sft": ("about 2 minutes", "--model.init_args.lm.name_or_path=<your SFT model>"),
}


def register() -> None:
    """Register the demo's names with the model loader and the data modules (idempotent)."""
    from lit_rlhf.demo import TINY_LLAMA, datasets, prepare_demo
    from lit_rlhf.demo.arithmetic import ARITHMETIC, prepare_arithmetic
    from lit_rlhf.demo.calculator import CALCULATOR, prepare_calculator
    from lit_rlhf.models.sources import register_arch, register_path

    register_path("demo", lambda: prepare_demo().tokenizer_dir)
    register_path(ARITHMETIC, lambda: prepare_arithmetic().tokenizer_dir)
    register_path(CALCULATOR, lambda: prepare_calculator().tokenizer_dir)
    register_arch("demo-tiny", lambda: {"model_type": "llama", **TINY_LLAMA})
    for name in DEMO_MODELS:
        register_path(name, lambda name=name: ensure_demo_model(name), unbuilt=lambda name=name: unbuilt_fields(name))
    datasets.register()


def demo_models_root() -> Path:
    """``$LIT_RLHF_CACHE/demo-models-v<N>``: N is the demo data's format version, so models
    trained on an older corpus are rebuilt rather than reused."""
    from lit_rlhf.demo import FORMAT_VERSION

    base = os.environ.get("LIT_RLHF_CACHE") or Path.home() / ".cache" / "lit_rlhf"
    return Path(base).expanduser() / f"demo-models-v{FORMAT_VERSION}"


def is_demo_model(name: str | None) -> bool:
    return name in DEMO_MODELS


def ensure_demo_model(name: str) -> Path:
    """Path of the demo model ``name`` (a key of :data:`DEMO_MODELS`), training it if absent."""
    from lit_rlhf.recipes import recipe_path

    stage, recipe = DEMO_MODELS[name]
    target = demo_models_root() / stage
    config = recipe_path(recipe)  # shipped in the package: works from any directory
    stamp = recipe_stamp(config)
    if _built(target, stamp):
        return target
    if (target / "config.json").is_file():
        print(f"[lit_rlhf] configs/{recipe} changed since {name} was built: rebuilding it", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The ranks of a multi-process run (and concurrent runs) ask at once: one builds, the others
    # wait for it and take what it built.
    with open(target.parent / f".{stage}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _built(target, stamp):
            _build(name, recipe, config, target)
            (target / STAMP_FILE).write_text(stamp + "\n")  # absent until here: an interrupted build is redone
    return target


def _built(target: Path, stamp: str) -> bool:
    """True when ``target`` holds a model built from the recipe whose stamp is ``stamp``."""
    stamp_file = target / STAMP_FILE
    return (target / "config.json").is_file() and stamp_file.is_file() and stamp_file.read_text().strip() == stamp


# Set by launchers for the ranks of a distributed run: a build started from inside one (a reward
# model resolved after the ranks start) must run as a plain single process.
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "GLOBAL_RANK", "WORLD_SIZE",
                   "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _build(name: str, recipe: str, config: Path, target: Path) -> None:
    from lit_rlhf.export import export_run

    cost, skip = BUILD_NOTES[name]
    print(f"[lit_rlhf] {name} is not built yet: training it once, {cost} (lit-rlhf fit -c configs/{recipe}; "
          f"cached in {target}); to skip it, give {skip}", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("SLURM_")}
    with tempfile.TemporaryDirectory(prefix=f"lit_rlhf_{target.name}_") as run_root:
        # Its own process, in the run's folder: nothing depends on where the user stands.
        subprocess.run([sys.executable, "-m", "lit_rlhf.cli", "fit", "-c", str(config),
                        f"--trainer.default_root_dir={run_root}"], cwd=run_root, check=True, env=env)
        run_dir = max(Path(run_root, "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
        export_run(run_dir, target)


def unbuilt_fields(name: str) -> tuple[dict, str] | None:
    """For the memory estimator: the ``arch``/``tokenizer`` of demo model ``name`` while it is
    not built yet (building it trains for minutes), and a note saying so; None once built."""
    from lit_rlhf.recipes import compose, config_chain, recipe_path

    stage, recipe = DEMO_MODELS[name]
    if (demo_models_root() / stage / "config.json").is_file():
        return None
    fields = compose(config_chain(recipe_path(recipe)))["model"]["init_args"]["lm"]
    return ({k: v for k, v in fields.items() if k in ("arch", "tokenizer")},
            f"is not built yet: shape of the model that configs/{recipe} trains")


STAMP_FILE = "recipe.sha256"


def recipe_stamp(config: Path) -> str:
    """SHA-256 of a recipe and the base files it builds on: a cached demo model built from
    other settings is rebuilt instead of silently reused."""
    from lit_rlhf.recipes import config_chain

    digest = hashlib.sha256()
    for path in config_chain(config):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
