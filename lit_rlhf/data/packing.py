"""Sequence packing for SFT: :class:`ConstantLengthDataset`.

Format
------
Every document (one dataset row) becomes ``[bos] + tokens(text) + [eos]``; in completion-only
mode ``[bos] + tokens(prompt) + tokens(completion) + [eos]`` (prompt and completion are
tokenized separately so the boundary is exact). Tokenization uses ``add_special_tokens=False``;
``[bos]`` is there only for tokenizers that add BOS to a text themselves (Llama, Gemma), and
counts as prompt in completion-only mode. A conversational document (``conversational=True``:
``format_fn`` returns a list of messages) is the conversation rendered by the tokenizer's chat
template, which writes its own special tokens (nothing is added); with ``assistant_only`` only
its assistant turns are trained on (:mod:`lit_rlhf.data.chat`). All
documents are concatenated in row order into one global token stream, which is cut into
consecutive chunks of ``seq_length`` tokens; a document may span two chunks and only the
final partial chunk is dropped. No padding is ever produced.

Each chunk is a dict of three ``LongTensor``\\ s of shape ``(seq_length,)``:

``input_ids``
    the tokens.
``position_ids``
    restart at 0 at the start of every document, and also at position 0 of the chunk for a
    document piece continued from the previous chunk. A new document starts wherever
    ``position_ids`` does not increase by exactly 1; because every document starts at 0 and
    the previous token's position is >= 0, consecutive documents are always told apart.
    :class:`~lit_rlhf.modules.SFTModule` turns them into an explicit block-diagonal mask
    (:func:`~lit_rlhf.models.attention.packed_causal_mask`), so documents never attend to
    each other on any architecture; transformers' own detection of packing from position ids
    (used when ``attention_mask=None``) works only where a model's code passes them to its
    mask builder, which OPT's and BLOOM's do not.
``labels``
    ``input_ids`` with ``-100`` at (a) prompt tokens in completion-only mode and (b) the first
    token of every document that starts inside the chunk after position 0: under document
    isolation it would be predicted from the previous document's EOS, which is noise (same
    convention as HF's ``DataCollatorWithFlattening``). The EOS closing a document keeps its
    label so the model learns to stop. Labels are *unshifted* (HF models shift internally).

So: feed ``input_ids``, ``position_ids`` and ``labels`` to the model with the block mask
(or, on Llama-style models that detect packing themselves, with no ``attention_mask``).

Sharding
--------
With ``world_size`` ranks and ``num_workers`` DataLoader workers there are
``S = world_size * num_workers`` shards; the shard of (rank, worker) is
``k = worker_id * world_size + rank`` and yields exactly the global chunks whose index
``g ≡ k (mod S)``. Hence rank ``r`` owns ``g ≡ r (mod world_size)`` regardless of its worker
count. Every shard tokenizes the full row stream (needed to know the chunk boundaries) but
only materializes its own chunks. In finite mode the stream is trimmed to
``(total_chunks // world_size) * world_size`` chunks so every rank yields the same number of
batches (DDP lockstep), and ``len(dataset)`` is exactly that per-rank count. ``rows`` must be
re-iterable and iterate in the same order in every process.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lit_rlhf.data.chat import assistant_spans, check_messages, template_of, tokens_with_mask
from lit_rlhf.data.formats import rank_and_world

__all__ = ["ConstantLengthDataset", "pack_collate"]

IGNORE_INDEX = -100

FormatFn = Callable[[dict], "str | tuple[str, str]"]


class ConstantLengthDataset(IterableDataset):
    """Tokenize rows, join documents with EOS and yield fixed-length packed chunks.

    Args:
        rows: a ``Sequence`` or re-iterable ``Iterable`` of dict rows (list of dicts,
            ``datasets.Dataset`` / ``datasets.IterableDataset``). A one-shot iterator is
            rejected because the rows are read once to count chunks and again to yield them.
        tokenizer: a Hugging Face (fast) tokenizer with an ``eos_token_id``.
        seq_length: tokens per chunk ``T`` (>= 2).
        format_fn: ``row -> text``, or ``row -> (prompt, completion)`` when
            ``completion_only``. Default: ``row[text_field]``.
        text_field: the row field used when ``format_fn`` is None.
        completion_only: prompt tokens get label -100 (requires ``format_fn``).
        infinite: restart the row stream when exhausted (the token stream simply continues,
            so nothing is dropped); ``len()`` then raises ``TypeError``.
        shuffle_buffer: if > 0, shuffle *chunks* through a buffer of this size using
            ``random.Random(seed + epoch)``.
        seed: base seed of the shuffle RNG.
        tokenize_batch: rows per tokenizer call.
        rank, world_size: data-parallel position; default from ``torch.distributed`` if it is
            initialised (read lazily, at iteration / ``len`` time), else 0 / 1.
        conversational: ``format_fn`` (or ``row[text_field]``) gives messages, rendered by the
            tokenizer's chat template.
        assistant_only: conversational documents are trained on their assistant turns only.

    Yields:
        ``{"input_ids", "labels", "position_ids"}``, each a ``LongTensor`` of shape ``(T,)``.
    """

    def __init__(
        self,
        rows: Sequence[dict] | Iterable[dict],
        tokenizer: Any,
        seq_length: int,
        format_fn: FormatFn | None = None,
        text_field: str = "text",
        completion_only: bool = False,
        infinite: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        tokenize_batch: int = 256,
        rank: int | None = None,
        world_size: int | None = None,
        conversational: bool = False,
        assistant_only: bool = True,
    ) -> None:
        super().__init__()
        if getattr(tokenizer, "eos_token_id", None) is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"tokenizer {name!r} ({type(tokenizer).__name__}) has no eos_token_id; "
                "packing needs one to separate documents"
            )
        if not isinstance(seq_length, int) or seq_length < 2:
            raise ValueError(f"seq_length must be an int >= 2, got seq_length={seq_length!r}")
        if completion_only and format_fn is None:
            raise ValueError(
                "completion_only=True needs format_fn returning (prompt, completion); "
                "got format_fn=None"
            )
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got shuffle_buffer={shuffle_buffer}")
        if tokenize_batch < 1:
            raise ValueError(f"tokenize_batch must be >= 1, got tokenize_batch={tokenize_batch}")
        if iter(rows) is rows:  # type: ignore[arg-type]
            raise ValueError(
                "rows must be re-iterable (a Sequence or Iterable), "
                f"got a one-shot iterator of type {type(rows).__name__}"
            )
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size must be >= 1, got world_size={world_size}")
        if rank is not None and (rank < 0 or (world_size is not None and rank >= world_size)):
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )

        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_token_id = int(tokenizer.eos_token_id)
        # Tokenizers that open every text with BOS (Llama, Gemma) open every document with it
        # too, as the model saw in pre-training and will see in PPO/RM prompts.
        self.bos = [int(tokenizer.bos_token_id)] if adds_bos(tokenizer) else []
        self.seq_length = seq_length
        self.format_fn = format_fn
        self.text_field = text_field
        self.completion_only = completion_only
        self.conversational = conversational
        self.assistant_only = assistant_only
        self.template = template_of(tokenizer) if conversational else None
        self.infinite = infinite
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        # Resume: chunks of this epoch already yielded (state_dict) / still to skip.
        self._yielded = 0
        self._skip = 0
        self.tokenize_batch = tokenize_batch
        self._rank = rank
        self._world_size = world_size
        # Global chunk count of one pass (rank-independent); filled by the first counting pass.
        self._total_chunks: int | None = None

    # ------------------------------------------------------------------ public API

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle buffer with ``seed + epoch``.

        Takes effect in DataLoader workers only when they are (re)created after the call,
        i.e. not with ``persistent_workers=True``. A new epoch starts from its first chunk.
        """
        self.epoch, self._skip = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: ``{"epoch", "chunks"}`` (chunks yielded this epoch).

        torchdata's ``StatefulDataLoader`` stores it in Lightning checkpoints (per worker), so
        a resumed run continues with the very next chunk instead of restarting the epoch.
        Under DDP the checkpoint holds rank 0's state; every rank has yielded the same number
        of chunks (ranks stay in lockstep), so it is right for all of them.
        """
        return {"epoch": self.epoch, "chunks": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue an epoch: the next ``iter()`` skips the ``state["chunks"]`` already seen."""
        self.epoch, self._skip = int(state["epoch"]), int(state["chunks"])

    def __len__(self) -> int:
        """Exact number of chunks this rank yields in one pass (summed over its workers)."""
        if self.infinite:
            raise TypeError("ConstantLengthDataset(infinite=True) has no length")
        _, world_size = self._rank_world()
        return self._count_total_chunks() // world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world_size = self._rank_world()
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        num_shards = world_size * num_workers
        shard = worker_id * world_size + rank  # shard % world_size == rank

        limit = None  # number of global chunks to consider (finite mode)
        if not self.infinite and (world_size > 1 or self._total_chunks is not None):
            # Trim the tail so all ranks yield the same count.
            limit = (self._count_total_chunks() // world_size) * world_size

        chunks = self._shard_chunks(shard, num_shards, limit)
        if self.shuffle_buffer > 0:
            rng = random.Random(self.seed + self.epoch)
            chunks = _buffer_shuffle(chunks, self.shuffle_buffer, rng)
        skip, self._skip = self._skip, 0
        self._yielded = skip
        return self._counted(chunks, skip)

    def _counted(self, chunks: Iterator[dict], skip: int) -> Iterator[dict]:
        # The stream is a pure function of (rows, seed, epoch, shard): re-create it and drop
        # the chunks already trained on. Costs a re-tokenization of them, not a model pass.
        for i, chunk in enumerate(chunks):
            if i >= skip:
                self._yielded = i + 1
                yield chunk

    # ------------------------------------------------------------------ internals

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world_size): explicit args win, else torch.distributed, else (0, 1)."""
        rank, world_size = rank_and_world()
        rank = rank if self._rank is None else self._rank
        world_size = world_size if self._world_size is None else self._world_size
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        return rank, world_size

    def _count_total_chunks(self) -> int:
        """Global number of full chunks in one pass; one tokenization pass, cached."""
        if self._total_chunks is None:
            n_tokens = sum(len(ids) for ids, _ in self._documents())
            self._check_nonempty(n_tokens)
            self._total_chunks = n_tokens // self.seq_length
        return self._total_chunks

    def _check_nonempty(self, n_tokens: int) -> None:
        if n_tokens < self.seq_length:
            raise ValueError(
                f"ConstantLengthDataset yields 0 chunks of seq_length={self.seq_length}: "
                f"only {n_tokens} tokens in the whole dataset; lower seq_length or add data"
            )

    def _format(self, index: int, row: dict) -> tuple[str, str] | list[dict]:
        """Row -> (prompt, text), prompt '' unless completion_only; or, conversational, the
        checked messages. Validates types."""
        if self.conversational:
            messages = self.format_fn(row) if self.format_fn is not None else row[self.text_field]
            return check_messages(messages, f"row {index}", need_assistant=self.assistant_only)
        if self.format_fn is None:
            if not isinstance(row, dict) and not hasattr(row, "keys"):
                raise ValueError(
                    f"row {index} is a {type(row).__name__}, "
                    f"expected a dict with field {self.text_field!r}"
                )
            if self.text_field not in row:
                raise ValueError(
                    f"row {index} has no field {self.text_field!r} (fields: {sorted(row.keys())})"
                )
            out: Any = row[self.text_field]
        else:
            out = self.format_fn(row)

        if self.completion_only:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(
                    f"row {index}: completion_only format_fn must return (prompt, completion), "
                    f"got {type(out).__name__}"
                )
            prompt, completion = out
            if not isinstance(prompt, str):
                raise ValueError(
                    f"row {index}: prompt must be a str, got {type(prompt).__name__}"
                )
            if not isinstance(completion, str) or not completion:
                raise ValueError(
                    f"row {index}: completion must be a non-empty str, got {completion!r:.60}"
                )
            return prompt, completion
        if not isinstance(out, str) or not out:
            where = f"field {self.text_field!r}" if self.format_fn is None else "format_fn output"
            raise ValueError(f"row {index}: {where} must be a non-empty str, got {out!r:.60}")
        return "", out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: long documents are fine here (they get cut into chunks), so silence
        # the "longer than model_max_length" warning.
        out = self.tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        return out["input_ids"]

    def _documents(self) -> Iterator[tuple[list[int], list[bool]]]:
        """One pass over the rows -> (token ids, which of them are trained on)."""
        batch: list = []
        for index, row in enumerate(self.rows):
            batch.append(self._format(index, row))
            if len(batch) == self.tokenize_batch:
                yield from self._tokenize_batch(batch)
                batch = []
        if batch:
            yield from self._tokenize_batch(batch)

    def _tokenize_batch(self, batch: list) -> Iterator[tuple[list[int], list[bool]]]:
        if self.conversational:
            # The template writes the special tokens (BOS, end-of-turn); nothing is added.
            for index, messages in enumerate(batch):
                text, spans = assistant_spans(self.tokenizer, messages, self.template, f"row {index}")
                ids, trained = tokens_with_mask(self.tokenizer, text, spans)
                yield ids, trained if self.assistant_only else [True] * len(ids)
            return
        texts = self._tokenize([text for _, text in batch])
        if self.completion_only:
            prompts = self._tokenize([prompt for prompt, _ in batch])
        else:
            prompts = [[] for _ in batch]
        for prompt_ids, text_ids in zip(prompts, texts):
            n_prompt = len(self.bos) + len(prompt_ids)
            ids = self.bos + prompt_ids + text_ids + [self.eos_token_id]
            yield ids, [False] * n_prompt + [True] * (len(ids) - n_prompt)

    def _token_stream(self) -> Iterator[tuple[list[int], list[bool]]]:
        """Documents of one pass, or endlessly repeated passes in infinite mode."""
        while True:
            n_tokens = 0
            for doc in self._documents():
                n_tokens += len(doc[0])
                yield doc
            if not self.infinite:
                return
            if n_tokens == 0:
                raise ValueError("ConstantLengthDataset(infinite=True): rows yielded no documents")

    def _shard_chunks(
        self, shard: int, num_shards: int, limit: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Cut the global token stream into chunks and yield this shard's ones.

        Yields global chunks ``g`` with ``g % num_shards == shard`` (and ``g < limit`` if a
        limit is given), each as ``{key: LongTensor(seq_length)}``.
        """
        T = self.seq_length
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        filled = 0  # tokens in the current chunk (tracked even when the chunk is not ours)
        g = 0  # global index of the current chunk
        n_tokens = 0
        if limit == 0:  # more ranks than chunks: every rank yields nothing, consistently
            return
        for doc, trained in self._token_stream():
            n_tokens += len(doc)
            doc_labels = [t if keep else IGNORE_INDEX for t, keep in zip(doc, trained)]
            start = 0
            while start < len(doc):
                take = min(T - filled, len(doc) - start)
                if g % num_shards == shard:  # only materialize our own chunks
                    piece_labels = doc_labels[start : start + take]
                    if filled > 0 and start == 0:
                        # A document starting mid-chunk: its first token would be predicted
                        # from the previous (invisible) document -> noise.
                        piece_labels[0] = IGNORE_INDEX
                    ids += doc[start : start + take]
                    labels += piece_labels
                    positions += range(take)  # restarts per doc and per continued piece
                filled += take
                start += take
                if filled == T:
                    if g % num_shards == shard:
                        yield {
                            "input_ids": torch.tensor(ids, dtype=torch.long),
                            "labels": torch.tensor(labels, dtype=torch.long),
                            "position_ids": torch.tensor(positions, dtype=torch.long),
                        }
                        ids, labels, positions = [], [], []
                    filled = 0
                    g += 1
                    if limit is not None and g >= limit:
                        return
        # Finite pass finished without a known limit (world_size 1): validate and cache the count.
        self._check_nonempty(n_tokens)
        if self._total_chunks is None:
            self._total_chunks = g


def adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` puts a BOS token in front of the text's own tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def pack_collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed chunks: list of ``{key: (T,)}`` -> ``{key: (B, T)}``.

    No ``attention_mask`` is produced on purpose: the model must get ``attention_mask=None``
    so that transformers derives block-diagonal attention from ``position_ids``.
    """
    if not batch:
        raise ValueError("pack_collate got an empty batch")
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}
