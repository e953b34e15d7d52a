"""lit_rlhf against TRL on one workload, stage by stage, and the ratio table.

    python benchmarks/compare.py --workload tiny-cpu --out-dir benchmarks/results

For each stage it runs ``run.py`` and then ``trl_baseline.py`` (both precisions each), so
the two measurements of a stage are minutes apart rather than a whole run apart: on a
shared machine the speed drifts, and interleaving keeps the drift out of the ratios. Writes
``<out-dir>/<workload>-lit_rlhf-<date>.json``, ``<workload>-trl-<date>.json`` and prints a
markdown table of the ratios against the targets of the benchmark issue.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (figure, target ratio in fp32, target in bf16); higher is better for all of them.
TARGETS = [("sft_tokens_per_s", 1.0, 1.2), ("rm_pairs_per_s", 1.5, 1.5), ("ppo_episodes_per_s", 2.0, 2.0),
           ("ppo_generate_tokens_per_s", None, None)]
MEMORY = ["sft_peak_memory_mb", "rm_peak_memory_mb", "ppo_peak_memory_mb"]


def _run(script: str, workload: str, stage: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(HERE / script), "--workload", workload, "--stages", stage, "--out", str(out), *extra]
        print("[compare]", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def table(ours: dict, trl: dict) -> str:
    """Markdown: each figure in fp32 and bf16, both implementations, ratio and target."""
    lines = ["| figure | precision | lit_rlhf | TRL | ratio | target |", "|---|---|---|---|---|---|"]
    for name, *targets in TARGETS + [(m, None, None) for m in MEMORY]:
        for suffix, target, label in (("", targets[0], "fp32"), ("_bf16", targets[1], "bf16-mixed")):
            a, b = ours.get(name + suffix), trl.get(name + suffix)
            if a is None or b is None:
                continue
            ratio = a / b
            verdict = "" if target is None else f"{target:.1f}× {'met' if ratio >= target else 'NOT met'}"
            lines.append(f"| {name} | {label} | {a:,.2f} | {b:,.2f} | {ratio:.2f}× | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny-cpu")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--steps-override", metavar="[WARMUP,]TIMED", help="for smoke tests")
    opts = parser.parse_args()
    extra = [f"--steps-override={opts.steps_override}"] if opts.steps_override else []
    ours, trl = {}, {}
    for stage in opts.stages.split(","):
        ours.update(_run("run.py", opts.workload, stage, extra))
        trl.update(_run("trl_baseline.py", opts.workload, stage, extra))
    for result in (ours, trl):
        result.pop("wall_s", None)  # per stage here; the sum would mislead
    date = datetime.date.today().isoformat()
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, result in (("lit_rlhf", ours), ("trl", trl)):
        (out_dir / f"{opts.workload}-{name}-{date}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(ours, trl))


if __name__ == "__main__":
    main()
