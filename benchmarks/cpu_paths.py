"""Each CPU-only speed path on and off, at the ``small-cpu`` shape, in interleaved repeats.

    python benchmarks/cpu_paths.py --workload small-cpu --out-dir benchmarks/results
    python benchmarks/cpu_paths.py --workload small-cpu-smoke --repeats 2 --out-dir /tmp   # the code, in seconds

The two paths of :mod:`lit_rlhf.models.cpu_paths` stay only if each saves at least 5% of its
stage's step at a realistic shape (issue 41). Measured in one process, the path switched with
``LIT_RLHF_CPU_PATHS`` between calls (read at every use), so that both arms share the model, the
data and the machine's state:

* ``rm_last_block_rows``: one reward-model training step (the packed forward, the pairwise loss,
  backward, AdamW) on the workload's RM batches (``rm``: random pairs, each batch packed into
  one row as the RM stage does). Both arms step the same sequence of batches.
* ``onednn_decode_linears``: one rollout's ``generate`` (sampling alone: the path runs nowhere
  else, so what it saves in a stage's step is what it saves here) at PPO's shape (``ppo``) and at
  GRPO-varlen's (``grpo``'s prompts and generations, ``grpo_varlen``'s cap), with the EOS bias of
  the workload, so responses end at EOS as in the benchmark; the same prompts and generator seed
  in both arms.

Interleaved: repeat r runs on then off for even r, off then on for odd r (ABBA...), after one
warm-up call of each arm; the figure of an arm is the median over the repeats. Printed: each
median, the ratio on/off and the saving in seconds; with ``--stage-steps FILE`` (a ``run.py``
or ``compare.py`` JSON of the same workload and precision) also the saving as a share of the
stage's step (``rm_pairs_per_s``, ``ppo_episodes_per_s``, ``grpo_varlen_step_s``). JSON goes to
``<out-dir>/cpu-paths-<workload>-<date>.json``. fp32 only (the oneDNN path does not run under
autocast), ``threads`` of the workload.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from lit_rlhf.models.cpu_paths import ENV_VAR  # noqa: E402


def _arms(repeats: int):
    """(repeat, path on?) in ABBA order, after one warm-up of each arm (repeat -1)."""
    yield from ((-1, True), (-1, False))
    for r in range(repeats):
        yield from ((r, True), (r, False)) if r % 2 == 0 else ((r, False), (r, True))


def _switch(path: str, on: bool) -> None:
    """Only ``path`` on, or every path off: the other path never runs in the measured call anyway."""
    os.environ[ENV_VAR] = path if on else "0"


def _summary(on: list[float], off: list[float]) -> dict:
    a, b = statistics.median(on), statistics.median(off)
    return {"on_s": round(a, 4), "off_s": round(b, 4), "on_over_off": round(a / b, 4), "saved_s": round(b - a, 4),
            "on_each_s": [round(t, 4) for t in on], "off_each_s": [round(t, 4) for t in off]}


def measure_rm(w: dict, repeats: int) -> dict:
    """Seconds of one reward-model training step, the last-block MLP cut on and off."""
    from pairs import random_pairs

    from lit_rlhf.data.preference import Pair, pack_pairs
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import RewardModule
    from lit_rlhf.objectives.preference import pairwise_loss

    module = RewardModule(ModelConfig(arch=w["arch"], tokenizer="demo"))
    module.configure_model()
    module.train()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-6)
    size = w["rm"]["batch_size"]
    pairs = [Pair(c, r, 0.0, 0) for c, r in random_pairs(dict(w, warmup=0, timed=repeats + 1))]
    batches = [pack_pairs(pairs[i:i + size], 0) for i in range(0, len(pairs), size)]
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat, on in _arms(repeats):
        _switch("rm_last_block_rows", on)
        batch = batches[repeat + 1]  # the same batch for both arms of a repeat
        start = time.perf_counter()
        scores = module.forward_packed(batch["input_ids"], batch["position_ids"], batch["lengths"])
        chosen, rejected = scores.chunk(2)
        pairwise_loss(chosen, rejected).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if repeat >= 0:
            times[on].append(elapsed)
        print(f"[cpu-paths] rm repeat {repeat} {'on ' if on else 'off'} {elapsed:.3f} s "
              f"({int(batch['lengths'].sum())} tokens)", file=sys.stderr, flush=True)
    return {"rm_step": {**_summary(times[True], times[False]), "pairs_per_step": size}}


def measure_sampling(w: dict, repeats: int) -> dict:
    """Seconds of one ``generate`` at PPO's and GRPO-varlen's rollout shapes, oneDNN linears on and off."""
    from lit_rlhf.models import ModelConfig, PolicyWithValueHead, load_model, load_tokenizer
    from lit_rlhf.modules.rollout import generate

    tokenizer = load_tokenizer("demo")
    lm = load_model(ModelConfig(arch=w["arch"], tokenizer="demo"), tokenizer, dropout=False)
    eos = tokenizer.eos_token_id
    policy = PolicyWithValueHead(lm, value_head=False).eval()
    vocab = w["arch"]["vocab_size"]
    shapes = {"ppo_generate": (w["ppo"]["batch_size"], 1, w["ppo"]["prompt_len"], w["ppo"]["new_tokens"],
                               w["ppo"].get("eos_bias")),
              "grpo_varlen_generate": (w["grpo"]["prompts"], w["grpo"]["generations"], w["grpo"]["prompt_len"],
                                       w["grpo_varlen"]["new_tokens"], w["grpo_varlen"]["eos_bias"])}
    out = {}
    for name, (prompts, generations, prompt_len, cap, bias) in shapes.items():
        hook = None
        if bias is not None:  # responses end at EOS, as in the benchmark's stage
            hook = lm.get_output_embeddings().register_forward_hook(
                lambda mod, args, logits, bias=bias: logits.index_add(
                    -1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), bias, dtype=logits.dtype)))
        query = torch.randint(2, vocab, (prompts, prompt_len), generator=torch.Generator().manual_seed(0))
        times: dict[bool, list[float]] = {True: [], False: []}
        lengths: dict[bool, list[float]] = {True: [], False: []}
        for repeat, on in _arms(repeats):
            _switch("onednn_decode_linears", on)
            start = time.perf_counter()
            rollout = generate(policy, query, torch.ones_like(query), torch.full((prompts * generations,), cap),
                               eos_token_id=eos if bias is not None else None, pad_token_id=tokenizer.pad_token_id,
                               generator=torch.Generator().manual_seed(repeat + 1), num_generations=generations)
            elapsed = time.perf_counter() - start
            length = float(rollout.response_mask.float().sum(-1).mean())
            if repeat >= 0:
                times[on].append(elapsed)
                lengths[on].append(length)
            print(f"[cpu-paths] {name} repeat {repeat} {'on ' if on else 'off'} {elapsed:.3f} s "
                  f"(mean length {length:.1f})", file=sys.stderr, flush=True)
        if hook is not None:
            hook.remove()
        # Both arms should sample the same responses (same seed per repeat; rounding may flip a rare token).
        out[name] = {**_summary(times[True], times[False]), "rows": prompts * generations, "cap": cap,
                     "mean_length_on": round(statistics.mean(lengths[True]), 2),
                     "mean_length_off": round(statistics.mean(lengths[False]), 2)}
    return out


def stage_shares(results: dict, w: dict, steps: dict) -> None:
    """Add each saving as a share of its stage's step, from a run.py/compare.py JSON ``steps``."""
    stage_step = {"rm_step": w["rm"]["batch_size"] / steps["rm_pairs_per_s"] if "rm_pairs_per_s" in steps else None,
                  "ppo_generate": w["ppo"]["batch_size"] / steps["ppo_episodes_per_s"]
                  if "ppo_episodes_per_s" in steps else None,
                  "grpo_varlen_generate": steps.get("grpo_varlen_step_s")}
    for name, figures in results.items():
        if isinstance(figures, dict) and stage_step.get(name):
            figures["stage_step_s"] = round(stage_step[name], 3)
            figures["saved_share_of_step"] = round(figures["saved_s"] / stage_step[name], 4)


def main() -> None:
    from run import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="small-cpu", choices=sorted(k for k in WORKLOADS if "cpu" in k))
    parser.add_argument("--repeats", type=int, default=6, help="timed calls of each arm (after one warm-up each)")
    parser.add_argument("--paths", default="rm_last_block_rows,onednn_decode_linears", help="which to measure")
    parser.add_argument("--stage-steps", type=Path, help="a run.py/compare.py JSON of the workload (fp32): step shares")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    opts = parser.parse_args()
    w = WORKLOADS[opts.workload]
    torch.set_num_threads(w["threads"])
    torch.manual_seed(0)
    previous = os.environ.get(ENV_VAR)
    results: dict = {"workload": opts.workload, "torch_threads": w["threads"], "repeats": opts.repeats,
                     "precision": "32-true", "torch": torch.__version__}
    start = time.perf_counter()
    try:
        paths = opts.paths.split(",")
        if "rm_last_block_rows" in paths:
            results.update(measure_rm(w, opts.repeats))
        if "onednn_decode_linears" in paths:
            results.update(measure_sampling(w, opts.repeats))
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
    if opts.stage_steps:
        stage_shares(results, w, json.loads(opts.stage_steps.read_text()))
    results["wall_s"] = round(time.perf_counter() - start, 1)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    path = opts.out_dir / f"cpu-paths-{opts.workload}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    for name, f in results.items():
        if isinstance(f, dict):
            share = (f" = {f['saved_share_of_step']:.1%} of a {f['stage_step_s']:.2f} s step"
                     if "stage_step_s" in f else "")
            print(f"{name}: on {f['on_s']:.3f} s, off {f['off_s']:.3f} s (medians), on/off {f['on_over_off']:.3f}, "
                  f"saved {f['saved_s']:.3f} s{share}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
