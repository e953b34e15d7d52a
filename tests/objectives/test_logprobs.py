"""Per-token log-probs and entropies against log_softmax and hand-computed values."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from lit_rlhf.objectives import (
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
)


def test_logprobs_match_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float64
    assert_close(out, expected)


def test_logprobs_hand_value_and_gradient():
    # logits (0, ln 3) -> p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    out = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert_close(out, torch.tensor([[math.log(0.75)]]))
    out.sum().backward()
    # d log p_1 / d logits = onehot(1) - p
    assert_close(logits.grad, torch.tensor([[[-0.25, 0.25]]]))


def test_logprobs_bf16_are_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 1000, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # The bf16 inputs are exact in float32, so only float32 rounding separates the two.
    assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_entropy_hand_values_and_against_definition():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]])
    # uniform over 4 -> ln 4; (1/4, 3/4, ~0, ~0) -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    expected = torch.tensor([[math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    assert_close(entropy_from_logits(logits), expected)
    # A logit of -inf (a masked token) adds nothing, with a finite gradient, rather than NaN.
    masked = torch.tensor([[[0.0, math.log(3.0), float("-inf")]]], requires_grad=True)
    entropy = entropy_from_logits(masked)
    assert_close(entropy, expected[:, 1:])
    assert_close(logprobs_and_entropy(masked, torch.tensor([[1]]), entropy="detached")[1], expected[:, 1:])
    entropy.sum().backward()
    assert torch.isfinite(masked.grad).all() and masked.grad[0, 0, 2] == 0
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_logprobs_and_entropy_share_one_pass_and_detach_on_request():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    logp, ent = logprobs_and_entropy(logits, labels)
    assert_close(logp, logprobs_from_logits(logits, labels))
    assert_close(ent, entropy_from_logits(logits))
    assert ent.requires_grad
    logp_d, ent_d = logprobs_and_entropy(logits, labels, entropy="detached")
    assert logp_d.requires_grad and not ent_d.requires_grad
    assert_close(ent_d, ent.detach())
    assert logprobs_and_entropy(logits, labels, entropy="skip")[1] is None


def test_head_logprobs_in_chunks_equal_whole_logits_with_gradients(monkeypatch):
    import lit_rlhf.objectives.logprobs as lp
    from lit_rlhf.objectives import head_logprobs

    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (23,), generator=g)
    weights = torch.randn(23, generator=g)

    def run(chunk_elements):
        monkeypatch.setattr(lp, "CHUNK_ELEMENTS", chunk_elements)
        seen = []
        hook = head.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
        head.zero_grad()
        hidden.grad = None
        logp, ent = head_logprobs(hidden, head, labels, 50, temperature=0.7, entropy="grad")
        ((logp + 0.1 * ent) * weights).sum().backward()
        hook.remove()
        return logp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone(), seen

    whole = run(2**24)
    chunked = run(5 * 50)  # 5 tokens' logits at a time
    logits = head(hidden.detach()) / 0.7
    assert_close(whole[0], torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1))
    for a, b in zip(whole[:4], chunked[:4]):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert whole[4] == [23]  # one piece, its logits kept for the backward
    # Five pieces of at most 5 tokens in the forward, each recomputed once in the backward.
    assert max(chunked[4]) == 5 and sum(chunked[4]) == 2 * 23
    with torch.no_grad():  # no autograd: nothing to recompute
        monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 5 * 50)
        assert_close(head_logprobs(hidden, head, labels, 50, 0.7)[0], whole[0], atol=1e-5, rtol=1e-5)
