"""Language-modelling losses: summed token cross-entropy and the causal-LM (SFT) loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class LMLossStats(NamedTuple):
    loss: torch.Tensor
    """Mean next-token cross-entropy over counted tokens, scalar."""
    n_tokens: torch.Tensor
    """Number of counted (label != -100) target tokens, scalar long."""
    n_correct: torch.Tensor | None
    """How many counted tokens the argmax predicts exactly, scalar long (None unless asked)."""


# Rows of logits upcast to float32 at a time: bounds the temporary (16 MB) whatever N and V.
_CHUNK_ELEMENTS = 1 << 22


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy computed in float32 a chunk of rows at a time.

    ``F.cross_entropy(logits.float(), ...)`` materializes the (N, V) logits in float32, its
    log-softmax output, a zero-filled (N, V) gradient for the NLL and a float32 gradient
    that is then cast back: four full-size tensors for bf16 logits. Here the forward keeps
    only the (N,) logsumexp and the backward writes softmax - one_hot straight into a
    gradient of the logits' own dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        rows = max(1, _CHUNK_ELEMENTS // max(logits.size(1), 1))
        lse = torch.cat([chunk.float().logsumexp(-1) for chunk in logits.split(rows)])
        mask = targets != ignore_index
        safe = targets.masked_fill(~mask, 0)
        target_logits = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, mask, lse)
        ctx.rows = rows
        # where, not a product: a non-finite ignored row must not turn the sum into NaN.
        return torch.where(mask, lse - target_logits, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, safe, mask, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        scale = torch.where(mask, grad.float(), 0.0)  # (N,): ignored rows get a zero gradient
        in_place = logits.dtype == torch.float32  # then work straight in the output
        for start in range(0, logits.size(0), ctx.rows):
            end = min(start + ctx.rows, logits.size(0))
            p = out[start:end] if in_place else logits.new_empty(end - start, logits.size(1), dtype=torch.float32)
            torch.sub(logits[start:end], lse[start:end, None], out=p).exp_()
            p.scatter_add_(1, safe[start:end, None], p.new_full((end - start, 1), -1.0))
            p.mul_(scale[start:end, None])
            if not in_place:
                out[start:end] = p
        return out, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed next-token cross-entropy in float32, whatever the logits' dtype.

    Equals ``F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="sum")``
    (bf16 log-softmax over a large vocabulary loses precision, so the math is float32), but
    never holds more than one chunk of the logits in float32.

    Args:
        logits: (N, V). targets: (N,) ids, ``ignore_index`` where no loss is wanted.

    Returns:
        Scalar float32 sum over the counted rows.
    """
    return _CrossEntropySum.apply(logits, targets, ignore_index)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, count_correct: bool = False
) -> LMLossStats:
    """Next-token cross-entropy: position t predicts ``labels[t + 1]``.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, ``ignore_index`` where no loss is wanted (prompt tokens,
            the first token of a packed document).
        count_correct: also count argmax hits (an extra pass over the logits: validation only).

    Returns:
        :class:`LMLossStats`; ``loss`` is NaN-free 0 when no token counts (a chunk made only
        of prompt tokens) so that it adds nothing to the gradient.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits copies them, and its
    # backward writes a zero-filled full-size gradient. The last position gets no target.
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    mask = targets != ignore_index
    n_tokens = mask.sum()
    loss_sum = cross_entropy_sum(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index)
    loss = loss_sum / n_tokens.clamp(min=1)
    n_correct = None
    if count_correct:
        with torch.no_grad():
            n_correct = ((logits.argmax(-1) == targets) & mask).sum()
    return LMLossStats(loss, n_tokens, n_correct)
