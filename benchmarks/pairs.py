"""The benchmarks' random preference pairs and prompts, shared by run.py and trl_baseline.py.

Kept apart from run.py, which imports Lightning: trl_baseline's child processes measure TRL
and must not load it.
"""

from __future__ import annotations

import torch


def random_pairs(w: dict) -> list[tuple[list[int], list[int]]]:
    """(warmup + timed) * batch_size pairs of token lists, each side ``min_len..max_len`` long.

    Lengths first, then tokens, from one generator seeded 0, so that both scripts see the
    same pairs.
    """
    cfg = w["rm"]
    g = torch.Generator().manual_seed(0)
    n = (w["warmup"] + w["timed"]) * cfg["batch_size"]
    lengths = torch.randint(cfg["min_len"], cfg["max_len"] + 1, (2 * n,), generator=g).tolist()
    vocab = w["arch"]["vocab_size"]
    return [(torch.randint(2, vocab, (lengths[2 * i],), generator=g).tolist(),
             torch.randint(2, vocab, (lengths[2 * i + 1],), generator=g).tolist()) for i in range(n)]


def random_dpo_pairs(w: dict) -> list[tuple[list[int], list[int], list[int]]]:
    """(warmup + timed) * batch_size (prompt, chosen, rejected) token lists for the DPO stage.

    Lengths uniform in ``prompt_min..prompt_max`` and ``response_min..response_max`` (both
    ends included), drawn first, then the tokens, from one generator seeded 0.
    """
    cfg = w["dpo"]
    g = torch.Generator().manual_seed(0)
    n = (w["warmup"] + w["timed"]) * cfg["batch_size"]
    prompts = torch.randint(cfg["prompt_min"], cfg["prompt_max"] + 1, (n,), generator=g).tolist()
    responses = torch.randint(cfg["response_min"], cfg["response_max"] + 1, (2 * n,), generator=g).tolist()
    vocab = w["arch"]["vocab_size"]

    def tokens(length: int) -> list[int]:
        return torch.randint(2, vocab, (length,), generator=g).tolist()

    return [(tokens(prompts[i]), tokens(responses[2 * i]), tokens(responses[2 * i + 1])) for i in range(n)]


def random_prompts(w: dict) -> list[list[int]]:
    """(warmup + timed) * prompts prompt token lists of ``prompt_len`` for the GRPO stage, seed 0."""
    cfg = w["grpo"]
    g = torch.Generator().manual_seed(0)
    n = (w["warmup"] + w["timed"]) * cfg["prompts"]
    return torch.randint(2, w["arch"]["vocab_size"], (n, cfg["prompt_len"]), generator=g).tolist()


def low_id_fraction(ids, threshold: int = 4000) -> float:
    """The GRPO stage's cheap rule-based reward: the fraction of response ids below ``threshold``."""
    ids = list(ids)
    return sum(1 for t in ids if t < threshold) / max(len(ids), 1)


def with_long_prompts(bench, w: dict, *args) -> dict:
    """Run a GRPO stage ``bench(w, *args)`` with ``w["grpo_long"]["prompt_len"]``-token prompts;
    its figures come back renamed ``grpo_long_*``."""
    long = dict(w, grpo=dict(w["grpo"], prompt_len=w["grpo_long"]["prompt_len"]))
    return {key.replace("grpo_", "grpo_long_", 1): v for key, v in bench(long, *args).items()}
