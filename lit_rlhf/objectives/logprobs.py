"""Per-token log-probabilities and entropies of sampled tokens, from logits.

Shapes: ``B`` sequences, ``T`` positions, ``V`` the vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_rlhf.objectives.masked import acc_dtype

EntropyMode = Literal["grad", "detached", "skip"]


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, entropy: EntropyMode = "grad"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``labels`` and the entropy of ``softmax(logits)``, per position.

    Args:
        logits: (B, T, V), any floating dtype.
        labels: (B, T) valid token ids (pad with the pad token id, not -100, and mask later).
        entropy: ``grad`` (differentiable, for an entropy bonus), ``detached`` (a statistic:
            no autograd graph over (T, V)) or ``skip`` (returns None).

    Returns:
        logprobs (B, T) and entropy (B, T) or None, in float32 (float64 for float64 logits);
        the log-probs are differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    acc = acc_dtype(logits.dtype)
    if logits.shape[0] == 0:
        empty = logits.new_zeros(labels.shape, dtype=acc)
        return empty, None if entropy == "skip" else empty
    # gather - logsumexp never materialises the (T, V) log-softmax, and going row by row keeps
    # the float32 upcast of bf16 logits (the big allocation) to one (T, V) slice at a time.
    logps, entropies = [], []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.to(acc)
        lse = torch.logsumexp(row, dim=-1)  # (T,), shared by both outputs
        logps.append(row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1) - lse)
        if entropy != "skip":
            with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
                # H = lse - sum_v p_v l_v, which avoids log(p) = -inf for p underflowing to 0.
                entropies.append(lse - (torch.exp(row - lse.unsqueeze(-1)) * row).sum(-1))
    return torch.stack(logps), torch.stack(entropies) if entropies else None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log-probs (see :func:`logprobs_and_entropy`)."""
    return logprobs_and_entropy(logits, labels, entropy="skip")[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: (B, T, V) -> (B, T), float32 or float64."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, labels)[1]
