"""Named datasets: short names (``demo``, ``arithmetic``) that stand for rows a package makes.

The data modules resolve their ``path`` through this registry before they treat it as a hub
dataset or local files, and know nothing else about where the names come from (as the model
loader does with :mod:`lit_rlhf.models.sources`). A package registers its names by calling
:func:`register_dataset` or, so that names work in any process without an import, through the
``lit_rlhf.datasets`` entry-point group: each entry point is a function that does the
registering. lit_rlhf's demo registers ``demo`` and ``arithmetic`` this way
(``lit_rlhf.demo.datasets``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lit_rlhf.models.sources import load_entry_points

ENTRY_POINT_GROUP = "lit_rlhf.datasets"

Kind = Literal["sft", "preference", "prompts"]
"""What a data module asks for: SFT documents, preference pairs, or prompts."""


@dataclass
class DatasetSource:
    """What a dataset name stands for, for one kind of data: files, or rows already made."""

    path: str | None = None
    """Local files or a hub name, read as a user's would be."""
    val_split: str | None = None
    """The split of ``path`` to validate on (None: rows held out of train)."""
    train: Any = None
    """Rows made in memory (a ``datasets.Dataset`` or a list), instead of ``path``."""
    val: Any = None
    """Held-out rows, with ``train``."""
    description: str = ""
    """How the data is named in log lines and errors."""


# (name, kind) -> build(seed=..., val_size=...) -> DatasetSource, called on first use.
_DATASETS: dict[tuple[str, str], Callable[..., DatasetSource]] = {}


def register_dataset(name: str, kind: Kind, build: Callable[..., DatasetSource]) -> None:
    """Make ``name`` stand for the data ``build(seed=..., val_size=...)`` returns for ``kind``.

    ``build`` is called when a data module sets up with ``path: name``; it may prepare files
    (the demo writes its corpus on first use).
    """
    _DATASETS[(name, kind)] = build


def _load_entry_points() -> None:
    load_entry_points(ENTRY_POINT_GROUP)


def resolve_dataset(path: str, kind: Kind, *, val_split: str | None = None, seed: int = 0,
                    val_size: int = 0) -> DatasetSource:
    """The source a registered name stands for, or ``path`` itself (a hub name or local files)."""
    if (path, kind) not in _DATASETS:
        _load_entry_points()
    build = _DATASETS.get((path, kind))
    if build is None:
        return DatasetSource(path=path, val_split=val_split, description=path)
    return build(seed=seed, val_size=val_size)


def registered_datasets(kind: Kind | None = None) -> list[str]:
    """Every registered dataset name (of ``kind``), for error messages."""
    _load_entry_points()
    return sorted({name for name, k in _DATASETS if kind is None or k == kind})
