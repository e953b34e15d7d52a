"""What the data modules share: the tokenizer the CLI links in, where their rows come from (a
registered name or files, :mod:`lit_rlhf.data.sources`), the counts they log, and their
picklable collate functions."""

from __future__ import annotations

import functools

import lightning as L

from lit_rlhf.data.sources import DatasetSource, Kind, resolve_dataset


class RowsDataModule(L.LightningDataModule):
    """Base of :class:`~lit_rlhf.data.SFTDataModule`, :class:`~lit_rlhf.data.PreferenceDataModule`
    and :class:`~lit_rlhf.data.PromptDataModule`.

    A subclass sets ``kind`` and saves, as hyper-parameters, the source arguments every one of
    them takes: ``path``, ``val_split``, ``val_size`` and ``seed`` (and ``name``,
    ``data_files``, ``train_split``, ``revision`` for hub datasets and local files).
    """

    kind: Kind

    def require_tokenizer(self):
        """The tokenizer, or the one line saying it is missing."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer (the CLI links it from the model)")
        return self.tokenizer

    def source(self) -> DatasetSource:
        """Where the rows come from: what a registered ``path`` stands for, or ``path`` itself."""
        hp = self.hparams
        return resolve_dataset(hp.path, self.kind, val_split=hp.val_split, seed=hp.seed, val_size=hp.val_size)

    def log_counts(self, counts: dict[str, int]) -> None:
        """The data counts (kept, too long, skipped, ...) as ``data/<name>`` scalars at step 0."""
        if self.trainer is not None and self.trainer.logger is not None:
            self.trainer.logger.log_metrics({f"data/{k}": v for k, v in counts.items()}, step=0)


def collate(fn, pad_id: int):
    """``fn(items, pad_id)`` as a picklable one-argument collate (DataLoader workers)."""
    return functools.partial(fn, pad_id=pad_id)
