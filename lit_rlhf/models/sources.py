"""Named model sources: short names that stand for a local directory or an architecture.

The loader resolves ``name_or_path``, ``tokenizer`` and ``arch`` through this registry before
it treats them as hub ids or paths, and knows nothing else about where the names come from.
A package registers its names either by calling :func:`register_path` / :func:`register_arch`
or, so that names work in any process without an import, through the ``lit_rlhf.sources``
entry-point group: each entry point is a function that does the registering. lit_rlhf's own
demo registers ``demo`` (tokenizer), ``demo-tiny`` (architecture), ``demo-sft`` and
``demo-rm`` (models) this way (see ``lit_rlhf.demo.models``).

Resolvers are called lazily, on first use of a name, so a registered model may be built
then (the demo models train on first use).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "lit_rlhf.sources"

_PATHS: dict[str, Callable[[], str]] = {}
_UNBUILT: dict[str, Callable[[], tuple[dict, str] | None]] = {}
_ARCHS: dict[str, Callable[[], dict]] = {}


def register_path(name: str, resolve: Callable[[], object],
                  unbuilt: Callable[[], tuple[dict, str] | None] | None = None) -> None:
    """Make ``name`` stand for the directory that ``resolve()`` returns (called on first use).

    ``unbuilt()``, for a model that ``resolve()`` would first have to build: while it is not
    built, the ``ModelConfig`` fields of its shape (``arch``, ``tokenizer``) and a note saying
    so; None once built. What reads a shape without weights (the memory estimator) asks it.
    """
    _PATHS[name] = lambda: str(resolve())
    if unbuilt is not None:
        _UNBUILT[name] = unbuilt


def unbuilt_model(name: str) -> tuple[dict, str] | None:
    """``(fields, note)`` for a registered model that is not built yet (see :func:`register_path`)."""
    if name not in _PATHS:
        _load_entry_points()
    unbuilt = _UNBUILT.get(name)
    return unbuilt() if unbuilt is not None else None


def register_arch(name: str, fields: Callable[[], dict]) -> None:
    """Make ``name`` stand for the config fields (with ``model_type``) that ``fields()`` returns."""
    _ARCHS[name] = fields


_LOADED_GROUPS: set[str] = set()


def load_entry_points(group: str) -> None:
    """Call every function of the entry-point ``group`` once per process (each registers names)."""
    if group in _LOADED_GROUPS:
        return
    _LOADED_GROUPS.add(group)
    for entry in entry_points(group=group):
        entry.load()()


def _load_entry_points() -> None:
    load_entry_points(ENTRY_POINT_GROUP)


def resolve_path(name_or_path: str) -> str:
    """The directory a registered name stands for; anything else is returned unchanged."""
    if name_or_path not in _PATHS:
        _load_entry_points()
    resolve = _PATHS.get(name_or_path)
    return resolve() if resolve is not None else name_or_path


def registered_arch(name: str) -> dict | None:
    """A copy of the config fields a registered architecture name stands for, or None."""
    if name not in _ARCHS:
        _load_entry_points()
    fields = _ARCHS.get(name)
    return dict(fields()) if fields is not None else None


def registered_names() -> list[str]:
    """Every registered name (paths and architectures), for error messages."""
    _load_entry_points()
    return sorted({*_PATHS, *_ARCHS})
