"""Tools: plain Python callables the policy calls from its turn, with a time limit.

Two call syntaxes:

* ``tags`` (plain text): a tool named ``calc`` is called as ``<calc>ARGUMENT</calc>`` and
  called with the argument text; its result comes back directly after the closing tag as
  ``<result>VALUE</result>`` (the result tags are configurable). The closing tags end the
  policy's turn (stop strings).
* ``chat`` (chat models): the turn ends at EOS (the template's end of turn) and holds
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (the Hermes / Qwen
  convention); each tool is called with the arguments as keywords and answers as a ``tool``
  message, which the chat template renders. Tools are passed to the template's ``tools=``,
  so their docstrings should describe their arguments (transformers' ``get_json_schema``).

A tool that raises, times out or gets a malformed call answers with a one-line error the
policy can read; it counts as a tool error.

Every call is isolated, so that a tool that hangs or crashes never stops later calls from
running (``isolation``):

* ``thread`` (default): a fresh daemon thread per call, abandoned at the time limit. Cheap
  (~0.2 ms a call, measured on 2 CPU cores) and the tool shares the process (any callable,
  CUDA included), but Python cannot stop a thread: an abandoned call runs on (its memory and
  CPU stay in use until it returns), and a tool stuck in C code that holds the GIL (e.g. a
  runaway regular expression) stalls the whole trainer. Many abandoned threads are warned about.
* ``process``: a child process per call (forked where the platform can), killed at the time
  limit. It also stops calls stuck in C code, and a crash (a segfault, ``os._exit``) is only
  the child's. It costs a fork per call (~50 ms on the same cores, the parent holding torch
  and transformers; more for a larger parent; an episode batch's calls run one after
  another), and the tool must not use CUDA or anything the trainer's other threads may hold
  at the fork (a lock so held makes the call time out, nothing worse). For tools that can
  hang in C code or crash the interpreter.
"""

from __future__ import annotations

import ast
import importlib
import json
import multiprocessing
import re
import threading
import warnings
from collections.abc import Callable
from typing import Literal

from lit_rlhf.envs.base import Environment, Step

_ABANDONED: list[threading.Thread] = []  # timed-out calls still running (thread isolation)
_ABANDONED_WARN = 32
_START_LIMIT_S = 60.0  # a child process that has not started by then is an error (not the tool's time)


def _call(fn: Callable, args) -> str:
    """The tool's answer as text (keyword arguments in the chat syntax, one text in the tags one)."""
    return str(fn(**args) if isinstance(args, dict) else fn(args))


def _in_thread(fn: Callable, args, timeout_s: float, name: str) -> tuple | None:
    """``("ok", text)`` or ``("error", type name, message)`` of one call in a fresh daemon
    thread; None when it outlives ``timeout_s`` (the thread is abandoned: nothing waits on it)."""
    box: list[tuple] = []

    def target() -> None:
        try:
            box.append(("ok", _call(fn, args)))
        except BaseException as err:  # SystemExit too: a tool never ends the trainer
            box.append(("error", type(err).__name__, str(err)))

    thread = threading.Thread(target=target, name=f"lit_rlhf_tool_{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()] + [thread]
        if len(_ABANDONED) == _ABANDONED_WARN:
            warnings.warn(f"{len(_ABANDONED)} timed-out tool calls are still running in abandoned threads "
                          "(Python cannot stop them): give the tools their own limits, or use "
                          "ToolEnvironment(isolation='process'), which kills them", RuntimeWarning, stacklevel=3)
        return None
    return box[0]


def _child(fn: Callable, args, send) -> None:
    """A child process's call: says it started (the time limit is the tool's, not the start's), then answers."""
    send.send(("started",))
    try:
        send.send(("ok", _call(fn, args)))
    except BaseException as err:
        send.send(("error", type(err).__name__, str(err)))


def _in_process(fn: Callable, args, timeout_s: float, name: str) -> tuple | None:
    """Like :func:`_in_thread`, in a child process killed when it outlives ``timeout_s``. Forked
    (the tool and its arguments need no pickling); where fork is missing (Windows), spawned: the
    tool must then be importable by name, and each call pays an interpreter start."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(fn, args, send), name=f"lit_rlhf_tool_{name}", daemon=True)
    process.start()
    send.close()  # the child holds the only writer: its death is an EOF here
    try:
        if not receive.poll(_START_LIMIT_S):
            return ("error", "RuntimeError", f"the tool's process did not start within {_START_LIMIT_S:g} s")
        receive.recv()
        return receive.recv() if receive.poll(timeout_s) else None
    except EOFError:  # the child died without answering (a segfault, os._exit, killed)
        process.join(1.0)
        return ("error", "RuntimeError", f"the tool's process died (exit code {process.exitcode})")
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()


def resolve_tool(tool: str | Callable, where: str) -> Callable:
    """A callable, or one named by its import path (``package.module.function``)."""
    if callable(tool):
        return tool
    module, _, name = str(tool).rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        found = None
    if not callable(found):
        raise ValueError(f"{where}: {tool!r} is not an importable callable (give package.module.function)")
    return found


class ToolEnvironment(Environment):
    """Calls the tools the policy asks for and answers with their results (see the module docstring)."""

    def __init__(self, tools: dict[str, str | Callable] | list[str | Callable], syntax: Literal["tags", "chat"] = "tags",
                 result_tags: tuple[str, str] = ("<result>", "</result>"), max_calls: int = 3,
                 timeout_s: float = 5.0, isolation: Literal["thread", "process"] = "thread") -> None:
        """
        Args:
            tools: callables or their import paths; a mapping gives each its name (the tag in the
                ``tags`` syntax), a list uses the functions' own names.
            syntax: ``tags`` (plain text) or ``chat`` (``<tool_call>`` JSON, ``tool`` messages).
            result_tags: what wraps a result in the ``tags`` syntax.
            max_calls: tool calls per episode; a further call ends the episode unanswered.
            timeout_s: a call that runs longer answers with an error (and is abandoned or killed).
            isolation: ``thread`` (a daemon thread per call, abandoned at the time limit) or
                ``process`` (a child process per call, killed at it): see the module docstring.
        """
        named = tools.items() if isinstance(tools, dict) else ((None, t) for t in tools)
        self.tools: dict[str, Callable] = {}
        for name, tool in named:
            fn = resolve_tool(tool, "ToolEnvironment tools")
            self.tools[name or fn.__name__] = fn
        if not self.tools:
            raise ValueError("ToolEnvironment needs at least one tool")
        bad = [n for n in self.tools if not re.fullmatch(r"[A-Za-z_][\w.-]*", n)]
        if bad:
            raise ValueError(f"ToolEnvironment: tool names {bad} cannot be tags (letters, digits, _ . - only)")
        if syntax not in ("tags", "chat"):
            raise ValueError(f"ToolEnvironment syntax must be tags or chat, got {syntax!r}")
        if max_calls < 0 or not timeout_s > 0:
            raise ValueError(f"ToolEnvironment needs max_calls >= 0 and timeout_s > 0, got {max_calls}, {timeout_s}")
        if isolation not in ("thread", "process"):
            raise ValueError(f"ToolEnvironment isolation must be thread or process, got {isolation!r}")
        self.syntax, self.result_tags, self.isolation = syntax, tuple(result_tags), isolation
        self.max_calls, self.timeout_s = max_calls, timeout_s
        self.calls = 0
        names = "|".join(re.escape(n) for n in self.tools)
        self._tag_call = re.compile(rf"<({names})>(.*?)</\1>", re.DOTALL)

    def reset(self, row: dict) -> str | list[dict] | None:
        self.calls = 0
        # Chat episodes render the prompt's messages with the tools in the template.
        return row.get("messages") if self.syntax == "chat" else None

    def stop_strings(self) -> list[str]:
        return [f"</{name}>" for name in self.tools] if self.syntax == "tags" else []

    def tool_schemas(self) -> list | None:
        return list(self.tools.values()) if self.syntax == "chat" else None

    def step(self, action: str) -> Step:
        calls = self._parse(action)
        if not calls:
            return Step(done=True)  # no call: the turn is the final answer
        if self.calls + len(calls) > self.max_calls:
            return Step(done=True, info={"tool_calls_refused": float(len(calls))})
        self.calls += len(calls)
        results = [self._run(name, args) for name, args in calls]
        errors = sum(err for _, err in results)
        info = {"tool_calls": float(len(calls)), "tool_errors": float(errors)}
        if self.syntax == "tags":
            start, end = self.result_tags
            return Step(observation="".join(f"{start}{text}{end}" for text, _ in results), info=info)
        return Step(observation=[{"role": "tool", "content": text} for text, _ in results], info=info)

    def _parse(self, action: str) -> list[tuple[str, object]]:
        """The turn's tool calls as ``(name, argument text or keyword dict)``; an unknown tool or
        malformed JSON becomes a call of name ``""`` whose argument is the error."""
        if self.syntax == "tags":
            found = self._tag_call.search(action)
            return [(found.group(1), found.group(2))] if found else []
        calls = []
        for body in re.findall(r"<tool_call>(.*?)</tool_call>", action, re.DOTALL):
            try:
                call = json.loads(body)
                calls.append((call["name"], dict(call.get("arguments") or {})))
            except (ValueError, KeyError, TypeError) as err:
                calls.append(("", f"malformed tool call ({type(err).__name__}): {body.strip()[:80]}"))
        return calls

    def _run(self, name: str, args) -> tuple[str, bool]:
        """(result text, error?) of one call, within the time limit."""
        if name not in self.tools:
            return (f"error: {args}" if name == "" else f"error: unknown tool {name!r}"), True
        run = _in_process if self.isolation == "process" else _in_thread
        answer = run(self.tools[name], args, self.timeout_s, name)
        if answer is None:
            return f"error: {name} timed out after {self.timeout_s:g} s", True
        if answer[0] == "ok":
            return answer[1], False
        _, kind, message = answer  # the policy reads what went wrong, on one line
        return f"error: {kind}: {' '.join(message.split())[:120]}", True


_CALCULATOR_CHARS = re.compile(r"[0-9+\-* ]+")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def calculator(expression: str) -> str:
    """Evaluate an integer expression of digits, +, - and * (and spaces).

    Args:
        expression: e.g. "123 * 45 + 6".
    """
    text = expression.strip()
    if not text or len(text) > 64 or not _CALCULATOR_CHARS.fullmatch(text):
        raise ValueError(f"not an expression of digits, +, -, *: {expression!r:.70}")

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an expression of digits, +, -, *: {expression!r:.70}")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not a well-formed expression: {expression!r:.70}") from None
    return str(value(tree.body))
