"""Padding-free scoring and update passes: every episode laid end to end in one row gives the
log-probs, values, entropies and gradients of the padded passes; the layout that runs the
fewest tokens is taken."""

from __future__ import annotations

import torch

from lit_rlhf.modules.rollout import Rollout, evaluate_actions, pass_layout
from tests.modules.ppo_helpers import make_batch, make_module, ready


def _varied(module, rollout: Rollout) -> Rollout:
    """The rollout with its responses made 4 times as long, then cut to lengths spread over
    1..4 Tr (right-padded: enough padding that packing pays), and a non-zero adapter."""
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name or "value_head" in name:
                p.normal_(0, 0.05)
    ids = rollout.response_ids.repeat(1, 4)
    tr, b = ids.size(1), len(rollout)
    keep = torch.arange(tr)[None] < (torch.arange(b) * tr // b + 1)[:, None]
    return Rollout(rollout.query_ids, rollout.query_mask, ids.masked_fill(~keep, 0), keep.long())


def test_packed_passes_equal_padded_ones_with_their_gradients():
    module = ready(make_module())
    rollout = _varied(module, module.rollout(make_batch(module), module.generator))
    assert pass_layout(module.policy, rollout, False, True) == "packed"
    _assert_equal_to_padded(module, rollout, share_prompts=False)


def _assert_equal_to_padded(module, rollout: Rollout, share_prompts: bool) -> None:
    """The packed pass (``share_prompts``: with the prompts run once) gives the log-probs, values,
    entropies and parameter gradients of the padded pass."""
    results = {}
    for packed in (False, True):
        module.policy.zero_grad()
        logprobs, values, entropy = evaluate_actions(module.policy, rollout, temperature=0.7, entropy="grad",
                                                     share_prompts=share_prompts and packed, packed=packed)
        mask = rollout.response_mask.float()
        ((logprobs * mask).sum() + (values * mask).sum() + (entropy * mask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
        results[packed] = (logprobs * mask, values * mask, entropy * mask, grads)
    for padded, packed in zip(results[False][:3], results[True][:3]):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    assert results[False][3].keys() == results[True][3].keys() and results[True][3]
    for name, grad in results[False][3].items():
        torch.testing.assert_close(results[True][3][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_layout_running_fewest_tokens_is_taken():
    module = ready(make_module())
    rollout = module.rollout(make_batch(module, 4), module.generator)
    fixed = Rollout(rollout.query_ids, torch.ones_like(rollout.query_mask), rollout.response_ids,
                    torch.ones_like(rollout.response_mask))
    assert pass_layout(module.policy, fixed, False, True) == "padded"  # nothing to save: no padding
    varied = _varied(module, rollout)
    assert pass_layout(module.policy, varied, False, True) == "packed"
    assert pass_layout(module.policy, varied, False, False) == "padded"  # packed: off
    # A group of 4 sharing one long prompt: running it once beats repeating it, and packing its
    # varied responses beats padding them.
    long = torch.cat([rollout.query_ids[:1].repeat(1, 8)] * 4)
    group = Rollout(long, torch.ones_like(long), varied.response_ids, varied.response_mask)
    assert pass_layout(module.policy, group, True, False) == "shared"
    assert pass_layout(module.policy, group, True, True) == "shared_packed"
    same_length = Rollout(long, torch.ones_like(long), varied.response_ids, torch.ones_like(varied.response_mask))
    assert pass_layout(module.policy, same_length, True, True) == "shared"  # a tie: one attention call
    # Under sharding every rank takes the layout of all ranks' tokens together (a sharded forward
    # is a collective), among those open to every rank: here another rank has no shared prompts
    # and would run many more tokens packed than padded.
    other_rank = torch.tensor([0, 2**50, 10**6, 2**50])
    assert pass_layout(module.policy, group, True, True, sum_ranks=lambda costs: costs + other_rank) == "padded"


def test_models_without_segment_attention_stay_padded():
    module = make_module()
    module.lm_config.attn_implementation = "eager"
    module = ready(module)
    assert module.policy.base_model.config._attn_implementation == "eager"
    rollout = _varied(module, module.rollout(make_batch(module, 4), module.generator))
    assert pass_layout(module.policy, rollout, False, True) == "padded"


def test_shared_prompts_with_packed_responses_equal_padded_passes_with_their_gradients():
    # Groups of 3 responses of varied length per (left-padded) prompt, shuffled as a minibatch
    # is: the prompts run once, the responses in one row on top of their prompts' cache.
    module = ready(make_module())
    rollout = module.rollout(make_batch(module, 4), module.generator, num_generations=3)
    rollout = _varied(module, rollout)[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    assert (rollout.query_mask == 0).any() and (rollout.response_mask == 0).any()
    assert pass_layout(module.policy, rollout, True, True) == "shared_packed"
    _assert_equal_to_padded(module, rollout, share_prompts=True)


def test_step_0_invariants_hold_exactly_in_the_packed_layouts():
    # Zero LoRA B: the update pass (grad, train mode) repeats the old log-prob pass (no grad, eval
    # mode) exactly, ratio 1, and the reference (adapters off) equals them, KL 0, in each layout.
    module = ready(make_module())
    rollout = module.rollout(make_batch(module, 4), module.generator, num_generations=3)
    ids = rollout.response_ids.repeat(1, 4)
    keep = torch.arange(ids.size(1))[None] < (torch.arange(12) * ids.size(1) // 12 + 1)[:, None]
    rollout = Rollout(rollout.query_ids, rollout.query_mask, ids.masked_fill(~keep, 0), keep.long())
    for share, layout in ((False, "packed"), (True, "shared_packed")):
        assert pass_layout(module.policy, rollout, share, True) == layout
        module.policy.eval()
        with torch.no_grad():
            old, _, _ = evaluate_actions(module.policy, rollout, share_prompts=share, packed=True)
            with module.policy.lm.disable_adapter():
                ref, _, _ = evaluate_actions(module.policy, rollout, share_prompts=share, packed=True)
        module.policy.train()
        new, _, _ = evaluate_actions(module.policy, rollout, entropy="detached", share_prompts=share, packed=True)
        assert torch.equal(new.detach(), old) and torch.equal(ref, old), layout
