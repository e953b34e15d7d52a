"""Demo models built on first use: the SFT policy and the reward model that PPO starts from.

``demo-sft`` and ``demo-rm`` can stand wherever a model path goes (``lm.name_or_path``,
``RewardModelReward.path``). If the cache lacks them, the single-stage demos run once (the
same ``configs/<stage>/demo.yaml`` files a user runs) and their results are exported to the
cache as plain HF models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO_MODELS = {"demo-sft": "sft", "demo-rm": "rm"}
REPO = Path(__file__).resolve().parents[2]


def demo_models_root() -> Path:
    base = os.environ.get("LIT_RLHF_CACHE") or Path.home() / ".cache" / "lit_rlhf"
    return Path(base).expanduser() / "demo-models-v1"


def is_demo_model(name: str | None) -> bool:
    return name in DEMO_MODELS


def ensure_demo_model(name: str) -> Path:
    """Path of the demo model ``name`` (``demo-sft``/``demo-rm``), training it if absent."""
    from lit_rlhf.export import export_run

    stage = DEMO_MODELS[name]
    target = demo_models_root() / stage
    if (target / "config.json").is_file():
        return target
    config = REPO / "configs" / stage / "demo.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{name}: {config} not found; run from a lit_rlhf checkout to build demo models")
    print(f"[lit_rlhf] building {name}: python train.py fit -c {config.relative_to(REPO)} (once; cached in {target})",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"lit_rlhf_{stage}_") as run_root:
        subprocess.run([sys.executable, "-m", "lit_rlhf.cli", "fit", "-c", str(config),
                        f"--trainer.default_root_dir={run_root}"], cwd=REPO, check=True)
        run_dir = max(Path(run_root, "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
        export_run(run_dir, target)
    return target
