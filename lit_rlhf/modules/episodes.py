"""Multi-turn episodes on the online core: the policy acts, the environment answers, batched.

Each turn samples every unfinished episode (one batch, KV-cached, from the episode's tokens so
far) until an end-of-turn id (EOS, the chat template's end of turn: ``eos_token_id`` is a
list), a stop string (e.g. a tool call's closing tag) or the turn's token limit; then every
environment steps on the text of its turn, and each observation is tokenized once, as its own
segment, and appended. Episodes end when their environment says so, after ``max_turns``
policy turns, or when the next observation would not fit ``max_tokens``; finished episodes drop
out of the batch. **Token in, token out**: the rollout holds exactly the sampled tokens and the
observation segments, so the scoring and update passes see what the sampler saw.

The result is an ordinary :class:`~lit_rlhf.modules.rollout.Rollout` whose response holds the
whole trajectory after the prompt, with ``observation_mask`` marking the environment's tokens
(context only: no loss, KL, entropy or advantage on them) and ``env_reward`` the environment's
reward summed over the episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lit_rlhf.data.prompts import left_pad
from lit_rlhf.envs import Environment, Transcript
from lit_rlhf.modules.rollout import Rollout, Rows, StopStrings, generate


@dataclass
class EpisodeConfig:
    """Multi-turn episodes (with ``model.init_args.env``)."""

    max_turns: int = 4
    """Policy turns per episode (e.g. 3 tool calls and the answer)."""
    max_tokens: int = 256
    """Response tokens per episode, the policy's and the observations' together; an observation
    that would not fit ends the episode (counted as ``episode/cut``)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_tokens < 1:
            raise ValueError(f"episodes: max_turns and max_tokens must be >= 1, got {self.max_turns}, {self.max_tokens}")


@dataclass
class Episode:
    """One episode's state while the batch runs."""

    env: Environment
    transcript: Transcript
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    observed: list[bool] = field(default_factory=list)  # per token: the environment's
    logprobs: list[float] = field(default_factory=list)  # the sampler's (0 on observations)
    turns: int = 0
    reward: float = 0.0
    info: dict[str, float] = field(default_factory=dict)
    done: bool = False
    cut: bool = False


@dataclass
class Sampler:
    """How a turn samples: :func:`~lit_rlhf.modules.rollout.generate`'s keyword arguments, the
    per-turn token limit, and the collectives a multi-process run needs."""

    tokenizer: object
    """The policy's tokenizer (decodes turns, tokenizes observations)."""
    max_new_tokens: int
    """Tokens per policy turn, at most."""
    generate_kwargs: dict
    """The end-of-turn ids (``eos_token_id``), padding, temperature, top-k/p, the generator and
    ``all_done``, as ``generate`` takes them; ``generate``: another function called alike (a
    rollout engine's, :mod:`lit_rlhf.engines`) instead of the built-in sampler."""
    rows: Rows = Rows()
    """Where this rank's episodes sit in the global batch (their random draws)."""
    any_rank_active: Callable[[int], bool] = bool
    """``active episodes here -> any active on any rank`` (an all-reduce under several processes)."""
    device: torch.device | str = "cpu"
    """Where the policy's inputs go."""
    stop: StopStrings | None = None
    """The environment's stop strings (built once: it reads the whole vocabulary); None: built here."""


def start_episodes(env: Environment, tokenizer, batch: dict, num_generations: int) -> list[Episode]:
    """One fresh environment per episode (``num_generations`` per prompt, each made by
    ``env.new_episode()``: nothing deep-copied), reset on its row."""
    fields = batch.get("fields", {})
    episodes = []
    for b, ids in enumerate(_prompt_tokens(batch)):
        row = {"prompt": batch["prompt"][b], **{k: v[b] for k, v in fields.items()}}
        if "messages" in batch:
            row["messages"] = batch["messages"][b]
        for _ in range(num_generations):
            episode_env = env.new_episode()
            first = episode_env.reset(row)
            transcript = Transcript(tokenizer, first if isinstance(first, list) else None, env.tool_schemas())
            if isinstance(first, list):
                prompt = transcript.prompt_tokens()
            elif isinstance(first, str):
                prompt = tokenizer(first)["input_ids"]
            else:
                prompt = ids
            episodes.append(Episode(episode_env, transcript, prompt))
    return episodes


def _prompt_tokens(batch: dict) -> list[list[int]]:
    """The batch's left-padded prompts as token lists."""
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


@torch.no_grad()
def run_episodes(policy, episodes: list[Episode], sampler: Sampler, config: EpisodeConfig) -> Rollout:
    """Play every episode to its end, a turn of all unfinished ones at a time (see the module docstring)."""
    stop = sampler.stop or StopStrings(sampler.tokenizer, episodes[0].env.stop_strings())
    kwargs = dict(sampler.generate_kwargs)
    sample = kwargs.pop("generate", generate)
    device = sampler.device
    while sampler.any_rank_active(sum(not e.done for e in episodes)):
        active = [i for i, e in enumerate(episodes) if not e.done]
        # A rank whose episodes are all over still runs a (discarded) row of one token while others
        # play: sharded forwards and the stop decision are collectives every rank takes part in.
        rows = active or [0]
        contexts = [episodes[i].prompt + episodes[i].tokens for i in rows]
        ids, mask = left_pad(contexts, sampler.tokenizer.pad_token_id)
        limits = torch.tensor([min(sampler.max_new_tokens, config.max_tokens - len(episodes[i].tokens)) if active
                               else 1 for i in rows])
        turn = sample(policy, ids.to(device), mask.to(device), limits, stop=stop,
                      rows=sampler.rows.subset(torch.tensor(rows), len(episodes)), **kwargs)
        # One copy to the host per turn, not per episode.
        lengths, ids, logprobs = (t.tolist() for t in (turn.response_mask.sum(-1), turn.response_ids,
                                                       turn.sample_logprobs))
        for j, i in enumerate(active):
            n = lengths[j]
            _take_turn(episodes[i], ids[j][:n], logprobs[j][:n], sampler.tokenizer, config)
    return episode_rollout(episodes, sampler.tokenizer.pad_token_id, device)


def _take_turn(episode: Episode, action: list[int], logprobs: list[float], tokenizer, config: EpisodeConfig) -> None:
    """Append the policy's turn, step the environment, append its observation (or end the episode)."""
    episode.tokens += action
    episode.observed += [False] * len(action)
    episode.logprobs += logprobs
    episode.turns += 1
    result = episode.env.step(tokenizer.decode(action, skip_special_tokens=True))
    episode.reward += float(result.reward)
    for key, value in result.info.items():
        episode.info[key] = episode.info.get(key, 0.0) + float(value)
    if result.done or result.observation is None:
        episode.done = True
        return
    if episode.turns >= config.max_turns:  # the environment wants more turns than the budget has
        episode.done = episode.cut = True
        return
    segment = episode.transcript.observation_tokens(action, result.observation, episode.turns)
    if len(episode.tokens) + len(segment) >= config.max_tokens:  # room for it and one more policy token
        episode.done = episode.cut = True
        return
    episode.tokens += segment
    episode.observed += [True] * len(segment)
    episode.logprobs += [0.0] * len(segment)


def episode_rollout(episodes: list[Episode], pad_token_id: int, device) -> Rollout:
    """The episodes as a :class:`Rollout`: prompts left-padded, trajectories right-padded."""
    query_ids, query_mask = left_pad([e.prompt for e in episodes], pad_token_id)
    width = max(len(e.tokens) for e in episodes)
    response = torch.full((len(episodes), width), pad_token_id, dtype=torch.long)
    observed, logprobs = torch.zeros(len(episodes), width, dtype=torch.long), torch.zeros(len(episodes), width)
    response_mask = torch.zeros(len(episodes), width, dtype=torch.long)
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        response[i, :n], response_mask[i, :n] = torch.tensor(e.tokens), 1
        observed[i, :n], logprobs[i, :n] = torch.tensor(e.observed, dtype=torch.long), torch.tensor(e.logprobs)
    to = lambda t: t.to(device)  # noqa: E731
    return Rollout(to(query_ids), to(query_mask), to(response), to(response_mask), observation_mask=to(observed),
                   sample_logprobs=to(logprobs),
                   env_reward=to(torch.tensor([e.reward for e in episodes], dtype=torch.float32)))


def episode_statistics(episodes: list[Episode]) -> dict[str, torch.Tensor]:
    """Per-episode means: turns, tool calls and errors (and any other counts the environment
    reports), observation tokens, episodes cut by the turn or token budget, the environment's reward."""
    n = max(len(episodes), 1)
    keys = sorted({k for e in episodes for k in e.info} | {"tool_calls", "tool_errors"})
    stats = {f"episode/{k}": sum(e.info.get(k, 0.0) for e in episodes) / n for k in keys}
    stats.update({
        "episode/turns": sum(e.turns for e in episodes) / n,
        "episode/observation_tokens": sum(sum(e.observed) for e in episodes) / n,
        "episode/cut": sum(e.cut for e in episodes) / n,
        "episode/env_reward": sum(e.reward for e in episodes) / n,
        "episode/tool_use": sum(e.info.get("tool_calls", 0.0) > 0 for e in episodes) / n,
    })
    return {k: torch.tensor(float(v)) for k, v in stats.items()}
