"""Rollouts: EOS masking, inverse-transform sampling, cached log-probs equal a fresh forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.models.heads import PolicyOutput
from lit_rlhf.modules.rollout import Rollout, evaluate_actions, generate, sample_categorical
from tests.modules.ppo_helpers import make_batch, make_module, ready


def _nonzero_adapter(module) -> None:
    """LoRA B drawn away from zero: the policy is no longer the reference."""
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


class _RowsCache:
    """A stand-in KV cache that only tracks which of the batch's rows it still holds."""

    def __init__(self, rows: int) -> None:
        self.rows = list(range(rows))
        self.layers = [self]

    def batch_select_indices(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


class _ScriptedPolicy:
    """Emits a fixed token per step and row (rows followed through the cache as they leave the batch)."""

    def __init__(self, script: list[list[int]], vocab: int = 10) -> None:
        self.script, self.vocab, self.step, self.batch_sizes = script, vocab, 0, []

    def __call__(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, with_values=True,
                 logits_slice=slice(None)):
        cache = cache or _RowsCache(input_ids.size(0))
        assert len(cache.rows) == input_ids.size(0) == attention_mask.size(0) == position_ids.size(0)
        self.batch_sizes.append(input_ids.size(0))
        logits = torch.full((input_ids.size(0), input_ids.size(1), self.vocab), -1e9)
        for i, row in enumerate(cache.rows):
            tokens = self.script[row]
            logits[i, -1, tokens[min(self.step, len(tokens) - 1)]] = 0.0
        self.step += 1
        return PolicyOutput(logits, None, cache)


def test_generate_stops_at_eos_and_masks_what_follows():
    eos, pad = 2, 0
    policy = _ScriptedPolicy([[5, 6, eos, 7, 8], [5, 6, 7, 8, 9], [eos, 9, 9, 9, 9]])
    query = torch.tensor([[0, 4, 4], [4, 4, 4], [0, 0, 4]])
    rollout = generate(policy, query, (query != 0).long(), torch.tensor([5, 4, 5]), eos_token_id=eos,
                       pad_token_id=pad)
    assert rollout.response_ids.tolist() == [[5, 6, eos, pad], [5, 6, 7, 8], [eos, pad, pad, pad]]
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert rollout.ended_with(eos).tolist() == [True, False, True]
    # Rows that are done leave the batch once they are a quarter of it: row 2 after its first
    # token, row 0 after its third; the last step feeds row 1 alone.
    assert policy.batch_sizes == [3, 2, 2, 1]


def test_generate_stops_at_any_end_of_turn_id_and_ended_means_the_last_turn_ended():
    eos, eot, pad = 2, 3, 0  # e.g. <|endoftext|> and ChatML's <|im_end|>
    policy = _ScriptedPolicy([[5, eot, 7, 8], [5, 6, eos, 9], [5, 6, 7, 8]])
    query = torch.tensor([[4, 4], [4, 4], [4, 4]])
    rollout = generate(policy, query, torch.ones_like(query), torch.tensor([4, 4, 4]), eos_token_id=[eos, eot],
                       pad_token_id=pad)
    assert rollout.response_ids.tolist() == [[5, eot, pad, pad], [5, 6, eos, pad], [5, 6, 7, 8]]
    assert rollout.ended_with([eos, eot]).tolist() == [True, True, False]
    assert rollout.ended_with(eos).tolist() == [False, True, False]
    # Multi-turn: a tool turn ended with eot, then an observation (1), then the final turn. Only the
    # policy's last token counts: a final answer cut at the token limit has not ended.
    response = torch.tensor([[5, eot, 1, 1, 6, 7], [5, eot, 1, 1, 6, eot], [5, eot, 1, 1, 6, pad]])
    observed = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    episodes = Rollout(query, torch.ones_like(query), response, (response != pad).long(), observation_mask=observed)
    assert episodes.ended_with([eos, eot]).tolist() == [False, True, False]


def test_inverse_transform_sampling_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    draws = torch.stack([sample_categorical(probs, gen) for _ in range(n)], 1)  # (3, n)
    freq = torch.stack([torch.bincount(row, minlength=4) for row in draws]).float() / n
    assert (draws[0] != 1).all() and (draws[1] == 3).all()  # zero probability: never drawn
    # Binomial standard error at n=20000 is at most 0.0036: 5 sigma is 0.018.
    assert_close(freq, probs, atol=0.018, rtol=0)


def test_two_level_draw_picks_what_one_search_of_the_whole_vocabulary_picks():
    # 3 blocks of SAMPLING_BLOCK = 1024 and a tail of 952 entries; block 1 all zero, zeros elsewhere too.
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(64, 3 * 1024 + 952, generator=g) ** 8
    probs[:, 1024:2048] = 0.0
    probs[:, ::3] = 0.0
    probs /= probs.sum(-1, keepdim=True)
    draws, naive = [], []
    for seed in range(20):
        draws.append(sample_categorical(probs, torch.Generator().manual_seed(seed)))
        # The same uniform number against one float64 cumulative sum over the whole vocabulary.
        u = torch.rand(64, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        naive.append(torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1))
    draws, naive = torch.cat(draws), torch.cat(naive)
    assert torch.equal(draws, naive)
    assert (probs.flatten()[torch.arange(64).repeat(20) * probs.size(1) + draws] > 0).all()


def test_cached_sampling_log_probs_equal_a_fresh_forward():
    module = ready(make_module())
    batch = make_batch(module)
    _nonzero_adapter(module)
    recorded = []

    def recording_policy(*args, **kwargs):
        out = module.policy(*args, **kwargs)
        recorded.append(out.logits[:, -1].log_softmax(-1))
        return out

    module.policy.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rollout = generate(recording_policy, batch["input_ids"], batch["attention_mask"], torch.full((8,), 6),
                           eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id,
                           generator=gen)
        fresh, _, _ = evaluate_actions(module.policy, rollout)
    steps = rollout.response_ids.size(1)
    cached = torch.stack([recorded[t].gather(-1, rollout.response_ids[:, t:t + 1]).squeeze(-1) for t in range(steps)], 1)
    mask = rollout.response_mask.bool()
    assert (batch["attention_mask"] == 0).any()  # the prompts really are left-padded
    torch.testing.assert_close(cached[mask], fresh[mask], atol=1e-5, rtol=1e-5)


def test_a_group_prefilled_once_samples_as_its_prompt_repeated():
    # G responses per prompt from one prefill and a repeated KV cache: the same tokens as
    # sampling from the prompts repeated G times, and the same log-probs from a fresh forward.
    module = ready(make_module())
    batch = make_batch(module)
    ids, mask = batch["input_ids"][:3], batch["attention_mask"][:3]
    common = dict(eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id)
    module.policy.eval()
    with torch.no_grad():
        grouped = generate(module.policy, ids, mask, torch.full((12,), 6), num_generations=4,
                           generator=torch.Generator().manual_seed(0), **common)
        repeated = generate(module.policy, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                            torch.full((12,), 6), generator=torch.Generator().manual_seed(0), **common)
        assert torch.equal(grouped.query_ids, ids.repeat_interleave(4, 0))
        assert torch.equal(grouped.response_ids, repeated.response_ids)
        assert torch.equal(grouped.response_mask, repeated.response_mask)
        assert len({tuple(r) for r in grouped.response_ids[:4].tolist()}) > 1  # independent samples
        assert_close(evaluate_actions(module.policy, grouped)[0], evaluate_actions(module.policy, repeated)[0])


def test_a_shared_prompt_run_once_gives_the_log_probs_values_and_gradients_of_the_full_forward():
    # Groups of 3 responses per (left-padded) prompt, shuffled as a minibatch is: the prompts
    # are prefilled once and their cache indexed out, and nothing the update reads changes.
    module = ready(make_module())
    batch = make_batch(module)
    _nonzero_adapter(module)
    module.policy.eval()
    with torch.no_grad():
        grouped = generate(module.policy, batch["input_ids"][:4], batch["attention_mask"][:4],
                           torch.arange(12) % 5 + 2, eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id,
                           generator=torch.Generator().manual_seed(0), num_generations=3)
    sub = grouped[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    assert (sub.query_mask == 0).any() and (sub.response_mask == 0).any()  # padding on both sides
    results = []
    for share in (False, True):
        module.policy.zero_grad()
        logprobs, values, entropy = evaluate_actions(module.policy, sub, temperature=0.7, entropy="grad",
                                                     share_prompts=share)
        (logprobs.sum() + values.sum() + entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
        results.append((logprobs.detach(), values.detach(), entropy.detach(), grads))
    (lp, v, h, g), (lp_s, v_s, h_s, g_s) = results
    mask = sub.response_mask.bool()
    assert_close(lp_s[mask], lp[mask], atol=1e-5, rtol=1e-5)
    assert_close(v_s[mask], v[mask], atol=1e-5, rtol=1e-5)
    assert_close(h_s[mask], h[mask], atol=1e-5, rtol=1e-5)
    assert g.keys() == g_s.keys() and len(g) > 2  # the adapters and the value head
    for name in g:
        assert_close(g_s[name], g[name], atol=1e-4, rtol=1e-4, msg=name)


_SELECT_ROWS = """
import hashlib, sys, torch
from transformers import DynamicCache
from lit_rlhf.modules.rollout import select_cache_rows
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
keys = torch.randn(200, 4, 8, 32, generator=g, requires_grad=True)
values = torch.randn(200, 4, 8, 32, generator=g, requires_grad=True)
cache = DynamicCache()
cache.update(keys, values, 0)
index = torch.randint(0, 200, (256,), generator=g)  # repeated rows, in no order: a minibatch
select_cache_rows(cache, index) if sys.argv[1] == "ours" else cache.batch_select_indices(index)
layer = cache.layers[0]
weight = torch.randn(256, 4, 8, 32, generator=g)
((layer.keys * weight).sum() + (layer.values * weight).sum()).backward()
assert torch.equal(layer.keys.detach(), keys.detach()[index])
print(hashlib.sha256(keys.grad.numpy().tobytes() + values.grad.numpy().tobytes()).hexdigest())
"""


def test_selecting_cache_rows_backpropagates_the_same_in_every_process():
    # Advanced indexing (the cache's own batch_select_indices) sums repeated rows in a
    # thread-dependent order on CPU: its gradients differed between runs of one GRPO config.
    import subprocess
    import sys

    hashes = {subprocess.run([sys.executable, "-c", _SELECT_ROWS, "ours"], capture_output=True, text=True,
                             check=True).stdout.strip() for _ in range(3)}
    assert len(hashes) == 1, hashes


def test_static_and_compiled_decoders_sample_what_the_growing_cache_samples():
    # Greedy: the same tokens exactly. Sampled, ending at EOS (the growing cache drops done rows,
    # the static one keeps them): the same draws give the same tokens, log-probs to rounding.
    module = ready(make_module())
    batch = make_batch(module)
    _nonzero_adapter(module)
    module.policy.eval()
    ids, mask = batch["input_ids"][:4], batch["attention_mask"][:4]
    assert (mask == 0).any()  # left-padded prompts
    eos = module.tokenizer.eos_token_id
    # EOS made likely, so that rows end at different steps.
    module.policy.base_model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 4.0)))

    def sample(decoder, **kwargs):
        with torch.no_grad():
            return generate(module.policy, ids, mask, torch.arange(8) % 4 + 9, num_generations=2,
                            pad_token_id=module.tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0),
                            decoder=decoder, **kwargs)

    for kwargs in (dict(eos_token_id=None, top_k=1), dict(eos_token_id=eos, temperature=2.0)):
        dynamic = sample("dynamic", **kwargs)
        for decoder in ("static", "compiled"):
            other = sample(decoder, **kwargs)
            assert torch.equal(other.response_ids, dynamic.response_ids), (decoder, kwargs)
            assert torch.equal(other.response_mask, dynamic.response_mask)
            assert_close(other.sample_logprobs, dynamic.sample_logprobs, atol=1e-5, rtol=0)
    ended = dynamic.response_mask.sum(1) < torch.arange(8) % 4 + 9
    assert ended.any() and not ended.all()  # some rows ended at EOS while others went on
    with pytest.raises(ValueError, match="decoder 'fast': expected one of dynamic, static, compiled"):
        sample("fast", eos_token_id=None)
