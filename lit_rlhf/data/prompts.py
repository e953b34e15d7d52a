"""Prompts for PPO: a resumable, rank-aware stream of left-padded prompt batches."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from lit_rlhf.data.base import RowsDataModule, collate
from lit_rlhf.data.chat import as_messages, drop_oldest_turns, is_conversation, render, template_of
from lit_rlhf.data.formats import TextFormatter, load_train_val, rank_and_world


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids and mask, padded on the left so all prompts end together."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def collate_prompts(items: list[tuple], pad_id: int) -> dict:
    """``(text, ids)``, ``(text, ids, messages)`` or ``(text, ids, messages, fields)`` items ->
    ``{"input_ids", "attention_mask": (B, T) left-padded, "prompt": list[str]}``, plus
    ``"messages"`` (the conversations the texts were rendered from) when every item has them,
    and ``"fields"``: ``{name: list of B values}``, the data-row fields the items carry."""
    ids, mask = left_pad([item[1] for item in items], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt": [item[0] for item in items]}
    if items and all(len(item) > 2 and item[2] is not None for item in items):
        batch["messages"] = [item[2] for item in items]
    if items and all(len(item) > 3 and item[3] for item in items):
        batch["fields"] = {name: [item[3][name] for item in items] for name in items[0][3]}
    return batch


class PromptStream(IterableDataset):
    """An endless stream of prompt batches; batch k is a pure function of (seed, k, rank).

    Every ``batch_size * world_size`` consecutive prompts of a seeded permutation (a new one
    per pass over the data) form global batch k; rank r takes its own ``batch_size`` slice,
    so ranks sample different prompts. Starting at ``start`` resumes exactly where a run
    stopped: the position is the number of rollouts already done. ``start`` may be a function,
    read when iteration begins: under fsdp2 the Trainer builds the dataloader before it restores
    the checkpoint that holds the count.
    """

    def __init__(self, prompts: list[tuple[str, list[int]]], batch_size: int, pad_id: int, seed: int = 0,
                 start: int | Callable[[], int] = 0) -> None:
        self.prompts, self.batch_size, self.pad_id = prompts, batch_size, pad_id
        self.seed, self.start = seed, start

    def _rank_world(self) -> tuple[int, int]:
        return rank_and_world()

    def batch(self, k: int) -> dict:
        rank, world = self._rank_world()
        per_global = self.batch_size * world
        per_pass = len(self.prompts) // per_global
        if per_pass == 0:
            raise ValueError(f"{len(self.prompts)} prompts are fewer than one global batch of {per_global}")
        epoch, k_in_pass = divmod(k, per_pass)
        order = list(range(len(self.prompts)))
        random.Random(self.seed + epoch).shuffle(order)
        first = k_in_pass * per_global + rank * self.batch_size
        items = [self.prompts[i] for i in order[first : first + self.batch_size]]
        return {**collate_prompts(items, self.pad_id), "index": k}

    def __iter__(self):
        k = int(self.start() if callable(self.start) else self.start)
        while True:
            yield self.batch(k)
            k += 1


class PromptDataModule(RowsDataModule):
    """Prompts for PPO rollouts (train: endless stream) and evaluation (val: held out)."""

    kind = "prompts"

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        template: str | None = None,
        max_prompt_length: int = 64,
        batch_size: int = 8,
        val_size: int = 64,
        val_batch_size: int | None = None,
        name: str | None = None,
        data_files: str | list[str] | dict | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        seed: int = 0,
        revision: str | None = None,
        chat: bool | None = None,
        chat_truncation: Literal["turns", "left"] = "turns",
        fields: list[str] | None = None,
        tokenizer=None,
    ) -> None:
        """
        Args:
            path: a hub dataset name, local json/jsonl/csv/parquet file(s) or directory, or a
                registered name (:mod:`lit_rlhf.data.sources`; the demo's: ``demo``, the first
                words of its reviews, and ``arithmetic``, problems with an ``answer`` field).
            prompt_field: row field holding the prompt, when no template is given: text, or a
                list of messages rendered by the tokenizer's chat template with the
                generation prompt (the response is the assistant's turn).
            template: ``str.format`` pattern over row fields, e.g.
                ``"Question: {question}\\n\\nAnswer: "``.
            max_prompt_length: prompts with more tokens are filtered out (and counted).
            batch_size: prompts per rollout per device (the global rollout batch is
                ``batch_size * devices * num_nodes``).
            val_size: held-out prompts for validation (taken from the train split when
                ``val_split`` is None).
            val_batch_size: prompts per validation batch; default ``batch_size``.
            name: hub dataset config name.
            data_files: ``data_files`` for ``load_dataset``.
            train_split: split with the prompts.
            val_split: split for validation prompts.
            seed: shuffling seed.
            revision: hub dataset revision.
            chat: render prompts with the tokenizer's chat template (a text prompt becomes one
                user message); None: when the prompts are message lists.
            chat_truncation: a conversational prompt over ``max_prompt_length`` first loses its
                oldest turns (``turns``; the system message and the last turn stay) and is
                filtered out if still too long, or keeps its last ``max_prompt_length`` tokens
                (``left``).
            fields: row columns each prompt carries to the reward functions (e.g.
                ``[answer]`` for :class:`~lit_rlhf.rewards.ExactAnswerReward`).
            tokenizer: the policy's tokenizer; linked from the module by the CLI.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {max_prompt_length}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        # (text, token ids, messages or None) per prompt
        self.train_prompts: list[tuple] | None = None
        self.val_prompts: list[tuple] | None = None
        self.stats: dict[str, int] = {}
        self.chat = False  # conversational prompts, rendered by the chat template
        self.messages: dict[str, list[dict]] = {}  # rendered prompt -> its messages
        self.row_fields: dict[str, list[dict]] = {}  # split -> each row's `fields`

    def _texts(self) -> tuple[list[str], list[str], str]:
        hp = self.hparams
        source = self.source()
        if source.train is not None:  # prompt texts a registered name made
            if hp.fields:
                raise ValueError(f"data.init_args.fields {hp.fields}: the {source.description} have no fields "
                                 "(give a file's path)")
            return list(source.train), list(source.val), source.description
        formatter = TextFormatter(hp.prompt_field, hp.template)
        path, val_split = source.path, source.val_split
        rows, val_rows = load_train_val(path, train_split=hp.train_split, val_split=val_split,
                                        val_size=hp.val_size, seed=hp.seed,
                                        name=hp.name, data_files=hp.data_files, revision=hp.revision)
        formatter.check_columns(rows.column_names, f"{hp.path} [{hp.train_split}]")
        if val_split is not None:
            val_rows = val_rows.select(range(min(hp.val_size, len(val_rows))))
        if hp.fields:
            missing = [f for f in hp.fields if f not in rows.column_names]
            if missing:
                raise ValueError(f"{hp.path}: data.init_args.fields {missing} are not columns of the prompts "
                                 f"(columns: {rows.column_names})")
            self.row_fields = {split: [{f: r[f] for f in hp.fields} for r in part]
                               for split, part in (("train", rows), ("val", val_rows))}
        first = next(iter(rows), None)
        chat = hp.chat if hp.chat is not None else first is not None and is_conversation(first[hp.prompt_field])
        if hp.template is None and chat:
            # Conversational prompts: rendered by the chat template, ending in the header
            # that opens the assistant's turn (the response is that turn).
            self.chat, template = True, template_of(self.tokenizer)
            self.stats["prompt_turns_dropped"] = 0

            def text(messages: list[dict]) -> str:
                return render(self.tokenizer, messages, template, add_generation_prompt=True)

            def fits(messages: list[dict]) -> bool:
                return len(self.tokenizer(text(messages), add_special_tokens=False)["input_ids"]) <= hp.max_prompt_length

            def prompt(row: dict, where: str) -> str:
                messages = as_messages(row[hp.prompt_field], f"{where}: field {hp.prompt_field!r}")
                # Too long: the oldest turns go first (the system message and the last turn
                # stay); what still does not fit is filtered out below, and counted.
                if (hp.chat_truncation == "turns" and not fits(messages)
                        and (shorter := drop_oldest_turns(messages, fits)) is not None):
                    messages, dropped = shorter
                    self.stats["prompt_turns_dropped"] += dropped
                rendered = text(messages)
                self.messages[rendered] = messages  # for reward functions that want messages
                return rendered

            return tuple([prompt(r, f"{hp.path} row {i}") for i, r in enumerate(split)]
                         for split in (rows, val_rows)) + (hp.path,)
        return [formatter(r) for r in rows], [formatter(r) for r in val_rows], hp.path

    def _tokenize(self, texts: list[str], split: str, source: str) -> list[tuple[str, list[int]]]:
        limit = self.hparams.max_prompt_length
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{source} [{split}] row {i}: empty or non-string prompt")
        # A rendered conversation holds its own special tokens (the template's BOS): add none.
        ids = self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]
        if self.chat and self.hparams.chat_truncation == "left":
            # The end of the prompt holds the turn to answer and the generation prompt: keep it.
            self.stats[f"{split}_cut_left"] = 0
            for k, (text, prompt_ids) in enumerate(zip(texts, ids)):
                if len(prompt_ids) > limit:
                    ids[k] = prompt_ids[-limit:]
                    texts[k] = self.tokenizer.decode(ids[k])
                    self.messages[texts[k]] = self.messages.get(text)
                    self.stats[f"{split}_cut_left"] += 1
        fields = self.row_fields.get(split) or [None] * len(texts)
        kept = [(t, i, self.messages.get(t), f) for t, i, f in zip(texts, ids, fields) if len(i) <= limit]
        self.stats[f"{split}_prompts"] = len(kept)
        self.stats[f"{split}_too_long"] = len(texts) - len(kept)
        if not kept:
            raise ValueError(f"{source} [{split}]: no prompt fits max_prompt_length={limit}")
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.train_prompts is not None:
            return
        self.require_tokenizer()
        train, val, source = self._texts()
        self.train_prompts = self._tokenize(train, "train", source)
        self.val_prompts = self._tokenize(val, "val", source)
        # Before any weights load: every rollout takes one global batch of distinct prompts.
        world = self.trainer.world_size if self.trainer is not None else rank_and_world()[1]
        if len(self.train_prompts) < self.hparams.batch_size * world:
            raise ValueError(f"{source}: {len(self.train_prompts)} prompts (after filtering) are fewer than one "
                             f"global batch of {self.hparams.batch_size * world} (data.batch_size="
                             f"{self.hparams.batch_size} x {world} device(s)): give more prompts or a smaller batch")
        rank_zero_info(f"{source}: {self.stats}")
        self.log_counts(self.stats)

    def train_dataloader(self) -> DataLoader:
        # Resume: the module counts rollouts done (restored from the checkpoint by the time
        # iteration begins; under fsdp2 after this loader is built).
        module = self.trainer.lightning_module if self.trainer else None
        stream = PromptStream(self.train_prompts, self.hparams.batch_size, self.tokenizer.pad_token_id,
                              self.hparams.seed, start=lambda: getattr(module, "rollouts_done", 0))
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_prompts, batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
                          shuffle=False, collate_fn=collate(collate_prompts, self.tokenizer.pad_token_id))
