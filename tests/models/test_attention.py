"""Segment attention: equal to one SDPA call per sequence, float32 under CPU autocast."""

from __future__ import annotations

import pytest
import torch


def test_segment_attention_equals_one_sdpa_call_per_sequence():
    import torch.nn.functional as F

    from lit_rlhf.models.attention import segment_sdpa

    g = torch.Generator().manual_seed(0)
    lengths = [3, 7, 1, 5]
    # 4 query heads over 2 key/value heads (grouped-query attention), one packed row.
    q = torch.randn(1, 4, sum(lengths), 8, generator=g)
    k, v = torch.randn(1, 2, sum(lengths), 8, generator=g), torch.randn(1, 2, sum(lengths), 8, generator=g)
    out, _ = segment_sdpa(None, q, k, v, None, scaling=0.5, segment_lengths=lengths)
    assert out.shape == (1, sum(lengths), 4, 8)
    start = 0
    for n in lengths:  # naive reference: each sequence alone, keys/values repeated per group
        ks, vs = (t[:, :, start:start + n].repeat_interleave(2, dim=1) for t in (k, v))
        ref = F.scaled_dot_product_attention(q[:, :, start:start + n], ks, vs, is_causal=True, scale=0.5)
        torch.testing.assert_close(out[:, start:start + n], ref.transpose(1, 2))
        start += n
    with pytest.raises(ValueError, match="15 tokens for segment lengths summing to 16"):
        segment_sdpa(None, q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], None, segment_lengths=lengths)


def test_segment_attention_runs_in_float32_under_cpu_autocast():
    # CPU bf16 SDPA keeps compiled kernels for every new length; the segment path upcasts.
    from lit_rlhf.models.attention import segment_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segment_sdpa(None, q, k, v, None, scaling=0.3, segment_lengths=[4, 5])
    assert out.dtype == torch.bfloat16
    ref, _ = segment_sdpa(None, q.float(), k.float(), v.float(), None, scaling=0.3, segment_lengths=[4, 5])
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=0)
