"""Time GRPO's scoring passes with and without running each group's shared prompt once.

    python benchmarks/shared_prompts.py --prompt-lens 12,128 --out shared.json

The tiny-cpu workload's GRPO shapes (4 prompts x 8 generations, 32 new tokens, the 8.3M Llama,
full fine-tuning): for each prompt length, the reference forward (no gradients) and the policy
forward + backward of ``evaluate_actions`` over one sampled rollout, ``share_prompts`` off and
on, each the median of ``--repeats`` timings after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    from run import WORKLOADS

    from lit_rlhf.models import ModelConfig, PolicyWithValueHead, load_model, load_tokenizer
    from lit_rlhf.modules.rollout import evaluate_actions, generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lens", default="12,128", help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True, help="JSON file to write")
    opts = parser.parse_args()
    w = WORKLOADS["tiny-cpu"]
    cfg = w["grpo"]
    torch.set_num_threads(w["threads"])
    torch.manual_seed(0)
    lm = load_model(ModelConfig(arch=w["arch"], tokenizer="demo"), load_tokenizer("demo"), dropout=False)
    policy = PolicyWithValueHead(lm, value_head=False)
    results: dict = {"workload": "tiny-cpu", "torch_threads": w["threads"], "repeats": opts.repeats}
    for prompt_len in map(int, opts.prompt_lens.split(",")):
        g = torch.Generator().manual_seed(0)
        query = torch.randint(2, w["arch"]["vocab_size"], (cfg["prompts"], prompt_len), generator=g)
        lengths = torch.full((cfg["prompts"] * cfg["generations"],), cfg["new_tokens"])
        policy.eval()
        rollout = generate(policy, query, torch.ones_like(query), lengths, eos_token_id=None, pad_token_id=0,
                           generator=g, num_generations=cfg["generations"])
        policy.train()
        for share in (False, True):
            ref_s, train_s = [], []
            for _ in range(opts.repeats + 1):
                start = time.perf_counter()
                with torch.no_grad():
                    evaluate_actions(policy, rollout, with_values=False, share_prompts=share)
                middle = time.perf_counter()
                logprobs = evaluate_actions(policy, rollout, with_values=False, entropy="detached",
                                            share_prompts=share)[0]
                logprobs.sum().backward()
                policy.zero_grad()
                ref_s.append(middle - start)
                train_s.append(time.perf_counter() - middle)
            name = f"prompt{prompt_len}_{'shared' if share else 'full'}"
            results[f"reference_s_{name}"] = round(statistics.median(ref_s[1:]), 3)
            results[f"forward_backward_s_{name}"] = round(statistics.median(train_s[1:]), 3)
    Path(opts.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
