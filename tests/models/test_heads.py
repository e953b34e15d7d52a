"""A trunk whose last block computes only the positions a head reads: exact there, in values and
gradients, and off where it cannot hold."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModel

from lit_rlhf.models.heads import last_block_mlp, last_block_rows
from tests.conftest import TINY_LLAMA
from tests.models.test_architectures import FAMILIES, arch


def _trunk(fields: dict = TINY_LLAMA):
    fields = dict(fields)
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), vocab_size=300, **fields))


def _rows_seen(mlp) -> list[int]:
    """The number of positions each call of ``mlp`` computes (dimension 1 of its input)."""
    seen = []
    forward = mlp.forward

    def spy(hidden, *args, **kwargs):  # the forward itself: module hooks do not run in a checkpoint's recomputation
        seen.append(hidden.size(1))
        return forward(hidden, *args, **kwargs)

    mlp.forward = spy
    return seen


def test_the_read_positions_get_the_full_passs_hidden_states_and_gradients():
    trunk = _trunk().train()
    ids = torch.randint(0, 300, (1, 20))
    index = torch.tensor([3, 11, 19])
    seen = _rows_seen(last_block_mlp(trunk))
    weights = torch.randn(len(index), 64)

    def read(rows: bool):
        trunk.zero_grad()
        with last_block_rows(trunk, index) if rows else torch.enable_grad():
            hidden = trunk(input_ids=ids, use_cache=False).last_hidden_state[0, index]
        (hidden * weights).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in trunk.named_parameters()}

    full_hidden, full_grads = read(rows=False)
    hidden, grads = read(rows=True)
    assert seen == [20, 3]  # the last block's MLP ran on the 3 read positions only
    assert_close(hidden, full_hidden, atol=1e-6, rtol=1e-5)
    for name, grad in full_grads.items():  # to float32 rounding of the largest entry
        assert (grads[name] - grad).abs().max() <= 1e-6 * grad.abs().max(), name
    trunk(input_ids=ids, use_cache=False)
    assert seen[-1] == 20  # the hooks are gone afterwards


def test_under_gradient_checkpointing_every_position_runs_and_the_backward_works():
    trunk = _trunk().train()
    trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = _rows_seen(last_block_mlp(trunk))
    with last_block_rows(trunk, torch.tensor([4])):
        hidden = trunk(input_ids=torch.randint(0, 300, (1, 8)), use_cache=False).last_hidden_state
    hidden[0, 4].sum().backward()  # the recomputed block must match the forward's
    assert seen == [8, 8]  # forward, then the backward's recomputation


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon", "phi", "gemma3_text", "olmo2"])
def test_other_block_layouts_give_the_full_passs_states_at_the_read_positions(family):
    trunk = _trunk(arch(family)).eval()
    ids = torch.randint(0, 300, (1, 12))
    index = torch.tensor([5, 11])
    seen = _rows_seen(last_block_mlp(trunk))
    with torch.no_grad():
        full = trunk(input_ids=ids, use_cache=False).last_hidden_state[0, index]
        with last_block_rows(trunk, index):
            cut = trunk(input_ids=ids, use_cache=False).last_hidden_state[0, index]
    assert seen == [12, 2]
    assert_close(cut, full, atol=1e-5, rtol=1e-4)


def test_blocks_without_an_mlp_module_are_left_as_they_are():
    trunk = _trunk(arch("opt"))
    assert "opt" in FAMILIES and last_block_mlp(trunk) is None
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad(), last_block_rows(trunk, torch.tensor([5])):
        out = trunk(input_ids=ids, use_cache=False).last_hidden_state
    assert out.shape == (1, 6, 64) and bool(out.abs().sum(-1).gt(0).all())
