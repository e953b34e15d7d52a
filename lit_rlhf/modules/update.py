"""The minibatch update loop every online method shares: epochs x shuffled minibatches x
gradient accumulation, with ratio skips, a KL early stop, gradient clipping and DDP's
reductions.

:class:`UpdateConfig` holds its settings in neutral names; each method builds one from its own
config block (PPO's ``ppo:``, GRPO's ``grpo:``), whose keys its messages name.
:class:`MinibatchUpdates` is the part of :class:`~lit_rlhf.modules.online.OnlineRLModule`
that runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ParallelStrategy

from lit_rlhf.models.compat import activation_checkpointing
from lit_rlhf.models.sharding import clip_grad_norm


@dataclass
class MinibatchSettings:
    """The update loop's settings that online methods' configs share under these names."""

    mini_batch_size: int = 8
    """Episodes per optimizer step, per device; must divide the rollout batch size."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch; must divide mini_batch_size."""
    mini_batch_tokens: int | None = None
    """At most this many prompt + response tokens in one forward of the online passes: each
    update micro-batch (after the ``gradient_accumulation_steps`` cut) and each no-grad pass
    (old log-probs and values, reference log-probs) is cut further, in order, by tokens (see
    :func:`token_pieces`; an episode longer than that alone). None: derived from the model's
    shape and the device's memory (:func:`auto_pass_tokens`), so that long responses never
    need it set to fit."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0: off)."""
    max_grad_norm: float | None = 1.0
    """Gradient norm clip; None: off."""
    target_kl: float | None = None
    """Stop a rollout's epochs once approx-KL exceeds 1.5 x target_kl; None: off."""
    ratio_threshold: float | None = 10.0
    """Skip (and count) a minibatch whose mean ratio exceeds this; None: off."""
    packed: bool = True
    """Padding-free scoring and update passes: each pass lays its episodes end to end in one row
    (one causal attention per episode) when that runs fewer tokens than padded rows (``sdpa``
    models; others stay padded)."""

    def check_tokens(self, prefix: str) -> None:
        """A token budget is positive (errors name ``prefix``)."""
        if self.mini_batch_tokens is not None and self.mini_batch_tokens < 1:
            raise ValueError(f"{prefix}.mini_batch_tokens must be >= 1, got {self.mini_batch_tokens}")

    def shared(self) -> dict:
        """These settings by name (for building an :class:`UpdateConfig`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MinibatchSettings)}


@dataclass
class UpdateConfig(MinibatchSettings):
    """The shared update loop's settings, in neutral names (each method maps its config onto them)."""

    epochs: int = 1
    """Passes over each rollout."""


class MinibatchUpdates:
    """The update loop of an online LightningModule (manual optimization).

    The module supplies ``update_config``, ``generator``, ``stats_prefix``, ``loss(sub,
    advantages, returns) -> (loss, stats)`` with ``ratio_mean``, ``ratio_max`` and
    ``approx_kl`` among the statistics, and may override :meth:`loss_weight`.
    """

    def loss_weight(self, sub) -> torch.Tensor:
        """() the count the loss of ``sub`` is a mean over, which weighs each micro-batch: its
        episodes by default; a loss averaged over tokens returns its tokens."""
        return torch.tensor(float(len(sub)), device=sub.response_ids.device)

    def update_policy(self, rollout, advantages: torch.Tensor, returns: torch.Tensor | None) -> dict:
        """epochs x shuffled minibatches x gradient accumulation; returns mean statistics.

        Args:
            rollout: the B episodes to update on.
            advantages: (B, Tr); returns: (B, Tr) or None (critic-free).
        """
        cfg = self.update_config
        sums: dict[str, torch.Tensor] = {}
        counts = {"n": 0, "skipped": 0, "epochs": 0}
        ratio_max = torch.zeros((), device=self.device)
        shuffle = self._shuffle_generator()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(rollout), generator=shuffle, device=shuffle.device)
            epoch_kl = []
            for minibatch in order.split(cfg.mini_batch_size):
                ratio_max = self._minibatch_step(rollout, advantages, returns, minibatch, sums, counts,
                                                 epoch_kl, ratio_max)
            counts["epochs"] += 1
            if cfg.target_kl is not None and self._mean_ranks(torch.stack(epoch_kl).mean()) > 1.5 * cfg.target_kl:
                break
        out = {k: v / max(counts["n"], 1) for k, v in sums.items()}
        out["ratio_max"] = ratio_max
        out["skipped_minibatches"] = torch.tensor(float(counts["skipped"]))
        out["epochs"] = torch.tensor(float(counts["epochs"]))
        return {f"{self.stats_prefix}/{k}": v for k, v in out.items()}

    def _shuffle_generator(self) -> torch.Generator:
        """This rank's minibatch shuffles, seeded by one draw of the sampling generator: the
        ranks' sampling generators stay in lockstep however many episodes each rank updates on."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator, device=self.generator.device))
        return torch.Generator(device=self.generator.device).manual_seed(seed + self.global_rank)

    def _minibatch_step(self, rollout, advantages, returns, minibatch, sums, counts, epoch_kl, ratio_max):
        """One optimizer step over ``minibatch`` (episode indices), or a skip; statistics are
        summed on the device (no host sync per micro-batch)."""
        cfg, optimizer = self.update_config, self.optimizers()
        ratios = []
        pieces = self._micro_batches(rollout, minibatch)
        # Each piece's loss is a mean over its own episodes or tokens: weighted by its share of
        # them, the pieces' gradients sum to the whole minibatch's (a short last piece included).
        subs = [rollout[idx] for idx in pieces]
        weights = torch.stack([self.loss_weight(sub).float() for sub in subs])
        total = weights.sum()  # 0 only when no piece has a token to learn from: then equal weights
        weights = torch.where(total > 0, weights / total.clamp(min=1e-12), torch.full_like(weights, 1 / len(pieces)))
        for i, (idx, sub) in enumerate(zip(pieces, subs)):
            loss, stats = self.loss(sub, advantages[idx], None if returns is None else returns[idx])
            self.check_finite(f"{self.stats_prefix}/loss_total", loss)
            with self._accumulating(last=i == len(pieces) - 1):
                self.manual_backward(loss * weights[i])
            ratios.append(stats["ratio_mean"])
            epoch_kl.append(stats["approx_kl"])
            ratio_max = torch.maximum(ratio_max, stats.pop("ratio_max").float())
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value.float()
            counts["n"] += 1
        mean_ratio = self._mean_ranks(torch.stack(ratios).mean())
        if cfg.ratio_threshold is not None and mean_ratio > cfg.ratio_threshold:
            # A blown-up ratio means this minibatch is far off-policy: drop its update.
            optimizer.zero_grad()
            counts["skipped"] += 1
            return ratio_max
        if cfg.max_grad_norm is not None:
            self._clip_gradients(optimizer, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return ratio_max

    def _micro_batches(self, rollout, minibatch: torch.Tensor) -> list[torch.Tensor]:
        """The minibatch's episode indices cut into micro-batches: ``gradient_accumulation_steps``
        equal counts (fewer for a short minibatch), each cut further by the pass token budget."""
        cfg = self.update_config
        return [minibatch[piece] for piece in self.pieces_by_tokens(rollout[minibatch],
                                                                cfg.mini_batch_size // cfg.gradient_accumulation_steps)]

    def pieces_by_tokens(self, rollout, per_piece: int | None = None) -> list[torch.Tensor]:
        """Positions ``0 .. len(rollout) - 1`` cut, in order, into pieces of at most ``per_piece``
        episodes (None: no count limit) and :meth:`pass_tokens` prompt + response tokens. Under
        ``fsdp2`` every rank cuts as many pieces as the rank that needs the most: a sharded
        forward is a collective, and every rank must run as many (under DDP only the backward's
        all-reduce is, once per minibatch)."""
        lengths = (rollout.query_mask.sum(-1) + rollout.response_mask.sum(-1)).tolist()
        pieces = cut_pieces(lengths, self.pass_tokens(), per_piece)
        if getattr(self, "sharding", None) is not None and self.trainer.world_size > 1:
            count = int(self.trainer.strategy.all_gather(torch.tensor(len(pieces), device=self.device)).max())
            pieces = cut_pieces(lengths, self.pass_tokens(), per_piece, count)
        device = rollout.query_ids.device
        return [torch.tensor(piece, device=device, dtype=torch.long) for piece in pieces]

    def pass_tokens(self) -> int:
        """The token budget of one forward: ``mini_batch_tokens``, or :func:`auto_pass_tokens`
        for this model, precision and device (computed once)."""
        if self.update_config.mini_batch_tokens is not None:
            return self.update_config.mini_batch_tokens
        if getattr(self, "_auto_pass_tokens", None) is None:
            base = self.policy.base_model
            checkpointing = activation_checkpointing(base)
            self._auto_pass_tokens = auto_pass_tokens(base.config, activation_bytes(self.compute_dtype),
                                                      device_memory(self.device), checkpointing)
        return self._auto_pass_tokens

    def _accumulating(self, last: bool):
        """Under DDP, a non-final micro-batch's backward only accumulates gradients: the
        all-reduce runs once per optimizer step, with the last micro-batch."""
        strategy = self.trainer.strategy
        if last or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def _loss_scaler(self):
        """The fp16 GradScaler of ``16-mixed``; None for fp32 and bf16."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _allow_fused_optimizer(self) -> bool:
        return self._loss_scaler() is None  # see _clip_gradients

    def _clip_gradients(self, optimizer, max_norm: float) -> None:
        if self.sharding is not None:  # fsdp2: shards wherever they live (cpu_offload under NCCL too)
            clip_grad_norm([p for group in optimizer.param_groups for p in group["params"]], max_norm)
        elif isinstance(self.trainer.precision_plugin, MixedPrecision) and self._loss_scaler() is None:
            # bf16-mixed: nothing to unscale, so clip directly. Lightning's clip_gradients
            # refuses any fused optimizer under this plugin, although it has no scaler. The
            # other cases (fp32, fp16 with its scaler) go through Lightning.
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------------------ DDP reductions

    def _sum_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce sum (identity on one device): shared whitening statistics."""
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def _mean_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, so decisions (early stop, skips, KL control) agree everywhere."""
        return self.trainer.strategy.reduce(t.float(), reduce_op="mean") if self.trainer.world_size > 1 else t


PASS_MEMORY_SHARE = 1 / 8
"""Share of the device's memory that one update micro-batch's kept activations may take by default."""

MIN_PASS_TOKENS = 512
"""The smallest default budget (a forward of fewer tokens leaves an accelerator idle)."""


def auto_pass_tokens(config, activation_bytes: int, memory: int, checkpointing: bool = False) -> int:
    """The default token budget of one forward (``mini_batch_tokens`` unset).

    What one token costs in a forward + backward once the logits are computed in chunks
    (:func:`~lit_rlhf.objectives.logprobs.head_logprobs`): the activations each block keeps for
    its backward, about ``12 * hidden + 4 * intermediate`` values per token (norm inputs, q, k,
    v and attention outputs, the MLP's gate, up and product; within 12% of the estimator's
    ``layer_activation_bytes`` at Qwen2.5-0.5B's shape in fp32 and bf16), times the layers (one layer under gradient checkpointing, plus each
    layer's input). The budget is the number of tokens whose activations fill
    ``PASS_MEMORY_SHARE`` of ``memory``, at least ``MIN_PASS_TOKENS``. No-grad passes keep no
    activations and use the same budget (one setting for every pass).

    Args:
        config: the transformers model config (its text config is read).
        activation_bytes: bytes per activation value (2 under 16-bit precision, else 4).
        memory: the device's memory in bytes (:func:`device_memory`).
        checkpointing: gradient checkpointing is on.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    layers = text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    per_layer = 12 * hidden + 4 * intermediate
    per_token = (per_layer + layers * hidden if checkpointing else layers * per_layer) * activation_bytes
    return max(MIN_PASS_TOKENS, int(memory * PASS_MEMORY_SHARE) // per_token)


def activation_bytes(dtype: torch.dtype) -> int:
    """Bytes per activation value for a compute dtype (bf16/fp16: 2; else 4)."""
    return 2 if dtype in (torch.bfloat16, torch.float16) else 4


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the accelerator's, or the host's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cut_pieces(lengths: list[int], budget: int, per_piece: int | None = None, count: int | None = None) -> list[list[int]]:
    """Positions ``0 .. len(lengths) - 1`` cut, in order, into consecutive pieces of at most
    ``per_piece`` episodes (None: any number) and each of those into pieces of at most ``budget``
    tokens (:func:`token_pieces`); ``count``: then split the pieces with the most tokens in two
    until there are ``count``.

    >>> cut_pieces([3, 4, 2, 6, 1], budget=6, per_piece=2)
    [[0], [1], [2], [3], [4]]
    >>> cut_pieces([3, 4, 2, 6, 1], budget=100, per_piece=2)
    [[0, 1], [2, 3], [4]]
    """
    n = len(lengths)
    per_piece = per_piece or max(n, 1)
    pieces = [[start + i for i in piece]
              for start in range(0, n, per_piece)
              for piece in token_pieces(lengths[start:start + per_piece], budget)]
    return pieces if count is None else split_pieces(pieces, lengths, count)


def token_pieces(lengths: list[int], budget: int, count: int | None = None) -> list[list[int]]:
    """Positions ``0 .. len(lengths) - 1`` cut, in order, into consecutive micro-batches of at most
    ``budget`` tokens (``lengths``: each episode's tokens); an episode longer than the budget is
    a micro-batch of its own. ``count``: then split the micro-batches with the most tokens in
    two (by tokens) until there are ``count`` (at most one per episode).

    >>> token_pieces([3, 4, 2, 6, 1], budget=7)
    [[0, 1], [2], [3, 4]]
    >>> token_pieces([3, 4, 2, 6, 1], budget=7, count=4)
    [[0], [1], [2], [3, 4]]
    """
    pieces: list[list[int]] = []
    used = budget  # start a new piece at the first episode
    for i, n in enumerate(lengths):
        if used + n > budget:
            pieces.append([])
            used = 0
        pieces[-1].append(i)
        used += n
    return pieces if count is None else split_pieces(pieces, lengths, count)


def split_pieces(pieces: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """``pieces`` with the one of the most tokens split in two (by tokens) until there are ``count``."""
    if not len(pieces) <= count <= len(lengths):
        raise ValueError(f"cannot cut {len(lengths)} episodes into {count} micro-batches (they need {len(pieces)})")
    pieces = [list(p) for p in pieces]
    while len(pieces) < count:
        j = max((j for j, p in enumerate(pieces) if len(p) > 1), key=lambda j: sum(lengths[i] for i in pieces[j]))
        piece, half, acc = pieces[j], sum(lengths[i] for i in pieces[j]) / 2, 0
        cut = 1
        for k, i in enumerate(piece[:-1], start=1):
            acc += lengths[i]
            cut = k
            if acc >= half:
                break
        pieces[j:j + 1] = [piece[:cut], piece[cut:]]
    return pieces
