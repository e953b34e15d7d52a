"""Reading rows with `datasets` and turning them into training text.

Sources: a hub dataset name, or local json/jsonl/csv/parquet/txt files or a directory of
them — the same code path, so local files of a hub dataset's schema test the real loader.
"""

from __future__ import annotations

import string
from pathlib import Path

from lit_rlhf.data.chat import check_messages, is_conversation

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(
    path: str,
    *,
    split: str = "train",
    name: str | None = None,
    data_files: str | list[str] | dict | None = None,
    streaming: bool = False,
    revision: str | None = None,
):
    """Load one split as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    Args:
        path: hub dataset name, a local data file, or a local directory of data files.
        split: split name; local single files only have ``train``.
        data_files: passed to ``load_dataset`` for hub/builder datasets.
    """
    import datasets

    local = Path(path)
    if local.suffix in _BUILDERS or path.startswith((".", "/", "~")):
        local = local.expanduser()
        if not local.exists():
            raise FileNotFoundError(f"data file not found: {path}")
    if local.is_file():
        if local.suffix not in _BUILDERS:
            raise ValueError(f"{path}: unknown data file type {local.suffix!r}; use one of {sorted(_BUILDERS)}")
        if local.stat().st_size == 0:
            raise ValueError(f"{path}: the file is empty")
        builder = _BUILDERS[local.suffix]
        try:
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split, streaming=streaming)
        except Exception as err:  # datasets wraps parse errors in DatasetGenerationError
            raise ValueError(_unreadable(local, builder, err)) from err
    return datasets.load_dataset(
        path, name, split=split, data_files=data_files, streaming=streaming, revision=revision
    )


def _unreadable(path: Path, builder: str, err: Exception) -> str:
    """One line saying why a local data file cannot be read, with the line number for JSON Lines."""
    import json

    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"{path}, line {number}: not valid JSON ({bad.msg}, column {bad.colno})"
                if not isinstance(row, dict):
                    return f"{path}, line {number}: a JSON {type(row).__name__}, not an object with fields"
    cause = str(err.__cause__ or err).strip().splitlines()
    return f"{path}: cannot be read as {builder}: {cause[0] if cause else type(err).__name__}"


ROW_COLUMN = "_row"
"""A column of file-order row numbers, added (``load_train_val(row_numbers=True)``) before the
held-out split shuffles the rows, so that a later error can still name the file's line."""


def row_label(source, index: int) -> str:
    """``"<file>: line N"`` for JSON Lines (one row per line), else ``"<source>: row N"``; 1-based."""
    return f"{source}: {'line' if str(source).endswith('.jsonl') else 'row'} {index + 1}"


class TextFormatter:
    """Turns a row into training text, or into a ``(prompt, completion)`` pair.

    ``template`` is a ``str.format`` pattern over the row's fields, e.g. the Stack Exchange
    paired schema ``"Question: {question}\\n\\nAnswer: {response_j}"``. Without a template the
    text is ``row[text_field]``. With ``completion_template`` the row becomes a pair and only
    the completion is trained on.
    """

    def __init__(
        self, text_field: str = "text", template: str | None = None, completion_template: str | None = None
    ) -> None:
        if completion_template is not None and template is None:
            raise ValueError("completion_template needs a (prompt) template")
        self.text_field = text_field
        self.template = template
        self.completion_template = completion_template

    @property
    def fields(self) -> list[str]:
        """The row fields this formatter reads."""
        if self.template is None:
            return [self.text_field]
        names = []
        for pattern in (self.template, self.completion_template or ""):
            names += [f for _, f, _, _ in string.Formatter().parse(pattern) if f and f not in names]
        return names

    @property
    def completion_only(self) -> bool:
        return self.completion_template is not None

    def check_columns(self, columns, source: str) -> None:
        """Raise a one-line error naming the fields ``source`` lacks."""
        if columns is None:  # some streaming datasets do not know their columns up front
            return
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}; columns are {list(columns)}")

    def check_rows(self, rows, source: str) -> None:
        """One line naming the file, line and field of the first row that cannot become text.

        Run on the whole file before it is split (a split is shuffled: its row numbers are
        not the file's). Streamed rows are checked as they are packed instead.
        """
        if not hasattr(rows, "column_names") or not hasattr(rows, "__len__"):
            return
        for name in self.fields:
            if name not in (rows.column_names or ()):
                continue  # check_columns names it
            for i, value in enumerate(rows[name]):
                # A template formats any value but None; a text field must hold text.
                bad = value is None if self.template else not (isinstance(value, str) and value.strip())
                if bad:
                    want = "a value" if self.template else "non-empty text"
                    raise ValueError(f"{row_label(source, i)}: field {name!r} is {value!r}, expected {want}")

    def __call__(self, row: dict) -> str | tuple[str, str]:
        if self.template is None:
            return row[self.text_field]
        prompt = self.template.format(**row)
        if self.completion_template is None:
            return prompt
        return prompt, self.completion_template.format(**row)


class ConversationFormatter:
    """Turns a conversational row into messages: a ``messages`` list (``kind="messages"``), or
    ``prompt`` + ``completion`` (``kind="prompt_completion"``; a prompt given as text is one
    user message, a completion as text one assistant message)."""

    def __init__(self, kind: str = "messages", messages_field: str = "messages", need_assistant: bool = True) -> None:
        self.kind, self.messages_field, self.need_assistant = kind, messages_field, need_assistant

    @property
    def fields(self) -> list[str]:
        return [self.messages_field] if self.kind == "messages" else ["prompt", "completion"]

    def check_columns(self, columns, source: str) -> None:
        missing = [f for f in self.fields if columns is not None and f not in columns]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}; columns are {list(columns)}")

    def check_rows(self, rows, source: str) -> None:
        """One line naming the file, line (row) and field of the first bad conversation."""
        if not hasattr(rows, "__len__"):
            return
        for i, row in enumerate(rows):
            self.messages(row, row_label(source, i))

    def messages(self, row: dict, where: str) -> list[dict]:
        """The row's conversation, checked; errors name ``where`` and the field(s)."""
        fields = " + ".join(repr(f) for f in self.fields)
        return check_messages(self(row), f"{where}: field {fields}", need_assistant=self.need_assistant)

    def __call__(self, row: dict) -> list[dict]:
        # Assembly only: rows are checked by check_rows, packed documents by the dataset.
        if self.kind == "messages":
            return row[self.messages_field]
        prompt, completion = row["prompt"], row["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            return [prompt, completion]  # not messages: check_messages names the problem
        return prompt + completion


def conversation_kind(rows, messages_field: str = "messages") -> str | None:
    """``"messages"`` or ``"prompt_completion"`` when ``rows`` hold conversations, else None."""
    columns = list(getattr(rows, "column_names", None) or [])
    first = next(iter(rows), None) if columns else None
    if first is None:
        return None
    if messages_field in columns and is_conversation(first[messages_field]):
        return "messages"
    if {"prompt", "completion"} <= set(columns) and (is_conversation(first["prompt"])
                                                     or is_conversation(first["completion"])):
        return "prompt_completion"
    return None


def load_train_val(
    path: str,
    *,
    train_split: str = "train",
    val_split: str | None = None,
    val_size: int = 500,
    seed: int = 0,
    streaming: bool = False,
    check=None,
    row_numbers: bool = False,
    **kwargs,
):
    """(train, val) rows: a named validation split, or ``val_size`` rows held out of train.

    ``kwargs`` go to :func:`load_rows` (``name``, ``data_files``, ``revision``). A streamed
    train split holds out its first ``val_size`` rows. ``check(rows)`` sees the train split
    before anything is held out of it (row numbers are the file's). ``row_numbers``: add each
    row's number in its split as column :data:`ROW_COLUMN` (not for streamed splits).
    """
    if val_split is None and val_size < 1:
        raise ValueError(f"data.val_size must be >= 1 without a val_split, got {val_size}")
    numbered = lambda rows: rows.add_column(ROW_COLUMN, list(range(len(rows)))) if row_numbers else rows  # noqa: E731
    train = load_rows(path, split=train_split, streaming=streaming, **kwargs)
    if check is not None:
        check(train)
    if not streaming:
        train = numbered(train)
    if val_split is not None:
        return train, numbered(load_rows(path, split=val_split, **kwargs))
    if streaming:
        return train.skip(val_size), train.take(val_size)
    if len(train) <= val_size:
        raise ValueError(f"{path}: {len(train)} rows, not enough to hold out val_size={val_size}")
    parts = train.train_test_split(test_size=val_size, seed=seed)
    return parts["train"], parts["test"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
