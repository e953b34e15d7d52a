"""Environments are made per episode by their class from the configured one's constructor
arguments: nothing deep-copied (a lock or a client cannot be; a model would be duplicated)."""

from __future__ import annotations

import threading

import pytest

from lit_rlhf.envs import Environment, Step, ToolEnvironment


class _Locked(Environment):
    """Holds a lock of its own (a deep copy raises TypeError) and a client it is given."""

    def __init__(self, client: object, greeting: str = "hi") -> None:
        self.client, self.greeting = client, greeting
        self.lock = threading.Lock()
        self.turns = 0

    def step(self, action: str) -> Step:
        with self.lock:
            self.turns += 1
        return Step(observation=self.greeting, done=self.turns > 1)


def test_an_environment_holding_a_lock_gets_a_fresh_one_per_episode_and_shares_what_it_was_given():
    client = object()
    env = _Locked(client, greeting="hello")
    env.step("x")
    first, second = env.new_episode(), env.new_episode()
    for episode in (first, second):
        assert type(episode) is _Locked and episode.client is client and episode.greeting == "hello"
        assert episode.turns == 0 and episode.lock is not env.lock  # its own state, made by __init__
    assert first.lock is not second.lock
    assert first.step("x").observation == "hello" and second.turns == 0


def test_episodes_start_from_the_environment_a_config_builds(tokenizer):
    import torch
    from jsonargparse import ArgumentParser

    from lit_rlhf.modules.episodes import start_episodes

    parser = ArgumentParser()
    parser.add_argument("--env", type=Environment)
    config = parser.parse_object({"env": {"class_path": "tests.envs.test_base._Locked",
                                          "init_args": {"client": "a client", "greeting": "yo"}}})
    env = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(config).env  # renamed in 4.49
    ids = tokenizer(["12*3="])["input_ids"]
    batch = {"prompt": ["12*3="], "input_ids": torch.tensor(ids), "attention_mask": torch.ones(1, len(ids[0]))}
    episodes = start_episodes(env, tokenizer, batch, num_generations=3)
    envs = [e.env for e in episodes]
    assert len({id(e) for e in envs}) == 3 and env not in envs and {e.greeting for e in envs} == {"yo"}
    assert len({id(e.lock) for e in envs}) == 3 and all(e.client == "a client" for e in envs)


def test_an_environment_whose_arguments_were_not_recorded_says_to_override_new_episode():
    class Own(Environment):
        def __new__(cls):
            return object.__new__(cls)

    with pytest.raises(TypeError, match="Own: its constructor arguments were not recorded .* override new_episode"):
        Own().new_episode()


def test_a_tool_environment_per_episode_keeps_its_settings():
    env = ToolEnvironment({"calc": "lit_rlhf.envs.calculator"}, max_calls=1, timeout_s=0.5, isolation="process")
    env.reset({})
    env.step("<calc>1+1</calc>")
    fresh = env.new_episode()
    assert (fresh.calls, fresh.max_calls, fresh.timeout_s, fresh.isolation) == (0, 1, 0.5, "process")
    assert fresh.step("<calc>2+2</calc>").observation == "<result>4</result>"
