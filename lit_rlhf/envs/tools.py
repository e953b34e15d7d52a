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
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib
import json
import re
from collections.abc import Callable
from typing import Literal

from lit_rlhf.envs.base import Environment, Step

_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """One shared pool for every episode (environments are deep-copied, a pool must not be)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lit_rlhf_tool")
    return _POOL


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
                 timeout_s: float = 5.0) -> None:
        """
        Args:
            tools: callables or their import paths; a mapping gives each its name (the tag in the
                ``tags`` syntax), a list uses the functions' own names.
            syntax: ``tags`` (plain text) or ``chat`` (``<tool_call>`` JSON, ``tool`` messages).
            result_tags: what wraps a result in the ``tags`` syntax.
            max_calls: tool calls per episode; a further call ends the episode unanswered.
            timeout_s: a call that runs longer answers with an error (the thread is left to finish:
                Python cannot stop it, so give tools that can hang their own limits).
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
        self.syntax, self.result_tags = syntax, tuple(result_tags)
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
        fn = self.tools[name]
        future = _pool().submit(fn, **args) if isinstance(args, dict) else _pool().submit(fn, args)
        try:
            return str(future.result(timeout=self.timeout_s)), False
        except concurrent.futures.TimeoutError:
            return f"error: {name} timed out after {self.timeout_s:g} s", True
        except Exception as err:  # the policy reads what went wrong, on one line
            message = " ".join(str(err).split())[:120]
            return f"error: {type(err).__name__}: {message}", True


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
