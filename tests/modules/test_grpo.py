"""GRPOModule: no critic, group advantages, exact invariants at step 0, passes skipped when
unneeded, it learns a rule-checked reward; the rule-based reward functions."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import GRPOModule
from lit_rlhf.modules.grpo import GRPOConfig
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.objectives import group_advantages, rloo_advantages
from lit_rlhf.optim import OptimConfig
from lit_rlhf.rewards import (
    ExactAnswerReward,
    LengthPenalty,
    RegexFormatReward,
    WeightedRewards,
    final_answer,
)
from tests.conftest import TINY_LLAMA
from tests.modules.ppo_helpers import LetterReward, make_data

LORA = LoraSettings(r=8, alpha=16, dropout=0.1, target_modules="all-linear")


def _module(reward=None, lora=LORA, prompts=4, lr=1e-3, decoder="dynamic", **grpo):
    grpo.setdefault("num_generations", 4)
    return GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora), reward or LetterReward(),
                      optim=OptimConfig(lr=lr, min_lr_ratio=1.0), grpo=GRPOConfig(**grpo),
                      sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8, decoder=decoder),
                      rollout_batch_size=prompts)


def _fit(module, tmp_path, rollouts=2, prompts=4, **data):
    trainer = L.Trainer(max_epochs=1, limit_train_batches=rollouts, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, data.pop("datamodule", None) or make_data(module, prompts, **data))
    return trainer


def _recording(module):
    seen, loss = [], module.loss

    def recording_loss(sub, *args):
        value, stats = loss(sub, *args)
        seen.append(dict(stats, n=len(sub), has_old=sub.logprobs is not None, has_ref=sub.ref_logprobs is not None))
        return value, stats

    module.loss = recording_loss
    return seen


@pytest.mark.parametrize("lora,num_iterations,decoder", [
    (LORA, 1, "dynamic"), (LORA, 2, "dynamic"), (None, 1, "dynamic"), (None, 2, "dynamic"),
    (LORA, 2, "static"), (None, 1, "compiled")])
def test_first_update_has_ratio_one_and_zero_kl_and_no_critic(tmp_path, lora, num_iterations, decoder):
    module = _module(lora=lora, num_iterations=num_iterations, decoder=decoder)
    seen = _recording(module)
    _fit(module, tmp_path, rollouts=2)
    assert module.policy.value_head is None  # critic-free: no value head at all
    first = seen[0]
    assert first["n"] == 16  # 4 prompts x 4 generations, one minibatch
    assert first["ratio_mean"].item() == 1.0 and first["ratio_max"].item() == 1.0
    assert first["kl"].item() == 0.0  # zero-initialised LoRA B / an untouched copy: the reference
    # One update per rollout needs no old log-prob pass; two passes do.
    assert first["has_old"] == (num_iterations == 2) and first["has_ref"]
    assert len(seen) == 2 * num_iterations


def test_kl_loss_coef_zero_skips_the_reference_pass(tmp_path):
    module = _module(kl_loss_coef=0.0)
    seen = _recording(module)
    _fit(module, tmp_path, rollouts=1)
    assert not seen[0]["has_ref"] and "kl" not in seen[0] and "loss_kl" not in seen[0]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_advantages_are_the_group_estimator_on_every_token(estimator):
    module = _module(advantage=estimator)
    scores = torch.tensor([1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    mask = torch.tensor([[1, 1, 0]] * 8, dtype=torch.float)
    rewards = torch.zeros(8, 3)
    rewards[:, 1] = scores  # the score sits on the last response token
    adv, returns = module.advantages(None, scores, rewards, mask)
    want = group_advantages(scores, 4) if estimator == "grpo" else rloo_advantages(scores, 4)
    assert returns is None
    torch.testing.assert_close(adv, want[:, None] * mask)
    assert adv[4:].abs().sum() == 0  # the second group's rewards are all equal: no signal


def test_bad_settings_fail_before_any_weights_load():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="kl_loss_coef must be >= 0"):
        GRPOConfig(kl_loss_coef=-1)
    with pytest.raises(ValueError, match="does not divide"):
        _module(prompts=3, mini_batch_size=8)  # 12 completions in minibatches of 8
    with pytest.raises(ValueError, match="sampling.decoder must be one of dynamic, static, compiled, got 'fast'"):
        SamplingConfig(decoder="fast")


def test_update_errors_name_grpos_own_keys_and_numbers():
    # The arithmetic recipe's shape: 3 prompts x 8 completions = 24, minibatches of 16.
    with pytest.raises(ValueError) as err:
        _module(prompts=3, num_generations=8, mini_batch_size=16)
    assert str(err.value) == ("grpo.mini_batch_size=16 does not divide the rollout's 24 completions "
                              "(data.batch_size=3 prompts x grpo.num_generations=8)")
    with pytest.raises(ValueError, match=r"^grpo.gradient_accumulation_steps=3 does not divide the minibatch of 16"):
        _module(prompts=4, mini_batch_size=16, gradient_accumulation_steps=3)


# Two groups of 4 with different rewards, two whose rewards are all equal.
MIXED_SCORES = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])


def test_skipping_zero_std_groups_updates_on_the_others_only(tmp_path):
    module = _module(skip_zero_std_groups=True)
    module.score = lambda *args, **kwargs: MIXED_SCORES.clone()
    seen, logged = _recording(module), []
    log_step = module._log_step
    module._log_step = lambda stats: (logged.append(stats), log_step(stats))
    _fit(module, tmp_path, rollouts=1)
    assert [s["n"] for s in seen] == [8]  # groups 0 and 3: one minibatch of their 8 episodes
    assert seen[0]["has_ref"] and not seen[0]["has_old"]  # one update on them: no old-log-prob pass
    assert logged[0]["rollout/updated_fraction"].item() == 0.5
    assert logged[0]["rollout/zero_std_groups"].item() == 2.0
    assert logged[0]["env/score"].item() == pytest.approx(MIXED_SCORES.mean().item())  # over every episode


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_skipped_groups_carry_no_gradient_at_step_0(aggregation):
    # Their advantage is 0 and at step 0 so is the k3 KL's gradient: the update on the other
    # groups is the full update's, rescaled by the number of tokens (or sequences) averaged over.
    module = _module(lora=None, skip_zero_std_groups=True, loss_aggregation=aggregation)
    module.configure_model()
    from tests.modules.ppo_helpers import make_batch

    rollout = module.sample(make_batch(module, n=4), module.generator)
    module.scoring_passes(rollout)
    mask = rollout.response_mask.float()
    adv, _ = module.advantages(rollout, MIXED_SCORES, torch.zeros_like(mask), mask)
    keep = module.episodes_to_update(MIXED_SCORES)
    assert keep.tolist() == [0, 1, 2, 3, 12, 13, 14, 15]

    def grads(sub, sub_adv):
        module.policy.zero_grad()
        module.loss(sub, sub_adv, None)[0].backward()
        return [p.grad.clone() for p in module.policy.parameters() if p.requires_grad]

    full, skipped = grads(rollout, adv), grads(rollout[keep], adv[keep])
    kept_mask = mask[keep]
    factor = (mask.sum() / kept_mask.sum() if aggregation == "token_mean" else torch.tensor(16 / 8)).item()
    for g_full, g_skip in zip(full, skipped):
        torch.testing.assert_close(g_skip, g_full * factor, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_cut_by_tokens_give_the_whole_minibatchs_gradient(tmp_path, aggregation):
    # 16 completions of different lengths in micro-batches of at most 30 tokens (several, of
    # unequal sizes): each weighed by its share of the loss's tokens or sequences.
    # The no-grad reference pass runs in pieces of the same budget, to the same log-probs.
    grads, pieces, refs, passes = {}, {}, {}, {}
    for budget in (None, 30):
        module = _module(lora=None, mini_batch_size=16, mini_batch_tokens=budget, loss_aggregation=aggregation,
                         max_grad_norm=1e9)
        seen, cut, evaluate = [], module._micro_batches, module.evaluate
        module._micro_batches = lambda rollout, minibatch: pieces.setdefault(budget, cut(rollout, minibatch))
        module._clip_gradients = lambda optimizer, norm: seen.append(
            [p.grad.clone() for p in module.policy.parameters() if p.requires_grad])
        module.evaluate = lambda policy, rollout, **kw: (
            passes.setdefault(budget, []).append(len(rollout)) or evaluate(policy, rollout, **kw))
        scoring = module.scoring_passes
        module.scoring_passes = lambda rollout, *a: (scoring(rollout, *a), refs.setdefault(budget, rollout.ref_logprobs))
        _fit(module, tmp_path, rollouts=1)
        grads[budget] = seen[0]
    sizes = [len(p) for p in pieces[30]]
    assert len(pieces[None]) == 1 and len(sizes) > 2 and len(set(sizes)) > 1 and sum(sizes) == 16
    for whole, cut in zip(grads[None], grads[30]):
        torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-7)
    assert passes[None][0] == 16 and len(passes[30]) > len(passes[None])  # the reference pass, cut too
    torch.testing.assert_close(refs[30], refs[None], rtol=1e-5, atol=1e-6)


def test_token_pieces_cut_in_order_within_the_budget():
    from lit_rlhf.modules.update import token_pieces

    assert token_pieces([3, 4, 2, 6, 1], budget=7) == [[0, 1], [2], [3, 4]]
    assert token_pieces([9, 2, 2], budget=4) == [[0], [1, 2]]  # an episode over the budget: alone
    # As many pieces as another rank needs: the heaviest split in two, by tokens.
    assert token_pieces([3, 4, 2, 6, 1], budget=7, count=4) == [[0], [1], [2], [3, 4]]
    assert token_pieces([1, 1, 1, 5], budget=8, count=2) == [[0, 1, 2], [3]]
    assert token_pieces([2, 2], budget=8, count=2) == [[0], [1]]
    with pytest.raises(ValueError, match="cannot cut 2 episodes into 3 micro-batches"):
        token_pieces([2, 2], budget=8, count=3)
    # With a count per piece (gradient_accumulation_steps), each count's piece is cut by tokens.
    from lit_rlhf.modules.update import cut_pieces

    assert cut_pieces([3, 4, 2, 6, 1], budget=6, per_piece=2) == [[0], [1], [2], [3], [4]]
    assert cut_pieces([3, 4, 2, 6, 1], budget=100, per_piece=2) == [[0, 1], [2, 3], [4]]
    assert cut_pieces([3, 4, 2, 6, 1], budget=100, per_piece=3, count=3) == [[0, 1], [2], [3, 4]]
    GRPOConfig(mini_batch_tokens=64, gradient_accumulation_steps=2)  # both at once: allowed
    with pytest.raises(ValueError, match="ppo.mini_batch_tokens must be >= 1, got 0"):
        PPOConfig(mini_batch_tokens=0)


def test_a_short_minibatch_averages_over_its_own_pieces(tmp_path):
    # 8 kept episodes in a minibatch of 16 with 4 accumulation steps: 2 pieces of 4, whose
    # mean is the 8 episodes' mean (dividing by 4 would halve the gradient).
    grads = {}
    for accumulation in (1, 4):
        module = _module(lora=None, skip_zero_std_groups=True, mini_batch_size=16,
                         gradient_accumulation_steps=accumulation, max_grad_norm=1e9)
        module.score = lambda *args, **kwargs: MIXED_SCORES.clone()
        seen = []
        module._clip_gradients = lambda optimizer, norm: seen.append(
            [p.grad.clone() for p in module.policy.parameters() if p.requires_grad])
        _fit(module, tmp_path, rollouts=1)
        grads[accumulation] = seen[0]
    for whole, pieces in zip(grads[1], grads[4]):
        torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-7)


def test_skipping_keeps_as_many_groups_on_every_rank():
    # Under DDP the rank with the most informative groups sets the count (here 3 of 4);
    # this rank has 2 and fills up with its first left-out group.
    from types import SimpleNamespace

    module = _module(skip_zero_std_groups=True)
    module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        all_gather=lambda t: torch.stack([t, torch.tensor(3)])))
    assert module.episodes_to_update(MIXED_SCORES).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]


def test_skipping_zero_std_groups_refuses_batch_statistics_and_kl_in_reward():
    with pytest.raises(ValueError, match="skip_zero_std_groups needs per-group advantages"):
        GRPOConfig(skip_zero_std_groups=True, scale="batch")
    with pytest.raises(ValueError, match="skip_zero_std_groups needs per-group advantages"):
        GRPOConfig(skip_zero_std_groups=True, advantage="reinforce_baseline")
    with pytest.raises(ValueError, match="needs the KL in the loss"):
        GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), LetterReward(), rollout_batch_size=4,
                   grpo=GRPOConfig(num_generations=4, skip_zero_std_groups=True), kl={"init_coef": 0.1})


@pytest.mark.slow
def test_grpo_learns_a_rule_checked_reward(tmp_path):
    # The letter "e" counted in each response: from the random-init start to clearly more.
    # Full fine-tuning: LoRA leaves the random-init output layer as it is, which is slow to steer.
    torch.manual_seed(0)
    module = _module(lora=None, num_generations=8, prompts=8, lr=3e-3, kl_loss_coef=0.0, clip_range_high=0.28,
                     loss_aggregation="token_mean", num_iterations=4, mini_batch_size=32)
    scores = []
    log_step = module._log_step
    module._log_step = lambda stats: (scores.append(float(stats["env/score"])), log_step(stats))
    _fit(module, tmp_path, rollouts=30, prompts=8)
    assert sum(scores[-5:]) / 5 > 1.5 * sum(scores[:5]) / 5 + 0.2, scores


def test_exact_answer_and_format_and_length_rules():
    assert final_answer("The answer is 12, no, 46.") == "46" and final_answer("none") is None
    reward = ExactAnswerReward()
    out = reward(["1+2=", "3+4=", "5+5=", "9+9="], ["3", "7.0", "11", "eighteen"], answer=["3", "7", "10", "18"])
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert reward.statistics()["accuracy"].item() == 0.5
    assert RegexFormatReward(r"\d+")([""] * 3, ["46", " 46 ", "46 apples"]).tolist() == [1.0, 1.0, 0.0]
    assert RegexFormatReward(r"\d+", full_match=False)([""], ["46 apples"]).tolist() == [1.0]
    assert LengthPenalty(max_words=2, coef=0.5)([""] * 2, ["a b", "a b c d"]).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="is not a regular expression"):
        RegexFormatReward("(")


def test_weighted_rewards_sum_and_report_each_function():
    combined = WeightedRewards([ExactAnswerReward(), RegexFormatReward(r"\d+"), RegexFormatReward("x")],
                               weights=[1.0, 0.5, 2.0])
    assert combined.fields == ("answer",)
    out = combined(["1+1="] * 2, ["2", "two"], answer=["2", "2"])
    assert out.tolist() == [1.5, 0.0]
    stats = combined.statistics()
    assert set(stats) == {"exact_answer", "exact_answer/accuracy", "regex_format", "regex_format_2"}
    assert stats["regex_format"].item() == 0.5 and stats["exact_answer/accuracy"].item() == 0.5
    with pytest.raises(ValueError, match="2 weights for 3 functions"):
        WeightedRewards([LengthPenalty(1)] * 3, weights=[1.0, 1.0])


def _arithmetic_rows(tmp_path, n=40):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(n)))
    return path


def test_prompt_rows_carry_fields_to_the_reward_function(tmp_path):
    module = _module(reward=ExactAnswerReward(), prompts=4)
    data = PromptDataModule(path=str(_arithmetic_rows(tmp_path)), fields=["answer"], batch_size=4, val_size=8,
                            tokenizer=module.tokenizer)
    data.setup("fit")
    batch = data.train_dataloader().dataset.batch(0)
    assert [str(2 * int(p.split("+")[0])) for p in batch["prompt"]] == batch["fields"]["answer"]
    module.num_generations = 3
    assert module.row_fields(module.reward_fn, batch)["answer"][:3] == [batch["fields"]["answer"][0]] * 3
    seen = []
    log_step = module._log_step
    module._log_step = lambda stats: (seen.append(stats), log_step(stats))
    module.num_generations = 4
    _fit(module, tmp_path, rollouts=1, datamodule=data)
    assert "rewards/accuracy" in seen[0] and 0.0 <= float(seen[0]["rewards/accuracy"]) <= 1.0


def test_a_reward_field_missing_from_the_data_stops_before_training(tmp_path):
    module = _module(reward=ExactAnswerReward(), prompts=4)
    data = PromptDataModule(path=str(_arithmetic_rows(tmp_path)), batch_size=4, val_size=8, tokenizer=module.tokenizer)
    with pytest.raises(ValueError, match=r"ExactAnswerReward needs the prompt rows' field\(s\) \['answer'\]"):
        _fit(module, tmp_path, rollouts=1, datamodule=data)
    assert module.policy is None  # no weights were loaded


@pytest.mark.parametrize("multi_turn", [False, True], ids=["one-turn", "multi-turn"])
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, multi_turn):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_rlhf.modules.episodes import EpisodeConfig
    from tests.envs.scripted import Scripted

    # 4 rollouts of 4 prompts x 4 generations; 2 iterations x 2 minibatches of 8 = 4 optimizer
    # steps each, so a checkpoint every 8 steps falls after rollout 2.
    def module():
        made = _module(num_iterations=2, mini_batch_size=8)
        if multi_turn:  # episodes of 3 turns with 2 observations
            made.env, made.episode_config = Scripted(turns=3), EpisodeConfig(max_turns=3, max_tokens=48)
        return made

    straight = module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, accelerator="cpu", logger=False,
              default_root_dir=tmp_path / "a", enable_progress_bar=False, callbacks=[ckpt],
              enable_model_summary=False).fit(straight, make_data(straight, 4))
    resumed = module()
    L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, accelerator="cpu", logger=False,
              default_root_dir=tmp_path / "b", enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False).fit(resumed, make_data(resumed, 4),
                                              ckpt_path=tmp_path / "ckpt" / "epoch=0-step=8.ckpt")
    assert resumed.rollouts_done == straight.rollouts_done == 4
    assert not multi_turn or resumed.last_episode_stats["episode/turns"] == 3
    want = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=8.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)  # the adapter only: no value head, no frozen base


def test_a_static_decoder_under_fsdp2_is_a_one_line_error_before_weights_load():
    from types import SimpleNamespace

    from lit_rlhf.strategies import FSDP2Strategy

    module = _module(decoder="compiled")
    module._trainer = SimpleNamespace(strategy=FSDP2Strategy())
    with pytest.raises(ValueError, match="sampling.decoder: compiled is not supported under the fsdp2 strategy"):
        module.configure_model()
    assert module.policy is None


def test_the_default_pass_budget_comes_from_the_model_shape_and_the_device_memory():
    from types import SimpleNamespace

    from lit_rlhf.modules.update import MIN_PASS_TOKENS, auto_pass_tokens

    qwen = SimpleNamespace(hidden_size=896, num_hidden_layers=24, intermediate_size=4864)
    # 12 * 896 + 4 * 4864 = 30,208 values per token and layer; 24 layers in bf16: 1,449,984 bytes.
    assert auto_pass_tokens(qwen, 2, 80 * 2**30) == (80 * 2**30 // 8) // 1_449_984 == 7405
    # Gradient checkpointing keeps one layer's activations and every layer's input.
    assert auto_pass_tokens(qwen, 2, 80 * 2**30, checkpointing=True) == (10 * 2**30) // ((30_208 + 24 * 896) * 2)
    assert auto_pass_tokens(qwen, 4, 2**30) == MIN_PASS_TOKENS  # a small device: the floor
