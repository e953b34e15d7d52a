"""Environments for multi-turn online RL: the policy acts, the environment answers.

An :class:`Environment` is one episode's world: :meth:`~Environment.reset` takes the prompt's
data row and may give the first observation, :meth:`~Environment.step` takes the text of the
policy's turn and gives the next observation (or none), a reward and whether the episode is
over. :class:`ToolEnvironment` turns plain Python callables into tools. The online methods run
a batch of episodes together (:mod:`lit_rlhf.modules.episodes`), each observation tokenized
once as its own segment (:class:`Transcript`), never re-tokenized with the text around it.

Any environment plugs into GRPO by config (``model.init_args.env: {class_path: ...}``); the
rollout makes a fresh one per episode with :meth:`~Environment.new_episode` (from the class and
its constructor arguments, nothing deep-copied)."""

from lit_rlhf.envs.base import Environment, Step
from lit_rlhf.envs.segments import Transcript
from lit_rlhf.envs.tools import ToolEnvironment, calculator

__all__ = ["Environment", "Step", "ToolEnvironment", "Transcript", "calculator"]
