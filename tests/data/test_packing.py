"""Tests for lit_rlhf.data.packing (ConstantLengthDataset / pack_collate)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.masking_utils import find_packed_sequence_indices

from lit_rlhf.data.packing import ConstantLengthDataset, pack_collate

EOS, PAD = "<|endoftext|>", "<|pad|>"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing joins documents with an end of text token.",
    "Reward models score completions; PPO optimises them.",
    "Lightning runs the training loop on many devices.",
    "Short one.",
    "Tokenizers split text into pieces, and pieces into ids!",
    "A document may span two chunks of the packed stream.",
    "Position ids restart at zero for every new document.",
]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: EOS=0, PAD=1, words[i] = i + 2 (easy hand-checking)."""
    vocab = {EOS: 0, PAD: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


@pytest.fixture(scope="module")
def letters() -> PreTrainedTokenizerFast:
    return word_tokenizer(list("abcdefghijklmnopqrstuvwxyz"))  # a=2, b=3, ...


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def rows_of(texts: list[str]) -> list[dict]:
    return [{"text": t} for t in texts]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    out: list[int] = []
    for t in texts:
        out += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def concat(chunks: list[dict], key: str = "input_ids") -> list[int]:
    return [t for c in chunks for t in c[key].tolist()]


# ---------------------------------------------------------------------------- finite mode


def test_finite_stream_is_lossless_and_len_exact(bpe):
    texts = SENTENCES * 3
    stream = token_stream(bpe, texts)
    T = 37
    ds = ConstantLengthDataset(rows_of(texts), bpe, seq_length=T, tokenize_batch=5)
    chunks = list(ds)
    n = len(stream) // T
    assert len(chunks) == n == len(ds) and n > 3
    assert all(c[k].shape == (T,) and c[k].dtype == torch.long for c in chunks for k in c)
    # No token lost, duplicated or reordered; only the final partial chunk is dropped.
    assert concat(chunks) == stream[: n * T]
    # EOS sits exactly after each document.
    ends, pos = [], 0
    for t in texts:
        pos += len(bpe(t, add_special_tokens=False)["input_ids"]) + 1
        ends.append(pos - 1)
    got = [i for i, t in enumerate(concat(chunks)) if t == bpe.eos_token_id]
    assert got == [e for e in ends if e < n * T]
    # Iterating twice gives the same thing (len() cache does not disturb iteration).
    assert concat(list(ds)) == concat(chunks)


def test_per_rank_trimming_and_len(bpe):
    texts = SENTENCES * 3
    stream = token_stream(bpe, texts)
    # An odd chunk count, so per-rank trimming applies.
    T = next(t for t in range(20, 60) if (len(stream) // t) % 2 == 1)
    total = len(stream) // T
    per_rank = []
    for rank in range(2):
        ds = ConstantLengthDataset(rows_of(texts), bpe, seq_length=T, rank=rank, world_size=2)
        chunks = list(ds)
        assert len(chunks) == len(ds) == total // 2
        per_rank.append(chunks)
    # Rank r owns global chunks r, r+2, ...; the last (odd) chunk is trimmed away.
    interleaved = [c for pair in zip(*per_rank) for c in pair]
    assert concat(interleaved) == stream[: (total - 1) * T]


# ---------------------------------------------------------------------------- labels / positions


def test_labels_and_position_ids_hand_made(letters):
    # a=2 b=3 c=4 d=5 e=6 f=7 g=8 h=9 i=10 j=11 k=12 l=13, EOS=0.
    texts = ["a b c", "d", "e f g h", "i j k", "l"]
    # stream: [2 3 4 0 | 5 0 | 6 7 8 9 0 | 10 11 12 0 | 13 0]
    # 17 tokens, T=5 -> 3 chunks, the last 2 tokens dropped.
    ds = ConstantLengthDataset(rows_of(texts), letters, seq_length=5)
    got = pack_collate(list(ds))
    expected_ids = torch.tensor([[2, 3, 4, 0, 5], [0, 6, 7, 8, 9], [0, 10, 11, 12, 0]])
    # "d" starts mid-chunk 0 as a single-token piece -> its label is masked; doc 2's EOS continues
    # into chunk 1 as a single-token piece at position 0, followed by a new doc at position 0.
    expected_pos = torch.tensor([[0, 1, 2, 3, 0], [0, 0, 1, 2, 3], [0, 0, 1, 2, 3]])
    expected_labels = torch.tensor([[2, 3, 4, 0, -100], [0, -100, 7, 8, 9], [0, -100, 11, 12, 0]])
    torch.testing.assert_close(got["input_ids"], expected_ids)
    torch.testing.assert_close(got["position_ids"], expected_pos)
    torch.testing.assert_close(got["labels"], expected_labels)
    # Transformers sees exactly these document segments (single-token pieces included).
    segments = find_packed_sequence_indices(got["position_ids"])
    expected_segments = torch.tensor([[0, 0, 0, 0, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(segments, expected_segments)


def test_completion_only_masks_prompt(letters):
    rows = [{"p": "a b", "c": "c d"}, {"p": "e", "c": "f g"}, {"p": "h i j", "c": "k"}]
    ds = ConstantLengthDataset(
        rows, letters, seq_length=6, completion_only=True, format_fn=lambda r: (r["p"], r["c"])
    )
    got = pack_collate(list(ds))
    # stream: [2 3 | 4 5 0] [6 | 7 8 0] [9 10 11 | 12 0] -> 14 tokens, 2 chunks of 6
    expected_ids = torch.tensor([[2, 3, 4, 5, 0, 6], [7, 8, 0, 9, 10, 11]])
    expected_labels = torch.tensor([[-100, -100, 4, 5, 0, -100], [7, 8, 0, -100, -100, -100]])
    expected_pos = torch.tensor([[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2]])
    torch.testing.assert_close(got["input_ids"], expected_ids)
    torch.testing.assert_close(got["labels"], expected_labels)
    torch.testing.assert_close(got["position_ids"], expected_pos)


def test_completion_only_exact_boundary_with_bpe(bpe):
    rows = [{"prompt": s[: len(s) // 2], "completion": s[len(s) // 2 :]} for s in SENTENCES]
    ds = ConstantLengthDataset(
        rows,
        bpe,
        seq_length=16,
        completion_only=True,
        format_fn=lambda r: (r["prompt"], r["completion"]),
    )
    chunks = list(ds)
    ids, labels = concat(chunks), concat(chunks, "labels")
    expected_ids, expected_labels = [], []
    for r in rows:
        p = bpe(r["prompt"], add_special_tokens=False)["input_ids"]
        c = bpe(r["completion"], add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
        expected_ids += p + c
        expected_labels += [-100] * len(p) + c  # completion + EOS keep their labels
    n = len(ids)
    assert ids == expected_ids[:n]
    assert labels == expected_labels[:n]


# ---------------------------------------------------------------------------- sharding


def _collect(ds: ConstantLengthDataset) -> list[tuple[int, ...]]:
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=pack_collate)
    return [tuple(row.tolist()) for batch in loader for row in batch["input_ids"]]


def test_disjoint_shards_two_ranks_two_workers():
    # Every word occurs once, so every chunk is unique by content and maps to its global index.
    words = [f"w{i}" for i in range(230)]
    tok = word_tokenizer(words)
    lengths = itertools.cycle([3, 7, 1, 12, 5])
    texts, i = [], 0
    while i < len(words):
        n = next(lengths)
        texts.append(" ".join(words[i : i + n]))
        i += n
    n_tokens = len(words) + len(texts)
    T = next(t for t in range(7, 20) if (n_tokens // t) % 2 == 1)  # odd count => trimming applies
    full = ConstantLengthDataset(rows_of(texts), tok, seq_length=T)
    reference = [tuple(c["input_ids"].tolist()) for c in full]
    index = {c: g for g, c in enumerate(reference)}
    assert len(index) == len(reference) and len(reference) % 2 == 1  # unique chunks; odd => trimmed

    shards = []
    for rank in range(2):
        ds = ConstantLengthDataset(rows_of(texts), tok, seq_length=T, rank=rank, world_size=2)
        got = _collect(ds)
        assert len(got) == len(ds) == len(reference) // 2
        assert all(c in index for c in got)
        assert all(index[c] % 2 == rank for c in got)  # rank r owns g ≡ r (mod world_size)
        shards.append({index[c] for c in got})
        assert len(shards[-1]) == len(got)  # no duplicates across the rank's workers
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(len(reference) - 1))


# ---------------------------------------------------------------------------- isolation


@pytest.fixture(scope="module")
def tiny_llama(bpe):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(bpe), max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_is_isolated(bpe, tiny_llama, attn):
    model = tiny_llama
    model.set_attn_implementation(attn)
    ds = ConstantLengthDataset(rows_of(SENTENCES), bpe, seq_length=64)
    chunk = next(iter(ds))
    ids, pos = chunk["input_ids"], chunk["position_ids"]
    assert model.config._attn_implementation == attn
    # The second document lies wholly inside the chunk: between the first two EOS tokens.
    eos_at = (ids == bpe.eos_token_id).nonzero().flatten().tolist()
    start, end = eos_at[0] + 1, eos_at[1] + 1
    assert 0 < start and end - start > 3
    doc = ids[start:end]
    with torch.no_grad():
        alone = model(input_ids=doc[None], use_cache=False).logits[0]
        packed = model(
            input_ids=ids[None], position_ids=pos[None], attention_mask=None, use_cache=False
        ).logits[0]
        causal = model(input_ids=ids[None], attention_mask=None, use_cache=False).logits[0]
    torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
    # Control: plain causal attention over the chunk leaks the previous document.
    assert not torch.allclose(causal[start:end], alone, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------- infinite / shuffle


def test_infinite_mode_restarts_and_has_no_len(bpe):
    T = 32
    stream = token_stream(bpe, SENTENCES)
    finite_n = len(stream) // T
    ds = ConstantLengthDataset(rows_of(SENTENCES), bpe, seq_length=T, infinite=True)
    chunks = list(itertools.islice(iter(ds), 3 * finite_n + 1))
    assert len(chunks) > finite_n
    # The token stream just continues into the next pass: nothing dropped between passes.
    assert concat(chunks) == (stream * 5)[: len(chunks) * T]
    with pytest.raises(TypeError):
        len(ds)


def test_shuffle_is_deterministic_and_a_permutation(bpe):
    texts = SENTENCES * 4
    kw = dict(seq_length=12, shuffle_buffer=5)
    unshuffled = ConstantLengthDataset(rows_of(texts), bpe, seq_length=12)
    plain = [tuple(c["input_ids"].tolist()) for c in unshuffled]

    def run(seed=0, epoch=0):
        ds = ConstantLengthDataset(rows_of(texts), bpe, seed=seed, **kw)
        ds.set_epoch(epoch)
        return [tuple(c["input_ids"].tolist()) for c in ds]

    a = run()
    assert a == run()  # deterministic
    assert Counter(a) == Counter(plain)  # same multiset
    assert a != plain  # actually shuffled
    assert run(epoch=1) != a and Counter(run(epoch=1)) == Counter(plain)
    assert run(seed=1) != a
    ds = ConstantLengthDataset(rows_of(texts), bpe, **kw)
    assert len(ds) == len(plain)


# ---------------------------------------------------------------------------- errors


def test_missing_field(letters):
    ds = ConstantLengthDataset([{"text": "a b"}, {"body": "c"}], letters, seq_length=2)
    with pytest.raises(ValueError, match=r"row 1 .*'text'"):
        len(ds)
    ds = ConstantLengthDataset([{"text": "a b"}], letters, seq_length=2, text_field="content")
    with pytest.raises(ValueError, match=r"row 0 .*'content'"):
        list(ds)


@pytest.mark.parametrize("bad", ["", None, 17, ["a"]])
def test_bad_text(letters, bad):
    rows = [{"text": "a b"}, {"text": "c"}, {"text": bad}]
    ds = ConstantLengthDataset(rows, letters, seq_length=2)
    with pytest.raises(ValueError, match=r"row 2: field 'text' must be a non-empty str"):
        list(ds)


def test_bad_completion_only_output(letters):
    kw = dict(seq_length=2, completion_only=True)
    ds = ConstantLengthDataset([{"t": "a"}], letters, format_fn=lambda r: r["t"], **kw)
    with pytest.raises(ValueError, match=r"row 0: .*\(prompt, completion\)"):
        len(ds)
    ds = ConstantLengthDataset([{"t": "a"}], letters, format_fn=lambda r: ("a", ""), **kw)
    with pytest.raises(ValueError, match=r"row 0: completion"):
        len(ds)
    with pytest.raises(ValueError, match="format_fn"):
        ConstantLengthDataset([{"t": "a"}], letters, seq_length=2, completion_only=True)


def test_too_few_tokens(letters):
    ds = ConstantLengthDataset(rows_of(["a b", "c"]), letters, seq_length=64)  # 5 tokens
    with pytest.raises(ValueError, match=r"yields 0 chunks of seq_length=64: only 5 tokens"):
        len(ds)
    with pytest.raises(ValueError, match=r"seq_length=64: only 5 tokens"):
        list(ds)
    with pytest.raises(ValueError, match=r"seq_length=64: only 5 tokens"):
        rows = rows_of(["a b", "c"])
        list(ConstantLengthDataset(rows, letters, seq_length=64, rank=1, world_size=2))


@pytest.mark.parametrize("seq_length", [1, 0, -3])
def test_bad_seq_length(letters, seq_length):
    with pytest.raises(ValueError, match=rf"seq_length={seq_length}"):
        ConstantLengthDataset(rows_of(["a"]), letters, seq_length=seq_length)


def test_tokenizer_without_eos(letters):
    class NoEos:
        eos_token_id = None
        name_or_path = "my-eosless-tok"

    with pytest.raises(ValueError, match="my-eosless-tok"):
        ConstantLengthDataset(rows_of(["a"]), NoEos(), seq_length=4)


def test_bad_rank_and_one_shot_iterator(letters):
    with pytest.raises(ValueError, match=r"rank=2, world_size=2"):
        ConstantLengthDataset(rows_of(["a"]), letters, seq_length=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="re-iterable"):
        ConstantLengthDataset(iter(rows_of(["a"])), letters, seq_length=2)


def test_hf_datasets_rows(letters):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"text": ["a b c", "d", "e f g h", "i j k", "l"]})
    ds = ConstantLengthDataset(rows, letters, seq_length=5)
    assert len(ds) == 3
    assert pack_collate(list(ds))["input_ids"][0].tolist() == [2, 3, 4, 0, 5]
