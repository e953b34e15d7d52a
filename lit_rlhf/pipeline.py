"""The whole RLHF pipeline in one command: SFT -> merge -> reward model -> PPO -> evaluation.

    python train.py pipeline --output_dir runs/pipeline       (or: lit-rlhf pipeline ...)

Each stage runs the same config file as its single-stage command (``configs/<stage>/demo.yaml``
by default), in its own process, with its outputs under ``<output_dir>/<stage>/``:

    sft/lightning_logs/...   sft/model/      (merged, plain HF causal LM)
    rm/lightning_logs/...    rm/model/       (plain HF sequence classifier + lit_rlhf.json)
    ppo/lightning_logs/...   ppo/model/      (merged policy)
    summary.json  report.png  samples.md

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)


def stage_key(stage: Stage, done: dict[str, str]) -> str:
    """Hash of everything a stage's result depends on."""
    from lit_rlhf.config_files import config_chain

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
    subprocess.run(cmd, cwd=REPO, check=True)
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


@torch.no_grad()
def sample_and_score(model_dir: Path, prompts: list[str], max_new_tokens: int, seed: int,
                     ref_dir: Path | None = None) -> dict:
    """Sample one response per prompt from a plain HF model; judge it; KL to ``ref_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_rlhf.data.prompts import left_pad
    from lit_rlhf.demo import sentiment_score
    from lit_rlhf.models.heads import PolicyWithValueHead
    from lit_rlhf.modules.rollout import decode_responses, evaluate_actions, generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    ids, mask = left_pad(tokenizer(prompts)["input_ids"], tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    rollout = generate(policy, ids, mask, torch.full((len(prompts),), max_new_tokens),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=gen)
    responses = decode_responses(tokenizer, rollout)
    scores = [sentiment_score(p + r) for p, r in zip(prompts, responses)]
    result = {"responses": responses, "score": sum(scores) / len(scores), "scores": scores}
    if ref_dir is not None:
        logp, _, _ = evaluate_actions(policy, rollout, with_values=False)
        ref = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(ref_dir).eval())
        ref_logp, _, _ = evaluate_actions(ref, rollout, with_values=False)
        result["kl"] = float(((logp - ref_logp) * rollout.response_mask).sum(-1).mean())
    return result


def evaluate(out: Path, n_prompts: int, max_new_tokens: int, seed: int) -> dict:
    """Score SFT and PPO policies with the demo judge on the same held-out prompts."""
    from lit_rlhf.demo import make_prompts, prepare_demo, read_jsonl

    val = [r["text"] for r in read_jsonl(prepare_demo().val_file)][-n_prompts:]  # not used in PPO validation
    prompts = make_prompts(val, 2, 8, seed=seed + 7)
    before = sample_and_score(out / "sft" / "model", prompts, max_new_tokens, seed)
    after = sample_and_score(out / "ppo" / "model", prompts, max_new_tokens, seed, ref_dir=out / "sft" / "model")
    return {"prompts": prompts, "before": before, "after": after}


def write_samples(path: Path, evaluation: dict, rows: int = 12) -> None:
    lines = ["# Samples: SFT model vs PPO policy (same held-out prompts, demo judge score)", "",
             "| prompt | SFT response | score | PPO response | score |", "|---|---|---|---|---|"]
    b, a = evaluation["before"], evaluation["after"]
    for i, prompt in enumerate(evaluation["prompts"][:rows]):
        cells = [prompt, b["responses"][i], f"{b['scores'][i]:.2f}", a["responses"][i], f"{a['scores'][i]:.2f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_report(path: Path, out: Path) -> None:
    """report.png: SFT loss, RM accuracy, PPO score and KL curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("SFT loss", "sft", [("train/loss", "train"), ("val/loss", "val")], "step"),
        ("Reward model accuracy", "rm", [("val/accuracy", "val"), ("train/accuracy", "train")], "step"),
        ("PPO reward-model score", "ppo", [("env/score", "train rollouts"), ("val/score", "val")], "rollout"),
        ("PPO KL to reference (nats)", "ppo", [("objective/kl", "train rollouts"), ("val/kl", "val")], "rollout"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, stage, series, xlabel) in zip(axes.flat, panels):
        for tag, label in series:
            points = _scalars(out / stage, tag)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from lit_rlhf.export import OneLineParser

    parser = OneLineParser(prog="lit-rlhf pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="everything goes under this folder")
    parser.add_argument("--sft_config", default=str(REPO / "configs/sft/demo.yaml"))
    parser.add_argument("--rm_config", default=str(REPO / "configs/rm/demo.yaml"))
    parser.add_argument("--ppo_config", default=str(REPO / "configs/ppo/demo.yaml"))
    parser.add_argument("--eval_prompts", type=int, default=128, help="held-out prompts for score_before/after")
    parser.add_argument("--eval_max_new_tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars from the stages")
    opts = parser.parse_args(argv)
    for name in ("sft_config", "rm_config", "ppo_config"):
        if not Path(getattr(opts, name)).is_file():
            parser.error(f"--{name} {getattr(opts, name)}: no such file")
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


def check_stages(sft: Stage, rm: Stage, ppo: Stage, out: Path) -> None:
    """Every stage's config and inputs, checked before the first stage trains.

    SFT and RM are built as their runs would build them (tokenizer, model config, data
    module; no weights). PPO reads models the earlier stages have not written yet: it is
    built with stand-ins of the same architecture and tokenizer, the SFT stage's own model
    as the policy and the output folder as the reward model's path, which only has to exist.
    """
    from lit_rlhf.lightning_cli import USER_ERRORS, check_fit_config, error_line
    from lit_rlhf.config_files import compose, config_chain

    sft_lm = compose(config_chain(sft.config)).get("model", {}).get("init_args", {}).get("lm", {})
    policy = {k: sft_lm.get(k) for k in ("name_or_path", "arch", "tokenizer")}
    stand_ins = {"sft": [], "rm": [], "ppo": [
        "--config", json.dumps({"model": {"init_args": {"lm": policy, "reward": {"init_args": {"path": str(out)}}}}}),
    ]}
    for stage in (sft, rm, ppo):
        try:
            check_fit_config(["-c", str(stage.config), *stand_ins[stage.name],
                              f"--trainer.default_root_dir={out / stage.name}"])
        except USER_ERRORS as err:
            raise StageConfigError(f"pipeline stage {stage.name} ({stage.config}): {error_line(err)}") from err


def run(opts: argparse.Namespace) -> None:
    """Every stage, the evaluation and the reports, for parsed command-line options."""
    start = time.perf_counter()
    out = Path(opts.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--trainer.enable_progress_bar=false"] if opts.quiet else []
    keys: dict[str, str] = {}
    sft, rm = Stage("sft", Path(opts.sft_config)), Stage("rm", Path(opts.rm_config))
    ppo = Stage("ppo", Path(opts.ppo_config), upstream=["sft", "rm"])
    check_stages(sft, rm, ppo, out)
    sft_model = run_stage(sft, out, keys, extra)
    rm_model = run_stage(rm, out, keys, extra)
    ppo.overrides = [f"--model.init_args.lm.name_or_path={sft_model}",
                     f"--model.init_args.reward.init_args.path={rm_model}"]
    ppo_model = run_stage(ppo, out, keys, extra)

    _log("evaluation: SFT model vs PPO policy on held-out prompts (demo judge)")
    evaluation = evaluate(out, opts.eval_prompts, opts.eval_max_new_tokens, opts.seed)
    sft_val = _scalars(out / "sft", "val/loss")
    rm_meta = json.loads((rm_model / "lit_rlhf.json").read_text())
    summary = {
        "sft": {"val_loss_start": sft_val[0][1] if sft_val else None,
                "val_loss_end": sft_val[-1][1] if sft_val else None, "model_dir": str(sft_model)},
        "rm": {"val_accuracy": rm_meta.get("val_accuracy"), "model_dir": str(rm_model)},
        "ppo": {"score_before": evaluation["before"]["score"], "score_after": evaluation["after"]["score"],
                "kl": evaluation["after"]["kl"], "model_dir": str(ppo_model)},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_samples(out / "samples.md", evaluation)
    write_report(out / "report.png", out)
    print(format_summary(summary, out))


def format_summary(summary: dict, out: Path) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    s, r, p = summary["sft"], summary["rm"], summary["ppo"]
    return "\n".join([
        "",
        f"{'stage':<6} {'metric':<28} value",
        f"{'sft':<6} {'val loss (first -> last)':<28} {f(s['val_loss_start'])} -> {f(s['val_loss_end'])}",
        f"{'rm':<6} {'held-out accuracy':<28} {f(r['val_accuracy'])}",
        f"{'ppo':<6} {'judge score (SFT -> PPO)':<28} {f(p['score_before'])} -> {f(p['score_after'])}",
        f"{'ppo':<6} {'KL to SFT (nats/response)':<28} {f(p['kl'])}",
        f"wall time {summary['wall_s']:.0f} s; {out}/summary.json, report.png, samples.md;"
        f" tensorboard --logdir {out}",
    ])


if __name__ == "__main__":
    main()
