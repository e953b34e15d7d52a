"""One training step of a ``run.py`` stage under ``torch.profiler``: where the time goes.

    python benchmarks/profile_step.py --stage grpo_varlen --out profile.txt
    python benchmarks/profile_step.py --stage rm --precision bf16-mixed --out rm.txt

Runs the stage in this process with a few warm-up steps, profiles the step after them (CPU
activities, and CUDA when there is a GPU) and writes two tables: operators by total time and
by self time. The online methods' phases show as ``phase:sample`` and ``phase:scoring_passes``
rows (what is left of the step is the update). The stage's own figures print as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

from lit_rlhf.modules.online import OnlineRLModule  # noqa: E402


class ProfiledStep(run.StepTimer):
    """run.py's step timer that also profiles step number ``at`` (0-based)."""

    at = 3

    def on_train_batch_start(self, *args) -> None:
        if len(self.times) == self.at:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            ProfiledStep.profiler = profile(activities=activities)
            ProfiledStep.profiler.__enter__()
        super().on_train_batch_start(*args)

    def on_train_batch_end(self, *args) -> None:
        super().on_train_batch_end(*args)
        if len(self.times) == self.at + 1:
            ProfiledStep.profiler.__exit__(None, None, None)


def _labelled(method):
    def wrapper(self, *args, **kwargs):
        with record_function(f"phase:{method.__name__}"):
            return method(self, *args, **kwargs)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, help="a run.py stage, e.g. grpo_varlen, rm, ppo")
    parser.add_argument("--workload", default="tiny-cpu", choices=sorted(run.WORKLOADS))
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled one")
    parser.add_argument("--rows", type=int, default=40, help="operators per table")
    parser.add_argument("--out", required=True, help="text file for the tables")
    opts = parser.parse_args()
    ProfiledStep.at = opts.warmup
    run.StepTimer = ProfiledStep
    for name in ("sample", "scoring_passes"):
        setattr(OnlineRLModule, name, _labelled(getattr(OnlineRLModule, name)))
    figures = run.run_one(opts.workload, opts.stage, opts.precision, f"{opts.warmup},1")
    averages = ProfiledStep.profiler.key_averages()
    tables = [f"{opts.stage} {opts.precision}: step {opts.warmup + 1} of {opts.workload}, by total time",
              averages.table(sort_by="cpu_time_total", row_limit=opts.rows), "by self time",
              averages.table(sort_by="self_cpu_time_total", row_limit=opts.rows)]
    Path(opts.out).write_text("\n\n".join(tables) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
