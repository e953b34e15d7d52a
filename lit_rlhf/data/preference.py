"""Preference pairs for reward modelling: schemas, tokenization, length-grouped batches.

Supported schemas (``schema="auto"`` picks by columns):

* ``explicit``: ``{prompt, chosen, rejected}``; the texts scored are prompt + chosen and
  prompt + rejected;
* ``implicit``: ``{chosen, rejected}`` holding whole conversations (Anthropic HH style);
* ``stack_exchange``: ``{question, response_j, response_k}`` with ``response_j`` preferred,
  formatted ``"Question: {question}\\n\\nAnswer: {response}"``;
* ``chat``: ``chosen``/``rejected`` as message lists, with a ``prompt`` (text or messages; the
  sides may repeat it, as in UltraFeedback-binarized) or without (the prompt is their longest
  common leading run of messages, HH-RLHF style); rendered by the tokenizer's chat template.

A batch of B pairs is one tensor holding 2B sequences, chosen first then rejected, so the
reward model scores both sides in one forward pass (two passes break DDP with gradient
checkpointing: parameters would be "marked ready twice"). By default the sequences are packed
end to end in one row (:func:`pack_pairs`); :func:`collate_pairs` gives one right-padded row each.
"""

from __future__ import annotations

import random
from typing import Literal, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_rlhf.data.base import RowsDataModule, collate
from lit_rlhf.data.chat import (
    as_messages,
    check_messages,
    drop_oldest_turns,
    is_conversation,
    render,
    split_pair,
    template_of,
)
from lit_rlhf.data.formats import ROW_COLUMN, load_train_val, rank_and_world, row_label

Schema = Literal["auto", "explicit", "implicit", "stack_exchange", "chat"]
SCHEMA_FIELDS: dict[str, tuple[str, ...]] = {
    "explicit": ("prompt", "chosen", "rejected"),
    "stack_exchange": ("question", "response_j", "response_k"),
    "implicit": ("chosen", "rejected"),
}
CHAT_FIELDS = ("chosen", "rejected")  # the "chat" schema; "prompt" is optional
STACK_EXCHANGE_TEMPLATE = "Question: {question}\n\nAnswer: {response}"


def detect_schema(columns, source: str) -> str:
    """The first schema (most specific first) whose fields are all among ``columns``."""
    for schema, fields in SCHEMA_FIELDS.items():
        if all(f in columns for f in fields):
            return schema
    expected = "; ".join(f"{s}: {list(f)}" for s, f in SCHEMA_FIELDS.items())
    raise ValueError(f"{source}: columns {list(columns)} match no preference schema ({expected})")


def is_chat(rows) -> bool:
    """Conversational pairs: the first row's ``chosen`` is a list of messages."""
    columns = list(getattr(rows, "column_names", None) or [])
    first = next(iter(rows), None) if {"chosen", "rejected"} <= set(columns) else None
    return first is not None and is_conversation(first["chosen"])


def chat_pair(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) messages of a conversational row, checked."""
    prompt = as_messages(row["prompt"], f"{where}: field 'prompt'") if row.get("prompt") is not None else None
    chosen = check_messages(row["chosen"], f"{where}: field 'chosen'")
    rejected = check_messages(row["rejected"], f"{where}: field 'rejected'")
    return split_pair(chosen, rejected, prompt, where)


def chat_pair_texts(row: dict, tokenizer, template: str, where: str, max_length: int | None = None
                    ) -> tuple[str, str, int]:
    """(chosen, rejected) conversations rendered as text, both with the same prompt, and how
    many of the prompt's oldest messages were dropped so that both fit ``max_length`` tokens
    (None: no limit). The answers are never cut; a pair that does not fit even with the
    shortest prompt is returned whole (and dropped or cut as any too-long pair)."""
    prompt, chosen, rejected = chat_pair(row, where)

    def texts(p: list[dict]) -> tuple[str, str]:
        return render(tokenizer, p + chosen, template), render(tokenizer, p + rejected, template)

    def fits(p: list[dict]) -> bool:
        return all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= max_length for t in texts(p))

    dropped = 0
    if max_length is not None and not fits(prompt):
        shortened = drop_oldest_turns(prompt, fits)
        if shortened is not None:
            prompt, dropped = shortened
    return (*texts(prompt), dropped)


def pair_texts(row: dict, schema: str) -> tuple[str, str]:
    """(chosen text, rejected text) of one row."""
    if schema == "explicit":
        return row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    if schema == "implicit":
        return row["chosen"], row["rejected"]
    q = row["question"]
    return (
        STACK_EXCHANGE_TEMPLATE.format(question=q, response=row["response_j"]),
        STACK_EXCHANGE_TEMPLATE.format(question=q, response=row["response_k"]),
    )


def row_problem(row: dict, schema: str) -> str | None:
    """Why a row cannot be a training pair, or None if it can."""
    for field in SCHEMA_FIELDS[schema]:
        value = row[field]
        if not isinstance(value, str):
            return f"field {field!r} is {type(value).__name__}, not a string"
        if field != "prompt" and not value.strip():
            return f"field {field!r} is empty"
    chosen, rejected = pair_texts(row, schema)
    if chosen == rejected:
        return "chosen and rejected are identical"
    return None


class Pair(NamedTuple):
    """One tokenized preference pair."""

    chosen: list[int]
    rejected: list[int]
    margin: float
    prompt_length: int
    """Leading tokens the two sides share (the prompt, and any identical start of the answers):
    what a policy objective such as DPO masks. Shared tokens have the same log-prob on both
    sides, so they cancel in the DPO margin; at least one token of each side stays."""
    reference: tuple[float, float] | None = None
    """(chosen, rejected) summed response log-probs under a fixed reference model, once
    computed (DPO's ``precompute_reference``); None until then."""


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common leading run of ``a`` and ``b``, leaving each at least one token."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PairDataset(Dataset):
    """Tokenized pairs; ``self.stats`` counts what was kept, truncated, dropped, skipped."""

    def __init__(
        self,
        rows,
        tokenizer,
        *,
        schema: Schema = "auto",
        max_length: int = 512,
        too_long: Literal["drop", "truncate"] = "drop",
        on_bad_row: Literal["error", "skip"] = "error",
        margin_field: str | None = None,
        source: str = "data",
        chat_truncation: Literal["turns", "left"] = "turns",
        file: str | None = None,
    ) -> None:
        # Errors name the file's line where the rows carry their file-order number (ROW_COLUMN).
        def where(i: int, row: dict) -> str:
            return row_label(file, row[ROW_COLUMN]) if file is not None and ROW_COLUMN in row else f"{source} row {i}"

        columns = rows.column_names
        if schema == "auto":
            schema = "chat" if is_chat(rows) else detect_schema(columns, source)
        self.schema = schema
        chat = schema == "chat"
        template = template_of(tokenizer) if chat else None
        fields = CHAT_FIELDS if chat else SCHEMA_FIELDS[self.schema]
        missing = [f for f in fields + ((margin_field,) if margin_field else ()) if f not in columns]
        if missing:
            raise ValueError(f"{source}: missing column(s) {missing} for schema {self.schema!r}; columns are {list(columns)}")
        self.pairs: list[Pair] = []
        self.stats = {"pairs": 0, "truncated": 0, "dropped_too_long": 0, "skipped_bad": 0}
        if chat:
            self.stats["prompt_turns_dropped"] = 0
        good_rows, texts = [], []
        for i, row in enumerate(rows):
            problem, pair = row_problem(row, self.schema) if not chat else None, None
            if chat:
                try:
                    # too_long: truncate drops the prompt's oldest turns before any cut.
                    turns = too_long == "truncate" and chat_truncation == "turns"
                    *pair, dropped = chat_pair_texts(row, tokenizer, template, where(i, row),
                                                     max_length if turns else None)
                    self.stats["prompt_turns_dropped"] += dropped
                except ValueError as err:
                    problem = str(err).removeprefix(f"{where(i, row)}: ")
            if problem is not None:
                if on_bad_row == "error":
                    raise ValueError(f"{where(i, row)}: {problem} (set on_bad_row: skip to skip such rows)")
                self.stats["skipped_bad"] += 1
                continue
            good_rows.append((i, row))
            texts.extend(pair or pair_texts(row, self.schema))
        # A rendered conversation holds its own special tokens (the template's BOS): add none.
        ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"] if texts else []
        for k, (i, row) in enumerate(good_rows):
            chosen, rejected = ids[2 * k], ids[2 * k + 1]
            if max(len(chosen), len(rejected)) > max_length:
                if too_long == "drop":
                    self.stats["dropped_too_long"] += 1
                    continue
                # A conversation keeps its end (the answers), text its start.
                cut = slice(-max_length, None) if chat else slice(max_length)
                chosen, rejected = chosen[cut], rejected[cut]
                self.stats["truncated"] += 1
                if chosen == rejected:  # the prompt filled max_length: no response is left to compare
                    if on_bad_row == "error":
                        raise ValueError(
                            f"{where(i, row)}: chosen and rejected are identical in their first {max_length} "
                            "tokens: the prompt leaves no room for the responses (raise data.max_length, set "
                            "data.too_long: drop, or on_bad_row: skip to skip such rows)")
                    self.stats["skipped_bad"] += 1
                    continue
            margin = float(row[margin_field]) if margin_field else 0.0
            self.pairs.append(Pair(chosen, rejected, margin, shared_prefix(chosen, rejected)))
        self.stats["pairs"] = len(self.pairs)
        if not self.pairs:
            raise ValueError(f"{source}: no usable preference pairs ({self.stats})")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        # The batch sampler hands over a whole batch of indices at once (see PairBatches).
        return [self.pairs[i] for i in index]

    def lengths(self) -> list[int]:
        return [max(len(p.chosen), len(p.rejected)) for p in self.pairs]

    def set_reference(self, logps: torch.Tensor) -> None:
        """Keep each pair's reference log-probs, (n, 2) chosen and rejected, in pair order."""
        if logps.shape != (len(self.pairs), 2):
            raise ValueError(f"reference log-probs {tuple(logps.shape)} for {len(self.pairs)} pairs")
        self.pairs = [p._replace(reference=(c, r)) for p, (c, r) in zip(self.pairs, logps.tolist())]

    def has_reference(self) -> bool:
        return all(p.reference is not None for p in self.pairs)


class PairBatches(DistributedSampler):
    """Batches of pair indices with similar lengths, so little of each batch is padding.

    Indices are shuffled, cut into mega-batches of ``batch_size * world_size * group`` pairs,
    each sorted by length and cut into global batches of ``batch_size * world_size`` pairs;
    their order is shuffled again, and rank r takes every ``world_size``-th pair of each global
    batch, from the r-th on. So one seed gives the same global batches on any number of
    processes (one process with ``batch_size * world_size`` trains on what N processes train on
    together), every rank gets the same number of batches, and their lengths stay alike.

    It shards by itself, so it is a ``DistributedSampler`` to Lightning: any other sampler
    Lightning wraps in its own ``DistributedSamplerWrapper`` under DDP, which would shard the
    already-sharded batches a second time (on two processes each rank would see a quarter of
    the data). It is handed to the DataLoader as ``sampler``, with ``batch_size=None``.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0, group: int = 50):
        # DistributedSampler.__init__ is not called: it wants a dataset and an initialised
        # process group, and this class computes its rank's share lazily, at iteration.
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.seed, self.group, self.epoch = seed, group, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        return rank_and_world()

    def _batches(self, world: int) -> list[list[int]]:
        """The global batches (``batch_size * world`` pairs each, the last one maybe fewer)."""
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        size = self.batch_size * world
        mega = size * self.group
        batches = []
        for start in range(0, len(order), mega):
            block = sorted(order[start : start + mega], key=lambda i: self.lengths[i])
            batches += [block[i : i + size] for i in range(0, len(block), size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        rank, world = self._rank_world()
        # A last global batch with fewer pairs than ranks is left out: every rank needs one.
        return iter(batch[rank::world] for batch in self._batches(world) if len(batch) >= world)

    def __len__(self) -> int:
        _, world = self._rank_world()
        full, rest = divmod(len(self.lengths), self.batch_size * world)
        return full + (rest >= world if rest else 0)


def _prompt_lengths(pairs) -> torch.Tensor:
    lengths = [getattr(p, "prompt_length", 0) for p in pairs]
    return torch.tensor(lengths + lengths, dtype=torch.long)


def _with_reference(batch: dict, pairs) -> dict:
    """Add ``reference_logps`` (2B,) float32, chosen first, when every pair has them."""
    refs = [getattr(p, "reference", None) for p in pairs]
    if refs and all(r is not None for r in refs):
        batch["reference_logps"] = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return batch


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad B pairs into one batch of 2B sequences.

    Returns:
        input_ids, attention_mask: (2B, T), rows 0..B-1 chosen, B..2B-1 rejected.
        margin: (B,) float.
        prompt_lengths: (2B,) shared leading tokens of each sequence's pair (see :class:`Pair`).
        reference_logps: (2B,) the pairs' precomputed reference log-probs, if they all have them.
    """
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    margin = torch.tensor([p[2] for p in pairs], dtype=torch.float)
    return _with_reference({"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin,
                            "prompt_lengths": _prompt_lengths(pairs)}, pairs)


def pack_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Lay the 2B sequences of B pairs end to end in one row, with no padding at all.

    The reward model's forward pass then computes on the real tokens only. Position ids
    restart at 0 for each sequence, and ``lengths`` gives the boundaries, so that attention
    stays inside each sequence (see :meth:`~lit_rlhf.modules.RewardModule.forward_packed`).
    ``pad_id`` is unused; it keeps the signature of :func:`collate_pairs`.

    Returns:
        input_ids, position_ids: (1, N), N the total length of the 2B sequences.
        lengths: (2B,) length of each sequence; chosen sides first, then rejected ones.
        margin: (B,) float.
        prompt_lengths: (2B,) shared leading tokens of each sequence's pair (see :class:`Pair`).
        reference_logps: (2B,) the pairs' precomputed reference log-probs, if they all have them.
    """
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    return _with_reference({
        "input_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None],
        "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
        "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long),
        "margin": torch.tensor([p[2] for p in pairs], dtype=torch.float),
        "prompt_lengths": _prompt_lengths(pairs),
    }, pairs)


class PreferenceDataModule(RowsDataModule):
    """Preference pairs from a registered name, the hub or local files, batched for one forward pass."""

    kind = "preference"

    def __init__(
        self,
        path: str,
        schema: Schema = "auto",
        max_length: int = 512,
        too_long: Literal["drop", "truncate"] = "drop",
        chat_truncation: Literal["turns", "left"] = "turns",
        on_bad_row: Literal["error", "skip"] = "error",
        margin_field: str | None = None,
        batch_size: int = 4,
        name: str | None = None,
        data_files: str | list[str] | dict | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_size: int = 500,
        max_train_pairs: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        revision: str | None = None,
        pack: bool = True,
        tokenizer=None,
    ) -> None:
        """
        Args:
            path: a hub dataset name, local json/jsonl/csv/parquet file(s) or directory, or a
                registered name (:mod:`lit_rlhf.data.sources`; the demo's ``demo``: pairs
                labelled by its judge).
            schema: ``explicit``, ``implicit``, ``stack_exchange``, ``chat``, or ``auto`` (by columns
                and, for ``chat``, message lists in the first row).
            max_length: longest tokenized side of a pair.
            too_long: ``drop`` pairs with a side over ``max_length``, or ``truncate`` them: text
                keeps its first ``max_length`` tokens; a conversation first loses the prompt's
                oldest turns (``chat_truncation: turns``), then tokens from the left, so the
                answers are never cut.
            chat_truncation: ``turns`` (drop the oldest prompt turns first) or ``left`` (cut
                tokens from the left only).
            on_bad_row: ``error`` on an empty/non-string/identical pair, naming the row, or
                ``skip`` it (counted and logged).
            margin_field: column with a per-pair margin for the loss; None for no margin.
            batch_size: pairs per batch per device (2x sequences per forward pass).
            name: hub dataset config name.
            data_files: ``data_files`` for ``load_dataset`` (e.g. ``data/reward/*.parquet``).
            train_split: split to train on.
            val_split: split to validate on; None holds out ``val_size`` train rows.
            val_size: rows held out when ``val_split`` is None.
            max_train_pairs: use at most this many training rows (quick experiments).
            num_workers: dataloader workers per device.
            seed: split and shuffling seed.
            revision: hub dataset revision.
            pack: lay the batch's sequences end to end in one row (no padding) and score
                each at its last token (see ``RewardModule.forward_packed``, which falls back
                to padded rows for models it cannot attend per sequence).
                ``false``: right-padded rows, one sequence each.
            tokenizer: the model's tokenizer; linked from the module by the CLI.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None

    def _splits(self):
        hp = self.hparams
        source = self.source()
        if source.train is not None:  # rows a registered name made (no file to name in errors)
            return source.train, source.val, source.description, None
        train, val = load_train_val(source.path, train_split=hp.train_split, val_split=source.val_split,
                                    val_size=hp.val_size, seed=hp.seed, check=self._check, row_numbers=True,
                                    name=hp.name, data_files=hp.data_files, revision=hp.revision)
        return train, val, hp.path, source.path

    def _check(self, rows) -> None:
        # Every row, in file order, before the held-out split shuffles them.
        hp = self.hparams
        if not hasattr(rows, "__len__"):
            return
        if hp.schema in ("auto", "chat") and is_chat(rows):
            template_of(self.tokenizer)  # no template: one line now
            for i, row in enumerate(rows):  # the messages only: rendering waits for PairDataset
                try:
                    chat_pair(row, row_label(hp.path, i))
                except ValueError:
                    if hp.on_bad_row == "error":
                        raise
            return
        schema = detect_schema(rows.column_names, hp.path) if hp.schema == "auto" else hp.schema
        if hp.on_bad_row == "error" and schema in SCHEMA_FIELDS and all(f in rows.column_names for f in SCHEMA_FIELDS[schema]):
            for i, row in enumerate(rows):
                if (problem := row_problem(row, schema)) is not None:
                    raise ValueError(f"{row_label(hp.path, i)}: {problem} (set on_bad_row: skip to skip such rows)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.require_tokenizer()
        hp = self.hparams
        train, val, source, file = self._splits()
        if hp.max_train_pairs is not None:
            train = train.select(range(min(hp.max_train_pairs, len(train))))
        common = dict(schema=hp.schema, max_length=hp.max_length, too_long=hp.too_long,
                      chat_truncation=hp.chat_truncation,
                      on_bad_row=hp.on_bad_row, margin_field=hp.margin_field)
        self.train_set = PairDataset(train, self.tokenizer, source=f"{source} [train]", file=file, **common)
        self.val_set = PairDataset(val, self.tokenizer, source=f"{source} [val]", file=file, **common)
        for split, ds in (("train", self.train_set), ("val", self.val_set)):
            rank_zero_info(f"{source} [{split}] schema={ds.schema}: {ds.stats}")
        self.log_counts({f"{split}_{k}": v for split, ds in (("train", self.train_set), ("val", self.val_set))
                         for k, v in ds.stats.items()})

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: PairDataset, shuffle: bool) -> DataLoader:
        sampler = PairBatches(dataset.lengths(), self.hparams.batch_size, shuffle, self.hparams.seed)
        # Lightning calls sampler.set_epoch(epoch) each epoch, reshuffling the batches. The
        # train loader is stateful: checkpoints hold its position, so a resumed run goes on
        # mid-epoch with the next batch.
        loader_class = StatefulDataLoader if shuffle else DataLoader
        return loader_class(dataset, batch_size=None, sampler=sampler, num_workers=self.hparams.num_workers,
                          collate_fn=collate(pack_pairs if self.hparams.pack else collate_pairs, self.tokenizer.pad_token_id))
