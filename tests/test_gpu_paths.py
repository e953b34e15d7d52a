"""The GPU-only paths, shown on a CPU: a second device stood in for by ``meta`` tensors, a fake
flash-attention kernel registered with transformers, bf16 precision, and CUDA faked where only
the decision matters. Each test here failed on the code before the GPU fixes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lit_rlhf.models import ModelConfig, load_model
from lit_rlhf.modules.base import non_finite
from tests.conftest import TINY_LLAMA

# ------------------------------------------------------------------ 1. divergence guard


def test_divergence_guard_reads_tensors_on_several_devices_one_sync_each(monkeypatch):
    # Unfused AdamW on a GPU: `step` on the CPU, the moments on the GPU (here: meta).
    named = [("w:step", torch.tensor(3.0)), ("w:exp_avg", torch.zeros(4, device="meta")),
             ("v", torch.tensor([1.0, float("nan")])), ("u", torch.ones(3))]
    syncs = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append(t.device) or tolist(t))
    assert non_finite(named) == ["v"]
    assert syncs == [torch.device("cpu")]  # one host sync for the CPU tensors; meta holds no values


# ------------------------------------------------------------------ 2. packing under flash attention


def fake_flash_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      cu_seq_lens_q=None, position_ids=None, **kwargs):
    """A stand-in for a flash kernel's variable-length path: causal SDPA per document.

    Like transformers' flash path it finds documents from position ids only in a one-row
    batch; a multi-row batch without ``cu_seq_lens`` would attend across documents, so it fails.
    """
    batch, heads, length, dim = query.shape
    if attention_mask is not None:
        raise AssertionError("flash attention takes no 4D mask")
    if cu_seq_lens_q is None:
        if batch > 1:
            raise AssertionError("multi-row batch without cu_seq_lens: documents would leak")
        starts = torch.ones(length, dtype=torch.bool)
        if position_ids is not None:
            starts[1:] = position_ids[0, 1:] != position_ids[0, :-1] + 1
        cu_seq_lens_q = torch.cat([starts.nonzero()[:, 0], torch.tensor([length])])
    q, k, v = (t.transpose(1, 2).reshape(batch * length, -1, dim) for t in (query, key, value))
    bounds = cu_seq_lens_q.tolist()
    out = torch.cat([
        F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                       is_causal=True, scale=scaling).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ])
    return out.reshape(batch, length, heads, dim), None


@pytest.fixture(params=["flash_attention_fake", "kernels-community/fake-flash-attn"])
def flash_name(request):
    # Both families: a flash_attention_* name and a hub kernel's name (no common prefix).
    AttentionInterface.register(request.param, fake_flash_varlen)
    AttentionMaskInterface.register(request.param, AttentionMaskInterface._global_mapping["flash_attention_2"])
    yield request.param
    AttentionInterface._global_mapping.pop(request.param)
    AttentionMaskInterface._global_mapping.pop(request.param)


def test_packed_sft_rows_stay_isolated_under_flash_attention(tokenizer, flash_name):
    from lit_rlhf.modules import SFTModule

    module = SFTModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"))
    module.configure_model()
    module.eval()
    docs = [torch.randint(5, 200, (n,)) for n in (5, 11, 7, 9)]  # rows: [5 + 11], [7 + 9]
    ids = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in docs[:2]]),
                             torch.cat([torch.arange(len(d)) for d in docs[2:]])])
    with torch.no_grad():
        alone = [module(d[None])[0] for d in docs]  # sdpa, one document per call
        module.model.config._attn_implementation = flash_name
        packed = module(ids, positions)
    assert torch.allclose(packed[0], torch.cat(alone[:2]), atol=1e-5)
    assert torch.allclose(packed[1], torch.cat(alone[2:]), atol=1e-5)


def test_flash_attention_that_is_not_installed_fails_at_config_time(tokenizer):
    from lit_rlhf.modules import SFTModule

    for name, missing in (("flash_attention_2", "flash_attn package is not installed"),
                          ("kernels-community/flash-attn2", "hub kernel kernels-community/flash-attn2")):
        with pytest.raises(ValueError, match=rf"model.attn_implementation='{name}': the .*{missing}.*"):
            SFTModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", attn_implementation=name))
