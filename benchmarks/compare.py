"""lit_rlhf against TRL on one workload, stage by stage, and the ratio table.

    python benchmarks/compare.py --workload tiny-cpu --out-dir benchmarks/results
    python benchmarks/compare.py --workload small-cpu --repeats 1 --precisions 32-true   # ~45 min

For each stage it runs ``run.py`` and ``trl_baseline.py`` (both precisions each), so the
two measurements of a stage are minutes apart rather than a whole run apart: on a shared
machine the speed drifts, and interleaving keeps the drift out of the ratios. With
``--repeats N`` (default 3) each stage is measured N times, alternating which of the two
goes first (lit_rlhf, TRL, then TRL, lit_rlhf, ...); each figure is the median over the
repeats, and the table also lists the ratio of every repeat, so the spread is visible.

Writes ``<out-dir>/<workload>-lit_rlhf-<date>.json`` and ``<workload>-trl-<date>.json`` (the
medians, and each repeat's figures under ``"repeats"``) and prints a markdown table of the
ratios against the targets of the benchmark issues: ``tiny-cpu``'s, and at ``small-cpu`` (the
realistic shape, where per-call overhead no longer dominates) the lower ones of issue 41
(:data:`WORKLOAD_TARGETS`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (figure, target ratio in fp32, target in bf16); higher is better for all of them but the mean
# response length (a check that both sample alike).
TARGETS = [("sft_tokens_per_s", 1.0, 1.2), ("rm_pairs_per_s", 1.5, 1.5), ("ppo_episodes_per_s", 2.0, 2.0),
           ("ppo_generate_tokens_per_s", None, None), ("dpo_pairs_per_s", 1.5, 1.5),
           ("grpo_completions_per_s", 1.5, 1.0), ("grpo_generate_tokens_per_s", None, None),
           ("grpo_long_completions_per_s", None, None), ("grpo_varlen_completions_per_s", 2.0, None),
           ("grpo_varlen_mean_response_length", None, None)]
# Per workload, where its targets differ: (figure, fp32, bf16-mixed), as TARGETS.
WORKLOAD_TARGETS = {
    "small-cpu": [("sft_tokens_per_s", 1.0, 1.0), ("rm_pairs_per_s", 1.3, 1.3), ("ppo_episodes_per_s", 1.5, 1.5),
                  ("ppo_generate_tokens_per_s", None, None), ("ppo_mean_response_length", None, None),
                  ("dpo_pairs_per_s", 1.5, 1.5), ("grpo_completions_per_s", 1.3, 1.3),
                  ("grpo_generate_tokens_per_s", None, None), ("grpo_varlen_completions_per_s", 1.5, 1.5),
                  ("grpo_varlen_mean_response_length", None, None)],
}
MEMORY = ["sft_peak_memory_mb", "rm_peak_memory_mb", "ppo_peak_memory_mb", "dpo_peak_memory_mb", "grpo_peak_memory_mb",
          "grpo_long_peak_memory_mb", "grpo_varlen_peak_memory_mb"]


def _run(script: str, workload: str, stage: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(HERE / script), "--workload", workload, "--stages", stage, "--out", str(out), *extra]
        print("[compare]", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def median_of(repeats: list[dict]) -> dict:
    """Per key, the median over the repeats of the numeric figures."""
    out = {}
    for key in repeats[0]:
        values = [r.get(key) for r in repeats]
        if all(isinstance(v, (int, float)) for v in values):
            # Settings (threads, steps) are equal in every repeat and keep their type.
            out[key] = values[0] if len(set(values)) == 1 else round(statistics.median(values), 4)
    return out


def table(ours: list[dict], trl: list[dict], figures: list[tuple] | None = None) -> str:
    """Markdown: each figure in fp32 and bf16, both implementations (medians over the
    repeats), the ratio of the medians, each repeat's ratio and the target (``figures``: (name, fp32
    target, bf16 target) rows, default :data:`TARGETS`)."""
    a_med, b_med = median_of(ours), median_of(trl)
    lines = ["| figure | precision | lit_rlhf | TRL | ratio | per repeat | target |", "|---|---|---|---|---|---|---|"]
    for name, *targets in (figures or TARGETS) + [(m, None, None) for m in MEMORY]:
        for suffix, target, label in (("", targets[0], "fp32"), ("_bf16", targets[1], "bf16-mixed")):
            key = name + suffix
            if key not in a_med or key not in b_med:
                continue
            ratio = a_med[key] / b_med[key]
            each = " / ".join(f"{a[key] / b[key]:.2f}" for a, b in zip(ours, trl))
            verdict = "" if target is None else f"{target:.1f}× {'met' if ratio >= target else 'NOT met'}"
            lines.append(f"| {name} | {label} | {a_med[key]:,.2f} | {b_med[key]:,.2f} | {ratio:.2f}× | {each} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny-cpu")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--stages", default="sft,rm,ppo,dpo,grpo,grpo_varlen")
    parser.add_argument("--steps-override", metavar="[WARMUP,]TIMED", help="for smoke tests")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each stage per implementation")
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="comma-separated precisions to run")
    opts = parser.parse_args()
    if opts.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {opts.repeats}")
    extra = [f"--steps-override={opts.steps_override}"] if opts.steps_override else []
    extra.append(f"--precisions={opts.precisions}")
    runs: dict[str, list[dict]] = {"lit_rlhf": [{} for _ in range(opts.repeats)],
                                   "trl": [{} for _ in range(opts.repeats)]}
    scripts = [("lit_rlhf", "run.py"), ("trl", "trl_baseline.py")]
    for stage in opts.stages.split(","):
        for repeat in range(opts.repeats):
            # Alternate who goes first, so a drift within a repeat does not always favour one.
            for name, script in scripts if repeat % 2 == 0 else scripts[::-1]:
                figures = _run(script, opts.workload, stage, extra)
                figures.pop("wall_s", None)  # per stage here; a sum would mislead
                runs[name][repeat].update(figures)
    date = datetime.date.today().isoformat()
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, repeats in runs.items():
        result = {**repeats[0], **median_of(repeats), "repeats": repeats}
        path = out_dir / f"{opts.workload}-{name}-{date}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
    # A smoke twin is judged as its workload (its figures mean nothing; the table's code runs).
    print(table(runs["lit_rlhf"], runs["trl"], WORKLOAD_TARGETS.get(opts.workload.removesuffix("-smoke"))))


if __name__ == "__main__":
    main()
