"""The demo pipeline in one command: SFT, then every chosen method from the SFT model, then one
evaluation of all resulting policies side by side.

    python train.py pipeline --output_dir runs/demo                       (SFT -> RM -> PPO, SFT -> DPO)
    python train.py pipeline --output_dir runs/demo --methods ppo,dpo,grpo
    python train.py pipeline --output_dir runs/arith --task arithmetic    (SFT -> GRPO, exact-answer reward)
    python train.py pipeline --output_dir runs/calc --task calculator     (SFT -> multi-turn GRPO with a tool)

Each stage runs the same config file as its single-stage command (``configs/<stage>/demo.yaml``
for the review task, ``configs/<stage>/<task>.yaml`` for arithmetic and calculator), in its own process,
with its outputs under ``<output_dir>/<stage>/``:

    sft/lightning_logs/...   sft/model/      (merged, plain HF causal LM)
    rm/lightning_logs/...    rm/model/       (plain HF sequence classifier + lit_rlhf.json)
    ppo/, dpo/, grpo/        <method>/model/ (merged policy)
    summary.json  report.png  samples.md

Every policy (the SFT model included) answers the same held-out prompts with the same sampler
and seed; ``summary.json`` has one block per method with its judge score, KL to the SFT model,
distinct-2 and mean response length.

A stage is skipped when ``<stage>/DONE.json`` records the same inputs (its config files,
command-line overrides and the stages it reads from); change any of them and it runs again,
together with every stage after it. ``tensorboard --logdir <output_dir>`` shows all stages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The methods each task can run after SFT, and the default choice.
TASKS = {"reviews": (("ppo", "dpo", "grpo"), "ppo,dpo"), "arithmetic": (("grpo",), "grpo"),
         "calculator": (("grpo",), "grpo")}
# Which stages need the reward model.
USES_RM = {"reviews": {"ppo", "grpo"}, "arithmetic": set(), "calculator": set()}


@dataclass
class Stage:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)


def stage_key(stage: Stage, done: dict[str, str]) -> str:
    """Hash of everything a stage's result depends on."""
    from lit_rlhf.recipes import config_chain

    h = hashlib.sha256()
    for path in config_chain(stage.config):
        h.update(Path(path).read_bytes())
    h.update(json.dumps(stage.overrides).encode())
    for name in stage.upstream:
        h.update(done[name].encode())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"\n[pipeline] {msg}", file=sys.stderr, flush=True)


def run_stage(stage: Stage, out: Path, keys: dict[str, str], extra: list[str]) -> Path:
    """Train and export ``stage`` unless its DONE.json matches; returns its model dir."""
    from lit_rlhf.export import export_run

    root = out / stage.name
    key = stage_key(stage, keys)
    keys[stage.name] = key
    done_file = root / "DONE.json"
    if done_file.is_file() and json.loads(done_file.read_text()).get("key") == key:
        _log(f"{stage.name}: up to date, skipped ({done_file})")
        return root / "model"
    done_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lit_rlhf.cli", "fit", "-c", str(stage.config),
           f"--trainer.default_root_dir={root}", *stage.overrides, *extra]
    _log(f"{stage.name}: {' '.join(cmd[2:])}")
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, cwd=root, check=True)  # absolute paths throughout: the cwd does not matter
    run_dir = max((root / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
    model_dir = export_run(run_dir, root / "model")
    wall = time.perf_counter() - start
    done_file.write_text(json.dumps({"key": key, "run_dir": str(run_dir), "wall_s": round(wall, 1)}, indent=2))
    _log(f"{stage.name}: done in {wall:.0f} s -> {model_dir}")
    return model_dir


# ------------------------------------------------------------------------------ evaluation


def _scalars(run_root: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a scalar from a stage's newest TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_root / "lightning_logs").glob("version_*/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    events = EventAccumulator(str(files[-1]), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _tail_mean(points: list[tuple[int, float]], fraction: float = 0.1) -> float | None:
    """Mean of the last ``fraction`` of a curve (at least one point): its final level."""
    if not points:
        return None
    tail = points[-max(1, round(len(points) * fraction)):]
    return sum(v for _, v in tail) / len(tail)


@torch.no_grad()
def sample_and_score(model_dir: Path, prompts: list[str], score, max_new_tokens: int, seed: int,
                     ref_dir: Path | None = None) -> dict:
    """Sample one response per prompt from a plain HF model (temperature 1, full distribution,
    the sampler the methods train with) and measure it.

    ``score(i, prompt, response) -> float`` judges a response. Returns the responses, their
    scores and the means: ``judge_score``, ``distinct_2``, ``mean_length`` (response tokens,
    EOS included) and, against ``ref_dir``, ``kl_to_sft``: the summed log-ratio
    log p(response) - log p_ref(response) of the sampled tokens, averaged over prompts (an
    unbiased estimate of KL(policy || reference) in nats per response).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_rlhf.data.prompts import left_pad
    from lit_rlhf.metrics import distinct_n
    from lit_rlhf.models.heads import PolicyWithValueHead
    from lit_rlhf.models.templates import end_of_turn_ids
    from lit_rlhf.modules.rollout import decode_responses, evaluate_actions, generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    ids, mask = left_pad(tokenizer(prompts)["input_ids"], tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    ends = end_of_turn_ids(tokenizer, policy.lm.generation_config)  # what the trained policy stopped at
    rollout = generate(policy, ids, mask, torch.full((len(prompts),), max_new_tokens),
                       eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, generator=gen)
    responses = decode_responses(tokenizer, rollout)
    scores = [float(score(i, p, r)) for i, (p, r) in enumerate(zip(prompts, responses))]
    result = {"responses": responses, "scores": scores,
              "judge_score": sum(scores) / len(scores),
              "kl_to_sft": 0.0,
              "distinct_2": distinct_n(responses, 2),
              "mean_length": float(rollout.response_mask.sum(-1).float().mean())}
    if ref_dir is not None:
        logp, _, _ = evaluate_actions(policy, rollout, with_values=False)
        ref = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(ref_dir).eval())
        ref_logp, _, _ = evaluate_actions(ref, rollout, with_values=False)
        result["kl_to_sft"] = float(((logp - ref_logp) * rollout.response_mask).sum(-1).mean())
    return result


@dataclass
class EvalSet:
    """The held-out prompts every policy answers, and how a response is judged."""

    prompts: list[str]
    score: Callable[[int, str, str], float]  # (index, prompt, response) -> score
    judge: str  # what judge_score means, for the summary and samples.md
    rows: list[dict] = field(default_factory=list)  # arithmetic, calculator: the problems, for greedy accuracy
    task: str = "reviews"


def eval_set(task: str, n_prompts: int, seed: int) -> EvalSet:
    """Review task: openings of held-out reviews (never in PPO's prompt set), the demo judge.
    Arithmetic and calculator: held-out test problems, 1 for the exact answer."""
    if task == "calculator":
        from lit_rlhf.demo.calculator import test_rows

        rows = test_rows()
        return EvalSet([r["prompt"] for r in rows[:n_prompts]], None,
                       "exact-answer rate (sampled episodes, the calculator tool loop)", rows, task)
    if task == "arithmetic":
        from lit_rlhf.demo.arithmetic import prepare_arithmetic

        rows = [json.loads(line) for line in prepare_arithmetic().test_file.read_text().splitlines()]
        sample = rows[:n_prompts]
        return EvalSet([r["prompt"] for r in sample],
                       lambda i, p, r: float(r.strip() == sample[i]["answer"]),
                       "exact-answer rate (sampled)", rows)
    from lit_rlhf.demo import make_prompts, prepare_demo, read_jsonl, sentiment_score
    from lit_rlhf.demo.datasets import PROMPT_MAX_WORDS, PROMPT_MIN_WORDS

    val = [r["text"] for r in read_jsonl(prepare_demo().val_file)][-n_prompts:]  # not used in PPO validation
    return EvalSet(make_prompts(val, PROMPT_MIN_WORDS, PROMPT_MAX_WORDS, seed=seed + 7),
                   lambda i, p, r: sentiment_score(p + r),
                   "demo judge score of prompt + response")


def evaluate(models: dict[str, Path], evals: EvalSet, max_new_tokens: int, seed: int) -> dict[str, dict]:
    """Every policy in ``models`` (``sft`` first) on the same prompts with the same sampler."""
    results = {}
    for name, model_dir in models.items():
        ref = None if name == "sft" else models["sft"]
        if evals.task == "calculator":  # multi-turn episodes with the real tool loop
            from lit_rlhf.demo.calculator import pipeline_results

            results[name] = pipeline_results(model_dir, ref, evals.rows, len(evals.prompts), seed)
            continue
        results[name] = sample_and_score(model_dir, evals.prompts, evals.score, max_new_tokens, seed, ref_dir=ref)
        if evals.rows:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from lit_rlhf.demo.arithmetic import greedy_accuracy

            model = AutoModelForCausalLM.from_pretrained(model_dir)
            results[name]["greedy_accuracy"] = greedy_accuracy(model, AutoTokenizer.from_pretrained(model_dir), evals.rows)
    return results


def write_samples(path: Path, evals: EvalSet, results: dict[str, dict], rows: int = 12) -> None:
    """samples.md: the first ``rows`` held-out prompts, answered by every policy."""
    names = list(results)
    lines = [f"# Samples: the same held-out prompts answered by each policy (score: {evals.judge})", "",
             "| prompt | " + " | ".join(n.upper() for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(evals.prompts[:rows]):
        cells = [prompt] + [f"{results[n]['responses'][i]} ({results[n]['scores'][i]:.2f})" for n in names]
        # One table row per prompt: every kind of line break (a small model can sample "\x1c"
        # or "\u2028") becomes a space, and "|" is escaped.
        lines.append("| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


# (title, stage, [(tag, label)], x axis) for every curve the report can show.
PANELS = [
    ("SFT loss", "sft", [("train/loss", "train"), ("val/loss", "val")], "step"),
    ("Reward model accuracy", "rm", [("val/accuracy", "val"), ("train/accuracy", "train")], "step"),
    ("PPO reward-model score", "ppo", [("env/score", "train rollouts"), ("val/score", "val")], "rollout"),
    ("PPO KL to SFT (nats/response)", "ppo", [("objective/kl", "train rollouts"), ("val/kl", "val")], "rollout"),
    ("PPO distinct-2 of responses", "ppo", [("rollout/distinct_2", "train rollouts")], "rollout"),
    ("DPO preference accuracy", "dpo", [("train/rewards/accuracy", "train"), ("val/rewards/accuracy", "val")], "step"),
    ("DPO reward margin", "dpo", [("train/rewards/margin", "train"), ("val/rewards/margin", "val")], "step"),
    ("GRPO score", "grpo", [("env/score", "train rollouts"), ("val/score", "val")], "rollout"),
    ("GRPO KL to SFT (nats/response)", "grpo", [("objective/kl", "train rollouts"), ("val/kl", "val")], "rollout"),
    ("GRPO tool use (multi-turn)", "grpo", [("episode/tool_use", "episodes with a call"),
                                            ("episode/tool_errors", "tool errors per episode")], "rollout"),
]


def write_report(path: Path, out: Path, results: dict[str, dict]) -> None:
    """report.png: one panel per training curve of the stages that ran, and one comparing the
    policies' held-out judge scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(title, [(label, _scalars(out / stage, tag)) for tag, label in series], xlabel)
              for title, stage, series, xlabel in PANELS if (out / stage / "lightning_logs").is_dir()]
    curves = [(t, [(lab, pts) for lab, pts in s if pts], x) for t, s, x in curves]
    curves = [c for c in curves if c[1]]
    cols = 3
    rows = (len(curves) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, series, xlabel) in zip(flat, curves):
        for label, points in series:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = flat[len(curves)]
    names = list(results)
    ax.bar(names, [results[n]["judge_score"] for n in names], color="tab:green")
    ax.set_title("Held-out judge score per policy")
    ax.grid(alpha=0.3, axis="y")
    for ax in flat[len(curves) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ the command


def main(argv: list[str] | None = None) -> None:
    from lit_rlhf.recipes import OneLineParser, find_config

    parser = OneLineParser(prog="lit-rlhf pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="everything goes under this folder")
    parser.add_argument("--task", choices=list(TASKS), default="reviews",
                        help="reviews: write positive movie reviews (judge: the demo lexicon); "
                             "arithmetic: answer '{a}+{b}=' exactly; calculator: answer '{a}*{b}=' "
                             "with a calculator tool (multi-turn)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods after SFT; reviews: ppo,dpo,grpo (default ppo,dpo); "
                             "arithmetic, calculator: grpo")
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        parser.add_argument(f"--{stage}_config", default=None,
                            help=f"config of the {stage} stage (default: configs/{stage}/<task config>)")
    parser.add_argument("--eval_prompts", type=int, default=128, help="held-out prompts every policy answers")
    parser.add_argument("--eval_max_new_tokens", type=int, default=None, help="default: 24 (reviews), 4 (arithmetic); calculator: 64 per turn, fixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars from the stages")
    opts = parser.parse_args(argv)

    allowed, default = TASKS[opts.task]
    opts.methods = [m.strip() for m in (opts.methods or default).split(",") if m.strip()]
    for m in opts.methods:
        if m not in allowed:
            parser.error(f"--methods {m}: not a method of --task {opts.task} (choose from {','.join(allowed)})")
    if not opts.methods:
        parser.error("--methods: name at least one method")
    recipe = "demo.yaml" if opts.task == "reviews" else f"{opts.task}.yaml"
    needs_rm = bool(USES_RM[opts.task] & set(opts.methods))
    for stage in ("sft", *(["rm"] if needs_rm else []), *opts.methods):
        name = f"{stage}_config"
        try:  # a file where it is named, else a recipe shipped in the package (the default)
            setattr(opts, name, str(find_config(getattr(opts, name) or f"{stage}/{recipe}").resolve()))
        except FileNotFoundError:
            parser.error(f"--{name} {getattr(opts, name)}: no such file (nor a recipe shipped with lit_rlhf)")
    if opts.eval_max_new_tokens is None:
        opts.eval_max_new_tokens = {"reviews": 24, "arithmetic": 4}.get(opts.task, 64)
    if opts.eval_prompts < 1:
        parser.error(f"--eval_prompts must be >= 1, got {opts.eval_prompts}")
    if Path(opts.output_dir).exists() and not Path(opts.output_dir).is_dir():
        parser.error(f"--output_dir {opts.output_dir}: exists and is not a directory")
    try:
        run(opts)
    except StageConfigError as err:
        if os.environ.get("LIT_RLHF_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as err:
        # The stage printed its own error above; end with one line naming the stage, no traceback.
        stage = next((a.split("=", 1)[1] for a in err.cmd if str(a).startswith("--trainer.default_root_dir=")), "?")
        print(f"error: pipeline stage {Path(stage).name} failed (exit code {err.returncode}); see its output above",
              file=sys.stderr)
        sys.exit(1)


class StageConfigError(ValueError):
    """A stage's config or inputs are wrong: found before any stage trains."""


def check_stages(stages: list[Stage], uses_rm: set[str], out: Path) -> None:
    """Every stage's config and inputs, checked before the first stage trains.

    Stages are built as their runs would build them (tokenizer, model config, data module;
    no weights). A method reads models the earlier stages have not written yet: it is built
    with stand-ins of the same architecture and tokenizer, the SFT stage's own model as the
    policy and (when it scores with the reward model) a folder whose config.json says
    "sequence classifier" as the reward model's path (what the reference checks read).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lit_rlhf_rm_stand_in_") as rm:
        (Path(rm) / "config.json").write_text(json.dumps({"architectures": ["StandInForSequenceClassification"]}))
        _check_stages(stages, uses_rm, out, rm)


def _check_stages(stages: list[Stage], uses_rm: set[str], out: Path, rm_stand_in: str) -> None:
    from lit_rlhf.cli.errors import USER_ERRORS, error_line
    from lit_rlhf.cli.lightning import check_fit_config
    from lit_rlhf.recipes import compose, config_chain

    sft_lm = compose(config_chain(stages[0].config)).get("model", {}).get("init_args", {}).get("lm", {})
    policy = {k: sft_lm.get(k) for k in ("name_or_path", "arch", "tokenizer")}
    for stage in stages:
        stand_ins = []
        if stage.name not in ("sft", "rm"):
            init = {"lm": policy}
            if stage.name in uses_rm:
                init["reward"] = {"init_args": {"path": rm_stand_in}}
            stand_ins = ["--config", json.dumps({"model": {"init_args": init}})]
        try:
            check_fit_config(["-c", str(stage.config), *stand_ins, f"--trainer.default_root_dir={out / stage.name}"])
        except USER_ERRORS as err:
            raise StageConfigError(f"pipeline stage {stage.name} ({stage.config}): {error_line(err)}") from err


def run(opts: argparse.Namespace) -> None:
    """Every stage, the evaluation and the reports, for parsed command-line options."""
    start = time.perf_counter()
    out = Path(opts.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--trainer.enable_progress_bar=false"] if opts.quiet else []
    uses_rm = USES_RM[opts.task] & set(opts.methods)
    stages = [Stage("sft", Path(opts.sft_config))]
    if uses_rm:
        stages.append(Stage("rm", Path(opts.rm_config)))
    for method in opts.methods:
        stages.append(Stage(method, Path(getattr(opts, f"{method}_config")),
                            upstream=["sft", "rm"] if method in uses_rm else ["sft"]))
    check_stages(stages, uses_rm, out)

    keys: dict[str, str] = {}
    models: dict[str, Path] = {}
    for stage in stages:
        if stage.name not in ("sft", "rm"):
            stage.overrides = [f"--model.init_args.lm.name_or_path={models['sft']}"]
            if stage.name in uses_rm:
                stage.overrides.append(f"--model.init_args.reward.init_args.path={models['rm']}")
        models[stage.name] = run_stage(stage, out, keys, extra)

    policies = {name: path for name, path in models.items() if name != "rm"}
    _log(f"evaluation: {', '.join(policies)} on {opts.eval_prompts} held-out prompts, same sampler and seed")
    evals = eval_set(opts.task, opts.eval_prompts, opts.seed)
    results = evaluate(policies, evals, opts.eval_max_new_tokens, opts.seed)
    summary = summarize(opts, out, models, results, evals)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    _write_json(out / "summary.json", summary)
    write_samples(out / "samples.md", evals, results)
    write_report(out / "report.png", out, results)
    print(format_summary(summary, out))


def summarize(opts, out: Path, models: dict[str, Path], results: dict[str, dict], evals: EvalSet) -> dict:
    """summary.json: the task and evaluation settings, then one block per stage."""
    summary: dict = {"task": opts.task, "methods": opts.methods,
                     "eval": {"prompts": len(evals.prompts), "max_new_tokens": opts.eval_max_new_tokens,
                              "seed": opts.seed, "judge": evals.judge}}
    for name, model_dir in models.items():
        done = json.loads((out / name / "DONE.json").read_text())
        block: dict = {"model_dir": str(model_dir), "train_s": done.get("wall_s")}
        if name in results:
            r = results[name]
            block.update({k: r[k] for k in ("judge_score", "kl_to_sft", "distinct_2", "mean_length")})
            if opts.task in ("arithmetic", "calculator"):
                block["distinct_2"] = None  # one-number answers have no word bigrams to count
            for key in ("greedy_accuracy", "tool_use_rate", "sampled_tool_use_rate", "greedy_trajectories"):
                if key in r:
                    block[key] = r[key]
        if name == "sft":
            val = _scalars(out / "sft", "val/loss")
            block["val_loss_start"] = val[0][1] if val else None
            block["val_loss_end"] = val[-1][1] if val else None
        elif name == "rm":
            block["val_accuracy"] = json.loads((model_dir / "lit_rlhf.json").read_text()).get("val_accuracy")
        elif name == "dpo":
            block["val_preference_accuracy"] = _tail_mean(_scalars(out / name, "val/rewards/accuracy"), 0)
        else:  # online methods: where training ended
            block["train_kl_final"] = _tail_mean(_scalars(out / name, "objective/kl"))
            block["train_score_final"] = _tail_mean(_scalars(out / name, "env/score"))
        summary[name] = block
    return summary


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename: a reader never sees half a summary."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def format_summary(summary: dict, out: Path) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    policies = ["sft", *summary["methods"]]
    lines = [""]
    s = summary["sft"]
    lines.append(f"sft val loss (first -> last): {f(s['val_loss_start'])} -> {f(s['val_loss_end'])}")
    if "rm" in summary:
        lines.append(f"rm held-out accuracy: {f(summary['rm']['val_accuracy'])}")
    extra = "greedy_accuracy" in s
    tools = "tool_use_rate" in s
    head = f"{'policy':<8} {'judge score':>12} {'KL to SFT':>10} {'distinct-2':>11} {'mean length':>12}"
    lines.append(head + (f" {'greedy acc':>11}" if extra else "") + (f" {'tool use':>9}" if tools else ""))
    for name in policies:
        b = summary[name]
        row = (f"{name:<8} {f(b['judge_score']):>12} {f(b['kl_to_sft']):>10} {f(b['distinct_2']):>11}"
               f" {b['mean_length']:>12.1f}")
        lines.append(row + (f" {f(b['greedy_accuracy']):>11}" if extra else "")
                     + (f" {f(b['tool_use_rate']):>9}" if tools else ""))
    lines.append(f"judge: {summary['eval']['judge']}, {summary['eval']['prompts']} held-out prompts; "
                 f"KL in nats per response")
    lines.append(f"wall time {summary['wall_s']:.0f} s; {out}/summary.json, report.png, samples.md;"
                 f" tensorboard --logdir {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
