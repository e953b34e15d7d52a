"""SFTDataModule: rows from `datasets` -> packed, constant-length chunks."""

from __future__ import annotations

from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_rlhf.data.base import RowsDataModule
from lit_rlhf.data.chat import template_of
from lit_rlhf.data.formats import (
    ConversationFormatter,
    TextFormatter,
    conversation_kind,
    load_train_val,
)
from lit_rlhf.data.packing import ConstantLengthDataset, pack_collate


class SFTDataModule(RowsDataModule):
    """Packed causal-LM data for SFT.

    Every batch is ``{"input_ids", "labels", "position_ids"}`` of shape (batch_size,
    seq_length): documents joined by EOS, no padding, position ids restarting per document
    so attention stays inside each document.
    """

    kind = "sft"

    def __init__(
        self,
        path: str,
        seq_length: int = 512,
        batch_size: int = 8,
        text_field: str = "text",
        template: str | None = None,
        completion_template: str | None = None,
        name: str | None = None,
        data_files: str | list[str] | dict | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_size: int = 500,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        revision: str | None = None,
        messages_field: str = "messages",
        assistant_only_loss: bool = True,
        tokenizer=None,
    ) -> None:
        """
        Args:
            path: a hub dataset name, local json/jsonl/csv/parquet/txt file(s) or directory, or
                a registered name (:mod:`lit_rlhf.data.sources`; the demo's: ``demo``, ``arithmetic``).
            seq_length: tokens per packed chunk.
            batch_size: chunks per batch, per device.
            text_field: row field with the text, when no template is given.
            template: ``str.format`` pattern over row fields, e.g.
                ``"Question: {question}\\n\\nAnswer: {response_j}"``.
            completion_template: with ``template`` as the prompt, the part trained on
                (completion-only loss: prompt tokens get no loss).
            name: hub dataset config name.
            data_files: ``data_files`` for ``load_dataset`` (hub or builder datasets).
            train_split: split to train on.
            val_split: split to validate on; None carves ``val_size`` rows off the train split.
            val_size: rows held out for validation when ``val_split`` is None.
            streaming: stream the train split (infinite packing; set ``trainer.max_steps``).
            shuffle_buffer: chunks shuffled through a buffer of this size (0: off).
            num_workers: dataloader workers per device.
            seed: shuffling and split seed.
            revision: hub dataset revision.
            messages_field: the field of conversational rows (a list of ``{role, content}``
                messages), rendered with the tokenizer's chat template. Rows of ``prompt`` +
                ``completion`` message lists (or a text prompt) are conversational too.
            assistant_only_loss: conversational rows are trained on their assistant turns
                only (end-of-turn tokens included); False trains on every token.
            tokenizer: the model's tokenizer; linked from the module by the CLI.
        """
        super().__init__()
        if seq_length < 2:
            raise ValueError(f"data.seq_length must be >= 2, got {seq_length}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.formatter = TextFormatter(text_field, template, completion_template)
        self.train_set: ConstantLengthDataset | None = None
        self.val_set: ConstantLengthDataset | None = None

    def _splits(self):
        hp = self.hparams
        source = self.source()
        if source.train is not None:  # rows a registered name made
            return source.train, source.val, source.description
        path, val_split = source.path, source.val_split
        train, val = load_train_val(path, train_split=hp.train_split, val_split=val_split,
                                    val_size=hp.val_size, seed=hp.seed, streaming=hp.streaming,
                                    name=hp.name, data_files=hp.data_files, revision=hp.revision,
                                    check=lambda rows: self._check(rows, path))
        return train, val, path

    def _check(self, rows, source: str) -> None:
        # Conversational rows are recognised from the columns and the first row's values.
        hp = self.hparams
        kind = conversation_kind(rows, hp.messages_field) if hp.template is None else None
        if kind is not None:
            self.formatter = ConversationFormatter(kind, hp.messages_field, need_assistant=hp.assistant_only_loss)
            template_of(self.tokenizer)  # no template: one line now, not at the first batch
        self.formatter.check_columns(rows.column_names, source)
        self.formatter.check_rows(rows, source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.require_tokenizer()
        hp = self.hparams
        train, val, source = self._splits()
        for rows, split in ((train, "train"), (val, "val")):
            self.formatter.check_columns(rows.column_names, f"{source} [{split}]")
        conversational = isinstance(self.formatter, ConversationFormatter)
        common = dict(
            tokenizer=self.tokenizer,
            seq_length=hp.seq_length,
            format_fn=self.formatter,
            completion_only=not conversational and self.formatter.completion_only,
            conversational=conversational,
            assistant_only=hp.assistant_only_loss,
        )
        self.train_set = ConstantLengthDataset(
            train, infinite=hp.streaming, shuffle_buffer=hp.shuffle_buffer, seed=hp.seed, **common
        )
        self.val_set = ConstantLengthDataset(val, **common)
        # Finite mode: one tokenization pass now, so bad rows and too-short data fail here,
        # before any model weights load, and len() is exact for the LR schedule.
        if not hp.streaming:
            len(self.train_set)
        len(self.val_set)

    def train_dataloader(self) -> StatefulDataLoader:
        # Stateful: Lightning checkpoints its position, so a resumed run continues mid-epoch.
        return self._loader(self.train_set, StatefulDataLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, DataLoader)

    def _loader(self, dataset, loader_class) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=pack_collate,
            persistent_workers=False,
        )
