"""ToolEnvironment and the calculator: calls found in the policy's text, results, one-line
errors, the time limit, the call limit; both call syntaxes."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from lit_rlhf.envs import ToolEnvironment, calculator


def test_calculator_evaluates_integer_expressions_and_refuses_anything_else():
    assert calculator("123*45") == "5535"
    assert calculator(" 7 + 8 * 2 - 30 ") == "-7"
    for bad in ("2**100", "3/4", "__import__('os')", "1e9", "", "9" * 70, "1 +"):
        with pytest.raises(ValueError, match="expression"):
            calculator(bad)


def _slow(x: str) -> str:
    time.sleep(2)
    return x


def _broken(x: str) -> str:
    raise RuntimeError("disk\nfull")


def test_a_tag_call_runs_the_tool_and_its_result_follows_in_result_tags():
    env = ToolEnvironment({"calc": calculator}).new_episode()
    assert env.reset({"prompt": "12*3="}) is None  # plain text: the data module's prompt as it is
    assert env.stop_strings() == ["</calc>"]
    step = env.step("<calc>12*3</calc>")
    assert (step.observation, step.done, step.info) == ("<result>36</result>", False, {"tool_calls": 1.0, "tool_errors": 0.0})
    final = env.step("36")  # no call: the final answer
    assert final.done and final.observation is None


def test_errors_timeouts_and_the_call_limit_answer_in_one_line():
    env = ToolEnvironment({"calc": calculator, "slow": _slow, "broken": _broken}, max_calls=3, timeout_s=0.2)
    env.reset({})
    bad = env.step("<calc>2**8</calc>")
    assert bad.observation.startswith("<result>error: ValueError: not an expression") and bad.info["tool_errors"] == 1
    start = time.perf_counter()
    slow = env.step("<slow>x</slow>")
    assert time.perf_counter() - start < 1.5 and slow.observation == "<result>error: slow timed out after 0.2 s</result>"
    broken = env.step("<broken></broken>")
    assert broken.observation == "<result>error: RuntimeError: disk full</result>" and "\n" not in broken.observation
    over = env.step("<calc>1+1</calc>")  # a fourth call: not run, the episode ends
    assert over.done and over.observation is None and over.info == {"tool_calls_refused": 1.0}
    assert env.new_episode().calls == 0  # a fresh episode: nothing carried over


def _hang(x: str) -> str:
    time.sleep(30)  # far past every time limit below: only abandoning or killing the call frees us
    return x


def _crash(x: str) -> str:
    os._exit(3)


@pytest.mark.parametrize("isolation, hangs", [("thread", 10), ("process", 3)])
def test_hung_calls_never_stop_a_later_call_from_running(isolation, hangs):
    # A shared pool of 4 workers kept each timed-out call's worker: from the fifth hung call on,
    # every call "timed out" without running. Each call is now its own thread or process.
    env = ToolEnvironment({"hang": _hang, "calc": calculator}, max_calls=hangs + 1, timeout_s=0.05,
                          isolation=isolation)
    env.reset({})
    start = time.perf_counter()
    for _ in range(hangs):
        assert env.step("<hang>x</hang>").observation == "<result>error: hang timed out after 0.05 s</result>"
    good = env.step("<calc>6*7</calc>")
    assert good.observation == "<result>42</result>" and good.info["tool_errors"] == 0
    assert time.perf_counter() - start < 3.0


def test_a_tool_process_that_dies_is_an_error_and_a_killed_one_is_gone():
    env = ToolEnvironment({"crash": _crash, "hang": _hang, "calc": calculator}, timeout_s=0.2, isolation="process")
    env.reset({})
    assert env.step("<crash>x</crash>").observation == \
        "<result>error: RuntimeError: the tool's process died (exit code 3)</result>"
    env.step("<hang>x</hang>")
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("lit_rlhf_tool")]
    assert env.step("<calc>2*3</calc>").observation == "<result>6</result>"


def test_chat_syntax_parses_json_calls_and_answers_with_tool_messages():
    env = ToolEnvironment([calculator], syntax="chat")
    messages = [{"role": "user", "content": "12*3?"}]
    assert env.reset({"prompt": "x", "messages": messages}) == messages and env.stop_strings() == []
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "12*3"}}</tool_call>'
                    '<tool_call>{"name": "search", "arguments": {}}</tool_call><tool_call>{oops</tool_call>')
    assert step.observation[0] == {"role": "tool", "content": "36"}
    assert step.observation[1]["content"] == "error: unknown tool 'search'"
    assert step.observation[2]["content"].startswith("error: malformed tool call (JSONDecodeError)")
    assert step.info == {"tool_calls": 3.0, "tool_errors": 2.0}
    assert env.tool_schemas() == [calculator]


@pytest.mark.parametrize("kwargs, message", [
    (dict(tools={"bad name": calculator}), "cannot be tags"),
    (dict(tools=["lit_rlhf.envs.no_such_tool"]), "not an importable callable"),
    (dict(tools=[calculator], syntax="xml"), "tags or chat"),
    (dict(tools=[]), "at least one tool"),
    (dict(tools=[calculator], isolation="pool"), "thread or process"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ToolEnvironment(**kwargs)


def test_tools_are_found_by_import_path():
    env = ToolEnvironment({"calc": "lit_rlhf.envs.calculator"})
    env.reset({})
    assert env.step("<calc>6*7</calc>").observation == "<result>42</result>"
