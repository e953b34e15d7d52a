"""Per-token log-probabilities and entropies of sampled tokens, from logits or from the last
hidden states through the LM head in token chunks (:func:`head_logprobs`: the whole (tokens x
vocabulary) logits never exist at once).

Shapes: ``B`` sequences, ``T`` positions, ``V`` the vocabulary, ``N`` tokens, ``H`` hidden.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch.utils.checkpoint import checkpoint

from lit_rlhf.objectives.masked import acc_dtype

EntropyMode = Literal["grad", "detached", "skip"]

CHUNK_ELEMENTS = 2**24
"""Logits processed per piece (16M: 64 MiB in float32), whole rows at a time."""


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
    # One fused log_softmax per piece, then a gather: on CPU this measured 2-4x faster forward
    # and backward than gather - logsumexp (whose forward and backward each make several passes
    # over (T, V)), and keeps the same one (T, V) float32 tensor for the backward. Going a few
    # rows at a time bounds that tensor and the entropy's temporaries to about CHUNK_ELEMENTS;
    # small shapes run in one piece (row by row, the autograd graph of 32 x 32 x 8000 logits
    # measured several times slower, for identical results).
    rows = max(1, CHUNK_ELEMENTS // max(1, logits[0].numel()))
    logps, entropies = [], []
    for chunk_logits, chunk_labels in zip(logits.split(rows), labels.split(rows)):
        logp = torch.log_softmax(chunk_logits, dim=-1, dtype=acc)  # (rows, T, V), the upcast fused in
        logps.append(logp.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1))
        if entropy != "skip":
            entropies.append(_entropy(logp, differentiable=entropy == "grad" and torch.is_grad_enabled()))
    return torch.cat(logps), torch.cat(entropies) if entropies else None


def head_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    vocab: int,
    temperature: float = 1.0,
    entropy: EntropyMode = "skip",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``labels`` and the entropy under ``softmax(head(hidden) / temperature)``,
    computed a chunk of tokens at a time.

    At a real vocabulary the logits are the largest tensors of an RL step: 16k response tokens x
    151,936 ids are 9.7 GB in float32, and the log-softmax, its gradient and the entropy's
    temporaries as much again each. Here at most ``CHUNK_ELEMENTS // vocab`` tokens (at least one)
    have logits at a time. With gradients and more than one chunk, each chunk runs under
    activation checkpointing: its backward recomputes its logits from the (chunk, H) hidden
    states (one more head matmul per token) instead of keeping them. When every token fits in
    one chunk (small batches, small vocabularies) the logits are kept, as without chunking.

    Args:
        hidden: (N, H) hidden states at the positions that predict ``labels``.
        head: the LM head, (n, H) -> (n, V) logits (a module: LoRA on it, or a sharded root's
            gathered weight, is used as in the model's own forward).
        labels: (N,) token ids.
        vocab: V, the head's output size (sizes the chunks).
        temperature: the sampler's; the log-probs are those of the distribution sampled from.
        entropy: as in :func:`logprobs_and_entropy`.

    Returns:
        (N,) log-probs and (N,) entropies or None, float32 (float64 for a float64 head).
    """
    if hidden.shape[:-1] != labels.shape or hidden.dim() != 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (N, H) with labels (N,), got {tuple(labels.shape)}")
    rows = max(1, CHUNK_ELEMENTS // max(1, vocab))

    def piece(h: torch.Tensor, y: torch.Tensor):
        logits = head(h)
        if temperature != 1.0:
            logits = logits / temperature
        return logprobs_and_entropy(logits, y, entropy)

    recompute = torch.is_grad_enabled() and hidden.size(0) > rows
    logps, entropies = [], []
    for h, y in zip(hidden.split(rows), labels.split(rows)):
        # Non-reentrant checkpointing: only the chunk's hidden states are kept for the backward.
        logp, ent = checkpoint(piece, h, y, use_reentrant=False) if recompute else piece(h, y)
        logps.append(logp)
        entropies.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=acc_dtype(hidden.dtype))
        return empty, None if entropy == "skip" else empty
    return torch.cat(logps), None if entropy == "skip" else torch.cat(entropies)


def _entropy(logp: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """(..., V) log-probabilities -> (...) entropy ``-sum_v p_v log p_v``.

    A logit of -inf has p = 0 and log p = -inf, a term of 0 * -inf = NaN: the differentiable
    form clamps log p to the most negative float (the term and its gradient 0); the statistic
    drops those terms with ``nansum`` and multiplies in place (no autograd graph to keep).
    """
    if differentiable:
        return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    with torch.no_grad():
        return -logp.exp().mul_(logp).nansum(-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log-probs (see :func:`logprobs_and_entropy`)."""
    return logprobs_and_entropy(logits, labels, entropy="skip")[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: (B, T, V) -> (B, T), float32 or float64."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, labels)[1]


def response_token_mask(position_ids: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(N,) bool, True at the response tokens of a packed row: each sequence's tokens from
    position ``max(prompt_length, 1)`` on (see :func:`packed_sequence_logprobs` for the shapes)."""
    return position_ids >= torch.repeat_interleave(prompt_lengths.clamp(min=1), lengths)


def packed_sequence_logprobs(
    token_logprobs: torch.Tensor,
    position_ids: torch.Tensor,
    lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the log-probs of each sequence's response tokens in a packed row.

    Args:
        token_logprobs: (N,) ``log p(token t | its sequence's tokens before t)``; the value at
            a sequence's first position is ignored (nothing predicts it).
        position_ids: (N,) positions, restarting at 0 where a sequence starts.
        lengths: (S,) sequence lengths, summing to N.
        prompt_lengths: (S,) leading tokens of each sequence that are not scored (>= 1 is
            implied: a first token has no prediction).

    Returns:
        (S,) summed response log-probs, and (S,) the number of response tokens.
    """
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    scored = response_token_mask(position_ids, lengths, prompt_lengths).to(token_logprobs.dtype)
    sums = token_logprobs.new_zeros(len(lengths)).index_add_(0, sequence, token_logprobs * scored)
    counts = token_logprobs.new_zeros(len(lengths)).index_add_(0, sequence, scored)
    return sums, counts
