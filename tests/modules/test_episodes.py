"""Multi-turn episodes on the online core: token in, token out; observation tokens are context
only (no loss, KL, entropy or advantage, zero gradient); the step-0 invariants; stop strings;
draws that do not depend on which episodes are still playing."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import ModelConfig
from lit_rlhf.modules import GRPOModule
from lit_rlhf.modules.episodes import EpisodeConfig
from lit_rlhf.modules.grpo import GRPOConfig
from lit_rlhf.modules.ppo import SamplingConfig
from lit_rlhf.modules.rollout import (
    Rows,
    StopStrings,
    decode_responses,
    decode_trajectories,
)
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA
from tests.envs.scripted import Scripted
from tests.modules.ppo_helpers import LORA, LetterReward, make_batch, make_data

OBSERVATION = " the best film of the year"


def _module(lora=LORA, prompts=4, **grpo):
    grpo.setdefault("num_generations", 2)
    return GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora), LetterReward(),
                      optim=OptimConfig(lr=1e-3, min_lr_ratio=1.0), grpo=GRPOConfig(**grpo),
                      sampling=SamplingConfig(min_new_tokens=6, max_new_tokens=6), rollout_batch_size=prompts,
                      env=Scripted(OBSERVATION, turns=3), episodes=EpisodeConfig(max_turns=4, max_tokens=64))


def _observed_runs(rollout, row: int) -> list[list[int]]:
    """The observation segments of one episode, as token lists."""
    ids, obs = rollout.response_ids[row].tolist(), rollout.observation_mask[row].tolist()
    runs, current = [], []
    for t, o, m in zip(ids, obs, rollout.response_mask[row].tolist()):
        if o and m:
            current.append(t)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def played():
    module = _module(lora=None)
    module.configure_model()
    batch = make_batch(module, 4)
    rollout = module.rollout(batch, torch.Generator().manual_seed(0), old_logprobs=True)
    return module, batch, rollout


def test_the_training_pass_scores_exactly_the_sampled_and_observed_tokens(played):
    module, _, rollout = played
    tok = module.tokenizer
    segment = tok(OBSERVATION, add_special_tokens=False)["input_ids"]
    assert len(rollout) == 8 and rollout.env_reward.tolist() == [1.0] * 8
    for row in range(len(rollout)):
        assert _observed_runs(rollout, row) == [segment, segment]  # tokenized once, appended as is
    # The tokenizer does not give back the sampled tokens from their text (BPE merges across the
    # turns' boundaries): re-tokenizing decoded text would train on other tokens than were sampled.
    real = [ids[: int(n)] for ids, n in zip(rollout.response_ids.tolist(), rollout.response_mask.sum(-1).tolist())]
    assert any(tok(tok.decode(ids), add_special_tokens=False)["input_ids"] != ids for ids in real)
    # One forward over prompt + whole trajectory gives the sampler's own log-probs of its tokens.
    action = rollout.action_mask.bool()
    assert (action & rollout.observation_mask.bool()).sum() == 0 and action.sum() == 8 * 3 * 6
    torch.testing.assert_close(rollout.logprobs[action], rollout.sample_logprobs[action], atol=1e-5, rtol=0)


def test_chat_episodes_append_what_the_template_renders_after_each_turn(tmp_path):
    module = GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", chat_template="chatml"), LetterReward(),
                        grpo=GRPOConfig(num_generations=2), sampling=SamplingConfig(min_new_tokens=6, max_new_tokens=6),
                        rollout_batch_size=4, env=Scripted("36", turns=3, chat=True),
                        episodes=EpisodeConfig(max_turns=4, max_tokens=200))
    module.configure_model()
    rows = [{"prompt": [{"role": "user", "content": f"what is {i} times 3?"}]} for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PromptDataModule(str(tmp_path / "chat.jsonl"), batch_size=4, val_size=4, tokenizer=module.tokenizer)
    data.setup("fit")
    batch = data.train_dataloader().dataset.batch(0)
    rollout = module.rollout(batch, torch.Generator().manual_seed(0), old_logprobs=True)
    tok = module.tokenizer
    prompt = tok.decode(rollout.query_ids[0][rollout.query_mask[0].bool()])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    for row in range(len(rollout)):  # the policy never sampled "<|im_end|>": the template's closes its turn
        assert [tok.decode(run) for run in _observed_runs(rollout, row)] == \
            ["<|im_end|>\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n"] * 2
    action = rollout.action_mask.bool()
    torch.testing.assert_close(rollout.logprobs[action], rollout.sample_logprobs[action], atol=1e-5, rtol=0)


def test_reward_functions_see_the_final_turn_and_the_table_the_whole_trajectory(played):
    module, _, rollout = played
    final, whole = decode_responses(module.tokenizer, rollout), decode_trajectories(module.tokenizer, rollout)
    for f, w in zip(final, whole):
        assert w.count(f"**{OBSERVATION}**") == 2 and w.endswith(f"**{f}")


def test_observation_tokens_get_no_gradient_no_advantage_and_no_kl(played):
    module, _, rollout = played
    scores = torch.arange(len(rollout), dtype=torch.float32)
    mask = rollout.action_mask.float()
    rewards, _, _ = module.kl_rewards(rollout, scores, mask)
    advantages, _ = module.advantages(rollout, scores, rewards, mask)
    observed = rollout.observation_mask.bool()
    assert (advantages[observed] == 0).all() and (advantages[~observed & mask.bool()] != 0).any()
    logits = []

    def keep(mod, args, out) -> None:  # returns None: the output stays as it is
        out.retain_grad()
        logits.append(out)

    hook = module.policy.lm.get_output_embeddings().register_forward_hook(keep)
    with torch.no_grad():  # make the policy differ from the reference, so the KL term has a gradient
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    try:
        loss, stats = module.loss(rollout, advantages, None)
        loss.backward()
    finally:
        hook.remove()
        module.policy.zero_grad()
    assert stats["kl"] > 0
    # One head call on the hidden states of the response tokens (row-major over the response
    # mask, observations included): its logits' gradient, put back in (B, Tr, V).
    (head_logits,) = logits
    resp = rollout.response_mask.bool()
    grad = head_logits.grad.new_zeros(*resp.shape, head_logits.size(-1))
    grad[resp] = head_logits.grad
    assert (grad[observed] == 0).all()
    assert (grad[~observed & mask.bool()].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("lora, advantage", [(LORA, "grpo"), (None, "rloo"), (LORA, "reinforce_baseline")],
                         ids=["grpo-lora-adapters-off", "rloo-full-frozen-copy", "reinforce++-lora"])
def test_first_update_on_multi_turn_episodes_has_ratio_one_and_zero_kl(tmp_path, lora, advantage):
    module = _module(lora=lora, num_iterations=2, advantage=advantage)
    seen, loss = [], module.loss

    def recording(sub, *args):
        value, stats = loss(sub, *args)
        seen.append(dict(stats))  # a copy: the update loop pops ratio_max
        return value, stats

    module.loss = recording
    L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
              default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False).fit(module, make_data(module, 4))
    assert seen[0]["ratio_mean"].item() == 1.0 and seen[0]["ratio_max"].item() == 1.0
    assert seen[0]["kl"].item() == 0.0
    stats = module.last_episode_stats
    assert stats["episode/turns"] == 3 and stats["episode/tool_calls"] == 2 and stats["episode/cut"] == 0
    assert stats["episode/observation_tokens"] == 2 * len(module.tokenizer(OBSERVATION)["input_ids"])
    assert "**" in module.last_samples[0]["response"]


def test_budgets_cut_episodes_and_count_them():
    module = _module(lora=None)
    module.episode_config = EpisodeConfig(max_turns=2, max_tokens=64)  # the third turn never comes
    module.configure_model()
    rollout = module.sample(make_batch(module, 4), torch.Generator().manual_seed(0))
    assert module.last_episode_stats["episode/cut"] == 1.0 and module.last_episode_stats["episode/turns"] == 2
    assert (rollout.observation_mask.sum(-1) == len(module.tokenizer(OBSERVATION)["input_ids"])).all()
    module.episode_config = EpisodeConfig(max_turns=4, max_tokens=10)  # 6 sampled + the observation: over
    rollout = module.sample(make_batch(module, 4), torch.Generator().manual_seed(0))
    assert module.last_episode_stats["episode/cut"] == 1.0 and rollout.observation_mask.sum() == 0
    assert (rollout.response_mask.sum(-1) == 6).all()


def test_a_rank_whose_episodes_are_over_plays_along_while_other_ranks_play(played):
    from lit_rlhf.modules.episodes import Sampler, run_episodes, start_episodes

    module, batch, _ = played
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return module.policy(*args, **kwargs)

    def play(any_rank_active):
        episodes = start_episodes(Scripted(turns=1), module.tokenizer, batch, 1)  # one turn each
        kwargs = dict(eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
        return run_episodes(counting, episodes, Sampler(module.tokenizer, 6, kwargs, any_rank_active=any_rank_active),
                            EpisodeConfig())

    alone = play(bool)
    solo_calls, calls[:] = len(calls), []
    others = iter([True, True, False])  # another rank still plays two more turns
    along = play(lambda n: bool(n) or next(others))
    assert torch.equal(along.response_ids, alone.response_ids)  # its own episodes are untouched
    # Two more turns of one discarded row, one token each: a prefill and no decode step.
    assert len(calls) == solo_calls + 2 and calls[-2:] == [(1, calls[-1][1])] * 2


def test_stop_strings_end_a_row_at_the_token_that_completes_them(tokenizer):
    stop = StopStrings(tokenizer, ["</calc>"])
    ids = [i for piece in ["12*3", "</", "cal", "c", ">", "x>"] for i in tokenizer(piece)["input_ids"]]
    assert len(ids) > 8  # the tag spans several tokens
    other = tokenizer("a")["input_ids"][0]
    tokens, hits = [], []
    for t in ids:
        tokens.append(torch.tensor([t, other]))
        hits.append(stop(tokens).tolist())
    first = [h[0] for h in hits].index(True)
    assert tokenizer.decode(ids[: first + 1]) == "12*3</calc>" and not any(h[1] for h in hits)


def test_a_subset_of_rows_draws_what_those_rows_draw_in_the_whole_batch():
    make = lambda n: torch.rand(n, generator=torch.Generator().manual_seed(3))  # noqa: E731
    whole = Rows(4, 16).draw(6, make)  # this rank: rows 4..9 of 16
    index = torch.tensor([1, 4, 5])
    assert torch.equal(Rows(4, 16).subset(index, 6).draw(3, make), whole[index])
    assert torch.equal(Rows().subset(index, 6).draw(3, make), make(6)[index])
    # A subset of a subset (a decode loop dropping done rows from a turn's active episodes).
    assert torch.equal(Rows(4, 16).subset(index, 6).select(torch.tensor([0, 2]), 3).draw(2, make), whole[[1, 5]])


def test_episode_settings_without_an_environment_are_a_one_line_error():
    with pytest.raises(ValueError, match="model.init_args.episodes .* need an environment: set model.init_args.env"):
        GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), LetterReward(), episodes=EpisodeConfig(),
                   rollout_batch_size=4)
    with pytest.raises(ValueError, match="sampling.decoder: static keeps one batch shape, but multi-turn episodes"):
        GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), LetterReward(), env=Scripted(),
                   sampling=SamplingConfig(decoder="static"), rollout_batch_size=4)
    with pytest.raises(ValueError, match="episodes: max_turns and max_tokens must be >= 1, got 0, 256"):
        EpisodeConfig(max_turns=0)


def test_chat_turns_stop_at_the_templates_end_of_turn_and_ended_means_the_last_turn_ended(tmp_path):
    # ChatML with <|im_end|> a special token that is not eos_token (<|endoftext|>), as Qwen2.5 base.
    module = GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", chat_template="chatml", lora=None),
                        LetterReward(), grpo=GRPOConfig(num_generations=2),
                        sampling=SamplingConfig(min_new_tokens=6, max_new_tokens=6), rollout_batch_size=4,
                        env=Scripted("36", turns=3, chat=True), episodes=EpisodeConfig(max_turns=4, max_tokens=200))
    tok = module.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    module.configure_model()  # the vocabulary has the two tokens
    im_end, letter, other = tok.convert_tokens_to_ids("<|im_end|>"), tok("a")["input_ids"][0], tok("b")["input_ids"][0]
    assert module.end_of_turn_ids == [tok.eos_token_id, im_end]
    rows = [{"prompt": [{"role": "user", "content": f"what is {i} times 3?"}]} for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PromptDataModule(str(tmp_path / "chat.jsonl"), batch_size=4, val_size=4, tokenizer=tok)
    data.setup("fit")
    batch = data.train_dataloader().dataset.batch(0)
    turn, final_ends = [0], [True]

    def script(policy, args, kwargs, out) -> None:
        """Each turn: "a", then <|im_end|>; the final (third) turn without it when final_ends is False."""
        prefill = (args[0] if args else kwargs["input_ids"]).size(1) > 1
        turn[0] += prefill
        end = turn[0] < 3 or final_ends[0]
        out.logits[:, -1] = -1e9
        out.logits[:, -1, letter if prefill else im_end if end else other] = 0.0

    hook = module.policy.register_forward_hook(script, with_kwargs=True)
    try:
        ended = module.sample(batch, torch.Generator().manual_seed(0))
        turn[0], final_ends[0] = 0, False
        cut = module.sample(batch, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    # Every turn stopped at <|im_end|> (not at the 6-token limit); the template's end of turn the
    # policy sampled is not repeated in the observation.
    assert (ended.action_mask.sum(-1) == 3 * 2).all() and module.last_episode_stats["episode/turns"] == 3
    assert [tok.decode(run) for run in _observed_runs(ended, 0)] == ["\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n"] * 2
    # The final answer cut at the token limit has not ended, though its tool turns ended with <|im_end|>.
    assert (cut.action_mask.sum(-1) == 2 + 2 + 6).all()
    assert ended.ended_with(module.end_of_turn_ids).all() and not cut.ended_with(module.end_of_turn_ids).any()
    scores = torch.zeros(len(cut))
    assert module.rollout_statistics(ended, scores)["rollout/truncated"] == 0
    assert module.rollout_statistics(cut, scores)["rollout/truncated"] == 1
    prompts = [p for p in batch["prompt"] for _ in range(2)]

    def penalty(rollout) -> list[float]:
        responses = decode_responses(tok, rollout)
        module.score_config.missing_eos_penalty = None
        plain = module.score(prompts, responses, rollout)
        module.score_config.missing_eos_penalty = -5.0
        return (module.score(prompts, responses, rollout) - plain).tolist()

    assert penalty(ended) == [0.0] * len(ended) and penalty(cut) == [-5.0] * len(cut)
