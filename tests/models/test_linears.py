"""Decoding's CPU linears through oneDNN: the same outputs as F.linear, only where they apply,
and every layer's own forward back afterwards."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lit_rlhf.models import linears
from lit_rlhf.models.linears import onednn_linears

pytestmark = pytest.mark.skipif(not linears.onednn_available(), reason="this torch has no oneDNN CPU kernels")


class _Quantized(nn.Linear):  # stands for bitsandbytes' layers: nn.Linear subclasses with a forward of their own
    pass


@pytest.fixture
def calls(monkeypatch):
    """Each call of oneDNN's linear: whether its weight was a packed (oneDNN-layout) copy."""
    seen = []
    kernel = torch.ops.mkldnn._linear_pointwise

    def spy(x, weight, bias):
        seen.append(weight.is_mkldnn)
        return kernel(x, weight, bias, "none", [], "")

    monkeypatch.setattr(linears, "_onednn_linear", spy)
    return seen


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8, bias=False), _Quantized(8, 4))


def test_inside_the_block_plain_linears_run_on_onednn_with_f_linear_outputs(calls):
    model = _model()
    x = torch.randn(3, 5, 16)  # (B, T, in): a decode step is (B, 1, in)
    with torch.no_grad():
        expected = model(x)
        with onednn_linears(model):
            out = model(x)
    assert len(calls) == 2  # the two plain layers; the subclass kept its own forward
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert all("forward" not in layer.__dict__ for layer in model)


@pytest.mark.parametrize("case", ["grad", "autocast", "bf16"])
def test_outside_decoding_conditions_it_is_f_linear_exactly(calls, case):
    model = _model()
    x = torch.randn(2, 16)
    if case == "bf16":
        model, x = model.bfloat16(), x.bfloat16()
    with torch.set_grad_enabled(case == "grad"), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
        expected = model(x)
        with onednn_linears(model):
            out = model(x)
    assert not calls
    assert torch.equal(out, expected)


def test_each_forward_is_restored_after_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="shapes"), torch.no_grad(), onednn_linears(model):
        model(torch.randn(2, 7))  # wrong width
    assert all("forward" not in layer.__dict__ for layer in model)
    assert model[0].forward.__func__ is nn.Linear.forward


def test_a_layer_called_often_runs_on_its_packed_weight_with_the_same_outputs(calls):
    model = _model()
    x = torch.randn(4, 1, 16)  # a decode step's shape
    n = linears.PACK_AFTER + 2
    with torch.no_grad():
        expected = model(x)
        with onednn_linears(model):
            outs = [model(x) for _ in range(n)]
    # Two plain layers per call: their weights as they are for the first PACK_AFTER - 1 calls, then packed.
    assert calls == [False] * 2 * (linears.PACK_AFTER - 1) + [True] * 2 * (n - linears.PACK_AFTER + 1)
    for out in outs:
        assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert all("forward" not in layer.__dict__ for layer in model)


def test_packing_stops_at_its_memory_budget(calls, monkeypatch):
    model = _model()
    first = model[0].weight.numel() * 4  # float32 bytes of the first layer's weight
    monkeypatch.setattr(linears, "PACK_BUDGET_BYTES", first)
    with torch.no_grad(), onednn_linears(model):
        for _ in range(linears.PACK_AFTER):
            model(torch.randn(2, 16))
    assert calls[-2:] == [True, False]  # the first layer packed, the second over the budget
