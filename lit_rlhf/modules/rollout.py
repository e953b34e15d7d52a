"""Rollouts: sample responses with a KV cache, then score them with one forward pass.

Tensor layout of a rollout of B prompts:

* ``query_ids``, ``query_mask``: (B, Tq), **left**-padded, so every prompt ends at column
  Tq - 1 and generation appends at the same column for all rows;
* ``response_ids``, ``response_mask``: (B, Tr), **right**-padded; the mask is 1 on sampled
  tokens up to and including EOS and 0 after it;
* ``logprobs``, ``ref_logprobs``, ``values``: (B, Tr), for response token j taken from the
  logits/value at position Tq + j - 1 (the state before token j was emitted);
* ``observation_mask``: (B, Tr), only in multi-turn episodes (:mod:`lit_rlhf.modules.episodes`):
  1 on the environment's tokens inside the response. They are context the policy attends to,
  never actions: :attr:`Rollout.action_mask` (the response mask without them) is the mask of
  every loss, KL, entropy and advantage.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from lit_rlhf.models.compat import activation_checkpointing
from lit_rlhf.models.linears import with_onednn_linears
from lit_rlhf.objectives.logprobs import EntropyMode


@dataclass
class Rollout:
    """One batch of sampled episodes and what the update needs from the sampling time."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    observation_mask: torch.Tensor | None = None
    sample_logprobs: torch.Tensor | None = None
    """(B, Tr): the sampler's log-probs of the tokens it drew (0 on observations and padding)."""
    env_reward: torch.Tensor | None = None
    """(B,): multi-turn episodes: the environment's reward, summed over the episode."""

    @property
    def action_mask(self) -> torch.Tensor:
        """(B, Tr), the response mask's dtype: 1 on the tokens the policy sampled (EOS included),
        0 on padding and on observation tokens."""
        if self.observation_mask is None:
            return self.response_mask
        return self.response_mask * (1 - self.observation_mask.to(self.response_mask.dtype))

    def __len__(self) -> int:
        return self.query_ids.size(0)

    def __getitem__(self, index: torch.Tensor) -> Rollout:
        """Select episodes (a minibatch) by index tensor."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in fields(self)})

    def ended_with(self, end_ids: int | list[int] | torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where the policy's last token is one of ``end_ids`` (an id or a list:
        the end-of-turn ids, :func:`~lit_rlhf.models.templates.end_of_turn_ids`).

        The last action token, not any: in a multi-turn episode each tool turn may end with
        one, and a final answer cut at the token limit has not ended. A single response stops
        at its first end id, so there the two are the same."""
        action = self.action_mask.bool()
        last = action & (action.long().cumsum(-1) == action.sum(-1, keepdim=True))  # (B, Tr): one per row
        ends = torch.as_tensor(end_ids, device=self.response_ids.device).reshape(-1)
        return (torch.isin(self.response_ids, ends) & last).any(-1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query + response as (input_ids, attention_mask, position_ids), each (B, Tq + Tr).

        Position ids count real tokens only, so a left-padded prompt sees the same positions
        as it would unpadded.
        """
        input_ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return input_ids, mask, positions


@dataclass(frozen=True)
class Rows:
    """Where a rank's B rows sit in the global batch of all ranks: rows ``offset .. offset + B
    - 1`` of ``total``. Every random draw is made for the whole global batch, with a generator
    seeded alike on every rank, and each rank keeps its own rows: the same seed samples the same
    responses on one device or on eight (and the ranks' generators stay in lockstep)."""

    offset: int = 0
    total: int | None = None  # None: this rank's rows are the whole batch
    index: torch.Tensor | None = None  # a subset of this rank's ``size`` rows (multi-turn: the active episodes)
    size: int | None = None

    def draw(self, n: int, make) -> torch.Tensor:
        """This rank's ``n`` rows of ``make(total)``, a draw of one value per global row."""
        if self.index is not None:  # the draw for all of this rank's rows, then the subset's
            full = Rows(self.offset, self.total).draw(self.size, make)
            return full[self.index.to(full.device)]
        if self.total is None:
            return make(n)
        if self.offset + n > self.total:
            raise ValueError(f"rows {self.offset}..{self.offset + n - 1} outside a global batch of {self.total}")
        return make(self.total)[self.offset : self.offset + n]

    def subset(self, index: torch.Tensor, size: int) -> Rows:
        """Rows ``index`` of this rank's ``size`` rows: their draws are those they would get
        in the whole batch, so an episode's samples do not depend on which others are active."""
        return Rows(self.offset, self.total, index, size)

    def select(self, index: torch.Tensor, n: int) -> Rows:
        """Rows ``index`` of these ``n`` rows (of a subset, the subset's own rows)."""
        if self.index is None:
            return self.subset(index, n)
        return Rows(self.offset, self.total, self.index.to(index.device)[index], self.size)

    def scaled(self, factor: int) -> Rows:
        """The same place with every row repeated ``factor`` times (a group of responses)."""
        return Rows(self.offset * factor, None if self.total is None else self.total * factor)


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits -> (B, V) float32 probabilities of the sampler (temperature, top-k, top-p).

    ``top_k=0`` and ``top_p=1`` sample from the full distribution, which PPO's KL estimate
    needs: any truncation makes the sampled tokens unrepresentative of the policy whose
    log-probs enter the KL, and the k1 estimate can then go negative.
    """
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 would change nothing but cost a pass over (B, V)
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p (keeps at least one).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


SAMPLING_BLOCK = 1024
"""Vocabulary entries per block of the two-level draw in :func:`sample_categorical`."""


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None,
                       rows: Rows = Rows()) -> torch.Tensor:
    """(B, V) probabilities -> (B,) indices, one exact draw per row by inverse transform.

    One uniform number per row against the cumulative distribution. On CPU this measured
    about 20 times faster than ``torch.multinomial``, which draws an exponential variate for
    every one of the V entries. The distribution is searched in two levels, so that no (B, V)
    temporary is made beyond one float32 pass over ``probs`` (a float64 cumulative sum over the
    whole vocabulary was 620 MB per decode step at 512 rows x 152k ids): the block of
    ``SAMPLING_BLOCK`` entries first, by the float64 cumulative sum of the (B, V / block) block
    sums, then the entry inside the chosen block, by the same uniform number rescaled to that
    block (uniform on [0, 1) given the block). Both searches find the first interval whose end
    lies beyond the draw, so a block or an entry of probability 0 (an empty interval) is never
    picked.
    """
    b, v = probs.shape
    block = SAMPLING_BLOCK
    whole = v // block * block
    # Block sums in float32 (a float64 sum would copy the whole input first), then float64.
    sums = [probs[:, :whole].reshape(b, -1, block).sum(-1)] if whole else []
    if whole < v:
        sums.append(probs[:, whole:].sum(-1, keepdim=True))
    block_cdf = torch.cat(sums, dim=1).double().cumsum(-1)  # (B, ceil(V / block))
    u = rows.draw(b, lambda n: torch.rand(n, 1, generator=generator, device=probs.device, dtype=torch.float64))
    target = u * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.size(1) - 1)  # (B, 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    mass = block_cdf.gather(1, chosen) - before
    fraction = ((target - before) / mass).clamp(0.0, 1.0 - 2**-40)  # uniform on [0, 1) within the block
    columns = chosen * block + torch.arange(block, device=probs.device)  # (B, block)
    inside = probs.gather(1, columns.clamp(max=v - 1)).masked_fill(columns >= v, 0.0).double().cumsum(-1)
    within = torch.searchsorted(inside, fraction * inside[:, -1:], right=True).clamp(max=block - 1)
    return (chosen * block + within).squeeze(-1)


@torch.no_grad()
@with_onednn_linears
def generate(
    policy,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: torch.Tensor,
    *,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    num_generations: int = 1,
    rows: Rows = Rows(),
    all_done: Callable[[torch.Tensor], bool] = lambda done: bool(done.all()),
    stop: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    decoder: str = "dynamic",
) -> Rollout:
    """Sample a response for every (left-padded) prompt, reusing the KV cache: a :class:`Rollout`
    of B * G episodes with the sampler's log-probs (the other log-probs and values not yet filled).

    Args:
        policy: a :class:`~lit_rlhf.models.heads.PolicyWithValueHead` (or anything called alike).
        query_ids, query_mask: (B, Tq) left-padded prompts.
        max_new_tokens: (B * G,) per-row length limit (from a length sampler; no minimum); a row
            also stops at its first EOS: ``eos_token_id``, an id or a list (every end-of-turn id,
            :func:`~lit_rlhf.models.templates.end_of_turn_ids`); None: never, for fixed-length benchmarks.
        num_generations: G independent responses per prompt (a group), rows ``b * G .. b * G
            + G - 1`` for prompt b. Each prompt is prefilled once and its KV cache repeated.
        rows: where this rank's B * G rows sit in the global batch (see :class:`Rows`).
        all_done: ``(B * G,) done -> bool``: every row of every rank done (ranks stop at the same step).
        stop: ``tokens so far (a list of (B * G,)) -> (B * G,) bool``: rows that stop after
            their last token (e.g. :class:`StopStrings`, a tool call's closing tag).
        decoder: ``dynamic`` (a growing cache, done rows leave the batch), ``static`` or ``compiled``
            (a preallocated cache; the decode step under ``torch.compile``); see :data:`DECODERS`.
    """
    device, max_new_tokens = query_ids.device, max_new_tokens.to(query_ids.device)
    next_logits, cache, query_ids, query_mask, positions = _prefill(policy, query_ids, query_mask, num_generations)
    batch = query_ids.size(0)
    if max_new_tokens.shape != (batch,):
        raise ValueError(f"max_new_tokens {tuple(max_new_tokens.shape)}: expected ({batch},)")
    decoder = _decoder(decoder)(policy, cache, query_mask, positions[:, -1], int(max_new_tokens.max()))
    ends = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).reshape(-1)
    done, tokens, logprobs, alive = torch.zeros(batch, dtype=torch.bool, device=device), [], [], []
    for step in itertools.count():  # every row is done after its max_new_tokens
        live = decoder.live
        token, logprob = _draw(next_logits, done[live], pad_token_id, temperature, top_k, top_p, generator,
                               rows.select(live, batch) if len(live) < batch else rows)
        tokens.append(_scatter(token, live, batch, pad_token_id))
        logprobs.append(_scatter(logprob, live, batch, 0.0))
        alive.append(~done)
        done = done | (step + 1 >= max_new_tokens) | (torch.isin(tokens[-1], ends) if ends is not None else False)
        done = done | stop(tokens) if stop is not None else done
        if all_done(done):
            break
        next_logits = decoder(token, alive[-1], done)
    return Rollout(query_ids, query_mask, torch.stack(tokens, 1), torch.stack(alive, 1).to(query_mask.dtype),
                   sample_logprobs=torch.stack(logprobs, 1))


def _scatter(values: torch.Tensor, live: torch.Tensor, batch: int, fill) -> torch.Tensor:
    """(batch,) ``fill`` with the (L,) ``values`` of the ``live`` rows in place."""
    if len(live) == batch:
        return values
    return torch.full((batch,), fill, dtype=values.dtype, device=values.device).index_copy_(0, live, values)


class _Decoder:
    """The rows still being decoded: their KV cache, attention mask and last positions.

    Rows that are done leave the batch (their cache rows dropped) once they are a quarter of it:
    responses that end at EOS spread over the whole length range, and a done row would
    otherwise keep costing a row of every matmul until the longest response ends. The drop
    copies the cache once (as one step of a growing cache does), so it waits for several rows.
    At least one row stays: under sharding every rank takes part in every forward.
    """

    drop_share = 0.25
    """Drop the done rows once they are this share of the batch."""

    def __init__(self, policy, cache, mask: torch.Tensor, last_pos: torch.Tensor, max_new_tokens: int) -> None:
        self.policy, self.cache, self.mask, self.last_pos = policy, cache, mask, last_pos
        self.live = torch.arange(mask.size(0), device=mask.device)  # (L,) rows of the whole batch

    def __call__(self, token: torch.Tensor, alive: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Feed the live rows' (L,) ``token`` (visible where the (B,) ``alive`` says it was sampled);
        ``done`` (B,) after it. Returns the next (L', V) logits of the rows then live."""
        # The token just fed is visible exactly where the final forward's response_mask
        # will be 1, so cached and fresh log-probs agree.
        self.mask = torch.cat([self.mask, alive[self.live].to(self.mask.dtype)[:, None]], dim=1)
        self.last_pos = self.last_pos + 1
        finished = done[self.live]
        n = int(finished.sum())  # one host sync per step (the loop's stop test is another)
        if max(1, self.drop_share * len(self.live)) <= n < len(self.live):
            keep = (~finished).nonzero().flatten()
            select_cache_rows(self.cache, keep)
            self.live, self.mask, self.last_pos, token = (t[keep] for t in (self.live, self.mask, self.last_pos, token))
        out = self.policy(token[:, None], self.mask, self.last_pos[:, None], cache=self.cache, use_cache=True,
                          with_values=False)
        self.cache = out.cache
        return out.logits[:, -1]


class _StaticDecoder(_Decoder):
    """Decoding into a preallocated KV cache: every step has the same shapes (all B rows, keys
    over the whole cache length, an attention mask written in place), so its forward can be
    compiled once per (B, cache length) and replayed; ``compiled`` compiles it.

    The cache length is the prompt plus the longest response, rounded up to a multiple of 64
    so that batches of slightly different prompt lengths share one compiled step. Keys past
    a row's current position are masked out, so attention sees exactly what it would see
    in a growing cache.
    """

    compiled = False
    LENGTH_MULTIPLE = 64

    def __init__(self, policy, cache, mask: torch.Tensor, last_pos: torch.Tensor, max_new_tokens: int) -> None:
        from transformers import StaticCache

        batch, prompt = mask.shape
        length = -(-(prompt + max_new_tokens) // self.LENGTH_MULTIPLE) * self.LENGTH_MULTIPLE
        static = StaticCache(config=policy.base_model.config, max_cache_len=length)
        if len(static.layers) != len(cache.layers) or any(not hasattr(layer, "keys") for layer in cache.layers):
            raise ValueError(f"sampling.decoder static/compiled needs a key-value cache in every layer; "
                             f"{type(policy.base_model).__name__} has other layers: use sampling.decoder: dynamic")
        for i, layer in enumerate(cache.layers):  # the prefill's keys and values, in place
            static.update(layer.keys, layer.values, i)
        full = torch.zeros(batch, length, dtype=mask.dtype, device=mask.device)
        full[:, :prompt] = mask
        super().__init__(policy, static, full, last_pos, max_new_tokens)
        self.position = prompt  # the cache column the next token is written to
        self.step = _compiled_decode_step() if self.compiled else _decode_step

    def __call__(self, token: torch.Tensor, alive: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self.mask[:, self.position] = alive.to(self.mask.dtype)
        self.position += 1
        self.last_pos = self.last_pos + 1
        return self.step(self.policy, token[:, None], self.mask, self.last_pos[:, None], self.cache)


class _CompiledDecoder(_StaticDecoder):
    compiled = True


def _decode_step(policy, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: (B, 1) tokens -> (B, V) next-token logits, the cache updated in place."""
    return policy(token, mask, positions, cache=cache, use_cache=True, with_values=False).logits[:, -1]


@functools.cache
def _compiled_decode_step():
    """:func:`_decode_step` under ``torch.compile`` (one compiled function per process: each new
    policy, batch size or cache length compiles a new graph the first time it is seen)."""
    return torch.compile(_decode_step, dynamic=False)


DECODERS = {"dynamic": _Decoder, "static": _StaticDecoder, "compiled": _CompiledDecoder}
"""The decode loops of :func:`generate`, by the name of ``sampling.decoder``."""


def _decoder(name: str) -> type[_Decoder]:
    """The decode loop called ``name`` (one-line error for an unknown one)."""
    if name not in DECODERS:
        raise ValueError(f"decoder {name!r}: expected one of {', '.join(DECODERS)}")
    return DECODERS[name]


class StopStrings:
    """``stop`` for :func:`generate`: a row stops once its sampled text contains a stop string.

    Token ids are never matched: a string can end inside a token or span several. Only rows
    whose last token holds the last character of some stop string (precomputed over the
    vocabulary) decode their last few tokens, as many as the longest stop string has characters
    (every token decodes to at least one character).
    """

    def __init__(self, tokenizer, strings: list[str]) -> None:
        self.tokenizer, self.strings = tokenizer, [s for s in strings if s]
        ends = {s[-1] for s in self.strings}
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        pieces = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocab]
        self.closers = torch.tensor([any(c in piece for c in ends) for piece in pieces], dtype=torch.bool)
        self.window = max((len(s) for s in self.strings), default=0)

    def __call__(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        last = tokens[-1]
        hits = torch.zeros_like(last, dtype=torch.bool)
        if not self.strings:
            return hits
        known = last < len(self.closers)  # a model's padded vocabulary may hold ids the tokenizer lacks
        closes = known & self.closers.to(last.device)[last.clamp(max=len(self.closers) - 1)]
        candidates = closes.nonzero().flatten().tolist()
        if candidates:
            recent = torch.stack(tokens[-self.window:], 1)[candidates].tolist()
            for row, text in zip(candidates, self.tokenizer.batch_decode(recent)):
                hits[row] = any(s in text for s in self.strings)
        return hits


def _draw(logits, done, pad_token_id, temperature, top_k, top_p, generator, rows):
    """(B,) tokens sampled from (B, V) ``logits`` (``pad_token_id`` where ``done``) and their (B,)
    log-probs under the sampler's distribution (0 where ``done``)."""
    probs = sampling_probs(logits, temperature, top_k, top_p)
    token = sample_categorical(probs, generator, rows).masked_fill(done, pad_token_id)
    return token, probs.gather(-1, token[:, None]).squeeze(-1).log().masked_fill(done, 0.0)


def _prefill(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, num_generations: int):
    """One forward over the (B, Tq) prompts: the next-token logits (B * G, V), the KV cache,
    and the prompts, their mask and positions, each row repeated for its G responses."""
    out, positions = _prompt_pass(policy, query_ids, query_mask, with_values=False)
    next_logits, cache = out.logits[:, -1], out.cache
    if num_generations > 1:  # the group shares its prompt: one prefill, the cache repeated
        cache.batch_repeat_interleave(num_generations)
        next_logits, query_ids, query_mask, positions = (
            t.repeat_interleave(num_generations, 0) for t in (next_logits, query_ids, query_mask, positions))
    return next_logits, cache, query_ids, query_mask, positions


def _prompt_pass(policy, query_ids: torch.Tensor, query_mask: torch.Tensor, with_values: bool,
                 hidden_only: bool = False):
    """One forward over (B, Tq) left-padded prompts, keeping the KV cache and the last position's
    logits (or hidden state) and values: the policy's output and the (B, Tq) positions."""
    positions = (query_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = policy(query_ids, query_mask, positions, use_cache=True, with_values=with_values,
                 logits_slice=slice(-1, None), **({"hidden_only": True} if hidden_only else {}))
    return out, positions


def shared_prompts(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The distinct prompts of a rollout and, for each episode, the index of its prompt.

    Returns ``(query_ids, query_mask)`` of the U distinct prompts, each (U, Tq), and ``index``
    (B,) with ``rollout.query_ids == query_ids[index]``; None when no two episodes share one.
    """
    key = torch.cat([rollout.query_ids, rollout.query_mask.to(rollout.query_ids.dtype)], dim=1)
    unique, index = torch.unique(key, dim=0, return_inverse=True)
    if unique.size(0) == key.size(0):
        return None
    tq = rollout.query_ids.size(1)
    return unique[:, :tq], unique[:, tq:].to(rollout.query_mask.dtype), index


def evaluate_actions(
    policy,
    rollout: Rollout,
    temperature: float = 1.0,
    with_values: bool = True,
    entropy: EntropyMode = "skip",
    share_prompts: bool = False,
    packed: bool = False,
    sum_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs, values and entropies of the rollout's response tokens under ``policy``.

    One trunk pass over query + response, then the LM head on the response tokens' last hidden
    states a chunk at a time (``policy.token_logprobs``: the (tokens x vocabulary) logits never
    exist whole). Used for the old log-probs and values right after sampling, for the reference
    (adapters disabled), and inside every update minibatch, always with the same masks and
    positions, so at step 0 the ratio is exactly 1. Four layouts give the same values (tested to
    1e-5 in fp32); the one that runs the fewest tokens through the trunk is taken (:func:`pass_layout`):

    * padded: (B, Tq + Tr) rows, prompts left- and responses right-padded;
    * shared prompts (``share_prompts``; a GRPO group): the distinct prompts are prefilled once,
      their KV cache indexed out to the episodes, and only the responses run on top of it
      (gradients flow through the cache into the prompt's pass). Not under gradient
      checkpointing, which cannot keep a cache;
    * packed (``packed``, a policy with segment attention): every episode's real tokens laid end
      to end in one row, one causal attention per episode, no padding at all;
    * shared and packed (both): the distinct prompts run once, and the responses end to end in
      one row, each attending to its prompt's cached keys and values, then causally to itself.

    Args:
        entropy: ``grad``, ``detached`` or ``skip``, as in :func:`~lit_rlhf.objectives.logprobs.logprobs_and_entropy`.
        sum_ranks: under sharding, a sum over ranks: the layout is then chosen on every rank's
            tokens together, so all ranks run the same forwards (each is a collective).

    Returns:
        logprobs (B, Tr), values (B, Tr) or None, entropy (B, Tr) or None; 0 after each response.
    """
    layout, shared = _choose_layout(policy, rollout, share_prompts, packed, sum_ranks)
    passes = {"padded": _padded_pass, "packed": _packed_pass,
              "shared": functools.partial(_shared_prompt_pass, shared=shared),
              "shared_packed": functools.partial(_shared_packed_pass, shared=shared)}
    # (M, H) last hidden states and (M,) values at the M response tokens, row-major over the
    # response mask: the LM head runs on those tokens only, a chunk at a time.
    hidden, values = passes[layout](policy, rollout, with_values)
    resp = rollout.response_mask.bool()
    logprobs, entropies = policy.token_logprobs(hidden, rollout.response_ids[resp], temperature, entropy)
    logprobs, values, entropies = (None if t is None else t.new_zeros(resp.shape).masked_scatter(resp, t)
                                   for t in (logprobs, values, entropies))
    return logprobs, values, entropies


def pass_layout(policy, rollout: Rollout, share_prompts: bool, packed: bool, sum_ranks=None) -> str:
    """``padded``, ``shared``, ``packed`` or ``shared_packed``: of the layouts allowed, the one that
    runs the fewest tokens through the trunk (padded on a tie: one attention call per layer)."""
    return _choose_layout(policy, rollout, share_prompts, packed, sum_ranks)[0]


def _choose_layout(policy, rollout: Rollout, share_prompts: bool, packed: bool, sum_ranks=None):
    """(:func:`pass_layout`'s choice, the rollout's :func:`shared_prompts` when they were looked for)."""
    b, tq = rollout.query_ids.shape
    costs = {"padded": b * (tq + rollout.response_ids.size(1))}
    shared = shared_prompts(rollout) if share_prompts and not _checkpointing(policy) else None
    if shared is not None:
        costs["shared"] = shared[0].size(0) * tq + rollout.response_ids.numel()
    if packed and _segment_attention(policy):
        # A packed row runs one attention call per episode: each costs about SEGMENT_TOKENS tokens.
        per_episode = SEGMENT_TOKENS * b
        costs["packed"] = int(rollout.query_mask.sum() + rollout.response_mask.sum()) + per_episode
        if shared is not None and bool(rollout.response_mask[:, 0].all()):  # every response has a token
            costs["shared_packed"] = shared[0].size(0) * tq + int(rollout.response_mask.sum()) + per_episode
    if sum_ranks is not None:  # the layouts open to every rank, by their tokens on all ranks
        absent = 2**50
        totals = sum_ranks(torch.tensor([costs.get(name, absent) for name in LAYOUTS], device=rollout.query_ids.device))
        costs = {name: int(total) for name, total in zip(LAYOUTS, totals.tolist()) if total < absent}
    return min(costs, key=lambda layout: (costs[layout], layout != "padded")), shared


SEGMENT_TOKENS = 8
"""What one episode's own attention call in a packed row costs, in tokens through the trunk.
Measured on CPU (2026-12-07, fp32, forward + backward of a GRPO update pass): 256 episodes of
1-4 response tokens on 8-token prompts of a 3-layer 128-wide Llama took 0.16 s with the prompts
run once and the responses packed (1,116 tokens) against 0.09 s for padded responses on the
prompts run once (1,280 tokens): about 3-7 tokens per call there; on the 4-layer 256-wide model
of the benchmarks, longer responses, packing wins by far more than 8 tokens per episode."""

LAYOUTS = ("padded", "shared", "packed", "shared_packed")
"""The layouts of a scoring or update pass (see :func:`evaluate_actions`), in tie order after padded."""


def _padded_pass(policy, rollout: Rollout, with_values: bool):
    """(M, H) last hidden states and (M,) values of the M response tokens (row-major over the
    response mask), from padded rows."""
    input_ids, mask, positions = rollout.sequences()
    tq = rollout.query_ids.size(1)
    resp = rollout.response_mask.bool()
    # Response token j is scored by the hidden state (and value) at position Tq + j - 1.
    out = policy(input_ids, mask, positions, with_values=with_values, logits_slice=slice(tq - 1, -1), hidden_only=True)
    return out.hidden[resp], out.values[:, tq - 1:-1][resp] if with_values else None


def _shared_prompt_pass(policy, rollout: Rollout, with_values: bool, shared):
    """As :func:`_padded_pass`, each distinct prompt run once (see :func:`evaluate_actions`);
    ``shared``: the rollout's :func:`shared_prompts`."""
    _, mask, positions = rollout.sequences()
    tq = rollout.query_ids.size(1)
    query_ids, query_mask, index = shared
    prompt, _ = _prompt_pass(policy, query_ids, query_mask, with_values, hidden_only=True)
    cache = prompt.cache
    select_cache_rows(cache, index)  # (U, ...) -> (B, ...), differentiable
    # The responses attend to their prompt's cached keys and values, then to each other.
    out = policy(rollout.response_ids, mask, positions[:, tq:], cache=cache, use_cache=True,
                 with_values=with_values, logits_slice=slice(None, -1), hidden_only=True)
    resp = rollout.response_mask.bool()
    hidden = torch.cat([prompt.hidden.index_select(0, index), out.hidden], dim=1)[resp]
    values = (torch.cat([prompt.values.index_select(0, index)[:, -1:], out.values[:, :-1]], dim=1)[resp]
              if with_values else None)
    return hidden, values


def _packed_pass(policy, rollout: Rollout, with_values: bool):
    """(M, H) last hidden states and (M,) values of the M response tokens (row-major over the
    response mask), from one row holding every episode's prompt and response tokens and nothing else."""
    input_ids, mask, positions = rollout.sequences()
    real = mask.bool()
    lengths = real.sum(-1)  # (B,) each episode's tokens
    starts = lengths.cumsum(0) - lengths
    response = rollout.response_mask.bool()
    column = torch.arange(response.size(1), device=response.device).expand_as(response)
    # Response token j of episode i sits at starts[i] + prompt length + j; the state before it scores it.
    index = (starts[:, None] + rollout.query_mask.sum(-1, keepdim=True) - 1 + column)[response]
    ids = input_ids[real][None]
    out = policy(ids, torch.ones_like(ids), positions[real][None], with_values=with_values, logits_slice=index,
                 segment_lengths=lengths.tolist(), hidden_only=True)
    return out.hidden[0], out.values[0, index] if with_values else None


def _shared_packed_pass(policy, rollout: Rollout, with_values: bool, shared):
    """As :func:`_packed_pass`, with the prompts run once (see :func:`evaluate_actions`): the
    first response token of each episode is scored by its prompt's last hidden state (and value)."""
    from lit_rlhf.models.attention import SegmentPrefix

    query_ids, query_mask, index = shared
    prompt, _ = _prompt_pass(policy, query_ids, query_mask, with_values, hidden_only=True)
    response = rollout.response_mask.bool()
    lengths, prompt_lengths = response.sum(-1), rollout.query_mask.sum(-1)
    starts = lengths.cumsum(0) - lengths
    column = torch.arange(response.size(1), device=response.device).expand_as(response)
    # Tokens after an episode's first are scored inside the row, by the state before them.
    scored_at = (starts[:, None] + column - 1)[response & (column > 0)]
    ids = rollout.response_ids[response][None]
    out = policy(ids, torch.ones_like(ids), (prompt_lengths[:, None] + column)[response][None],
                 with_values=with_values, logits_slice=scored_at, hidden_only=True,
                 segment_lengths=lengths.tolist(),
                 segment_prefix=SegmentPrefix(prompt.cache, index, prompt_lengths.tolist()))
    # Row-major over the response mask: an episode's first token from its prompt's pass (rows
    # 0..B-1 of the sources), the others from the row, in order.
    first = (column == 0)[response]
    source = torch.where(first, torch.arange(len(rollout), device=response.device)[:, None].expand_as(response)[response],
                         len(rollout) + (~first).long().cumsum(0) - 1)
    hidden = torch.cat([prompt.hidden[:, -1].index_select(0, index), out.hidden[0]]).index_select(0, source)
    values = None
    if with_values:
        values = torch.cat([prompt.values[:, -1].index_select(0, index),
                            out.values[0, scored_at]]).index_select(0, source)
    return hidden, values


def _segment_attention(policy) -> bool:
    """True when the policy's model runs one causal attention per segment of a packed row."""
    from lit_rlhf.models.attention import SEGMENT_SDPA

    base = getattr(policy, "base_model", None)
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == SEGMENT_SDPA


def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep rows ``index`` (B,) of a KV cache of U rows, differentiably, in place.

    ``index_select`` rather than the cache's own ``batch_select_indices`` (``keys[index]``):
    the backward of advanced indexing (``index_put_`` with accumulation) sums repeated rows in
    an order that depends on the threads on CPU, so two runs of the same GRPO config drifted
    apart; ``index_select``'s backward does not. Layers with state of their own keep their method.
    """
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        plain = type(layer).batch_select_indices is DynamicLayer.batch_select_indices
        if plain and layer.get_seq_length() > 0:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        else:
            layer.batch_select_indices(index)


def _checkpointing(policy) -> bool:
    """True when this forward will be checkpointed: the layers then drop any cache."""
    base = getattr(policy, "base_model", None)
    return torch.is_grad_enabled() and bool(getattr(base, "training", False)) and activation_checkpointing(base)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """The responses as text: each row's sampled tokens up to its mask, special tokens dropped.
    In multi-turn episodes, the final answer: the policy's last turn, after the last observation.

    Only masked-in tokens are decoded. Zeroing the rest and decoding whole rows would decode
    token id 0 at every padded slot, which is a real token in many vocabularies (``!`` in
    GPT-2's), and the reward model would score responses with a tail of them.
    """
    lengths = rollout.response_mask.sum(-1).tolist()
    rows = rollout.response_ids.tolist()
    starts = [0] * len(rows)
    if rollout.observation_mask is not None:  # after each row's last observation token
        observed = rollout.observation_mask.bool()
        last = torch.where(observed, torch.arange(observed.size(1), device=observed.device), -1).max(-1).values
        starts = (last + 1).tolist()
    return tokenizer.batch_decode([row[s : int(n)] for row, s, n in zip(rows, starts, lengths)],
                                  skip_special_tokens=True)


def decode_trajectories(tokenizer, rollout: Rollout, mark: tuple[str, str] = ("**", "**")) -> list[str]:
    """Whole trajectories as text (prompt excluded), each observation segment between ``mark``
    (bold in the sample table), special tokens dropped."""
    out = []
    observed = rollout.observation_mask if rollout.observation_mask is not None else torch.zeros_like(rollout.response_mask)
    for ids, n, obs in zip(rollout.response_ids.tolist(), rollout.response_mask.sum(-1).tolist(), observed.tolist()):
        parts = []
        for is_observation, run in itertools.groupby(zip(ids[: int(n)], obs), key=lambda pair: pair[1]):
            text = tokenizer.decode([t for t, _ in run], skip_special_tokens=True)
            parts.append(f"{mark[0]}{text}{mark[1]}" if is_observation else text)
        out.append("".join(parts))
    return out


def sample_lengths(
    batch: int, min_new_tokens: int, max_new_tokens: int, generator: torch.Generator | None = None,
    rows: Rows = Rows(),
) -> torch.Tensor:
    """(B,) response length limits, uniform on [min_new_tokens, max_new_tokens]; ``rows``: where
    the B rows sit in the global batch."""
    device = generator.device if generator is not None else None
    return rows.draw(batch, lambda n: torch.randint(min_new_tokens, max_new_tokens + 1, (n,), generator=generator,
                                                    device=device))
