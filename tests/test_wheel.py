"""Installed from a wheel, the package stands on its own: recipes, demo names and the pipeline work
from any directory, with no source tree behind them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip wheel .``, then the wheel alone installed into a folder of its own (no deps: the
    environment's torch, lightning, ... serve it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, cwd=tmp)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp / "dist").glob("lit_rlhf-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(tmp / "site"), str(wheel)], capture_output=True, text=True, cwd=tmp)
    assert install.returncode == 0, install.stderr[-3000:]
    return tmp / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # The installed copy first on the path: the checkout is nowhere near (cwd is elsewhere).
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "lit_rlhf.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


@pytest.mark.slow
def test_the_installed_wheel_runs_recipes_and_a_short_pipeline_from_another_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import lit_rlhf; print(lit_rlhf.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(installed)})
    assert where.stdout.startswith(str(installed)), where.stdout + where.stderr  # not the checkout
    shipped = sorted(p.relative_to(installed / "lit_rlhf" / "configs").as_posix()
                     for p in (installed / "lit_rlhf" / "configs").glob("*/*.yaml"))
    assert shipped == sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").glob("*/*.yaml"))

    # A shipped recipe by name, and a demo model name (its shape, before it is built), from elsewhere.
    estimate = _run(installed, elsewhere, "estimate", "-c", "ppo/demo.yaml")
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    assert "peak" in estimate.stdout.lower()

    # The pipeline, shrunk: the user's overlays build on the shipped arithmetic recipes by name.
    (elsewhere / "sft.yaml").write_text("config: sft/arithmetic.yaml\n"
                                        "trainer:\n  max_steps: 4\n  val_check_interval: 4\n  limit_val_batches: 1\n")
    (elsewhere / "grpo.yaml").write_text(
        "config: grpo/arithmetic.yaml\n"
        "data:\n  class_path: lit_rlhf.data.PromptDataModule\n  init_args:\n    batch_size: 4\n"
        "model:\n  init_args:\n    grpo:\n      mini_batch_size: 16\n"
        "trainer:\n  limit_train_batches: 1\n  val_check_interval: 1\n  limit_val_batches: 1\n")
    run = _run(installed, elsewhere, "pipeline", "--output_dir", "run", "--task", "arithmetic",
               "--sft_config", "sft.yaml", "--grpo_config", "grpo.yaml", "--eval_prompts", "8", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert summary["methods"] == ["grpo"] and "greedy_accuracy" in summary["grpo"]
    assert (elsewhere / "run" / "grpo" / "model" / "config.json").is_file()
