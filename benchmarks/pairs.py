"""The reward-model benchmark's random preference pairs, shared by run.py and trl_baseline.py.

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
