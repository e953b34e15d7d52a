"""The offline demo task: review generator, lexicon judge, tokenizer and cached preparation."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lit_rlhf.demo import (
    TINY_LLAMA,
    DemoJudge,
    DemoPaths,
    build_tokenizer,
    demo_cache_root,
    generate_reviews,
    make_prompts,
    prepare_demo,
    read_jsonl,
    sentiment_score,
)
from lit_rlhf.demo.corpus import make_title
from lit_rlhf.demo.lexicon import LEXICON

SMALL = dict(n_train=600, n_val=40)  # prepare_demo size for the tests: well under a second


@pytest.fixture(scope="module")
def reviews() -> list[dict]:
    return generate_reviews(20000, seed=0)


def _sentences(text: str) -> list[str]:
    # "?" is left out: "The plot? Dull." is one template sentence.
    return re.split(r"(?<=[.!])\s+", text)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


# --------------------------------------------------------------------------------------------
# Generator


def test_generation_is_deterministic_and_seeded():
    a, b = generate_reviews(200, seed=3), generate_reviews(200, seed=3)
    assert a == b
    other = generate_reviews(200, seed=4)
    assert sum(x["text"] == y["text"] for x, y in zip(a, other)) == 0
    assert generate_reviews(50, seed=3) == a[:50]  # one stream: shorter runs are prefixes
    for row in a:
        assert set(row) == {"text", "sentiment"}
        assert isinstance(row["text"], str) and row["text"]
        assert isinstance(row["sentiment"], float) and -1.0 <= row["sentiment"] <= 1.0


def test_generation_is_identical_across_processes():
    """No dependence on hash randomisation: other interpreters produce the same bytes."""
    code = (
        "import hashlib, json; from lit_rlhf.demo.corpus import generate_reviews; "
        "print(hashlib.sha256(json.dumps(generate_reviews(300, seed=7)).encode()).hexdigest())"
    )
    here = hashlib.sha256(json.dumps(generate_reviews(300, seed=7)).encode()).hexdigest()
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == here


def test_reviews_have_two_to_six_sentences(reviews):
    counts = Counter(len(_sentences(r["text"])) for r in reviews[:2000])
    assert set(counts) <= set(range(2, 7))
    assert len(counts) == 5  # every length occurs


def test_vocabulary_and_sentence_shapes_are_varied(reviews):
    # The vocabulary is kept small on purpose (a small model must learn it within the demo's
    # budget; 340 words in format 4), but sentence shapes stay many.
    vocabulary = Counter(w for r in reviews for w in _words(r["text"]))
    assert len(vocabulary) > 300
    # Structural signature of a sentence: its function words and punctuation, with every run
    # of content words (names, titles, adjectives, ...) collapsed to "_".
    function_words = set(
        "the a an is was are were i it and but while of to in as with by for from on who how "
        "what that every both despite if would not never yet although even there".split()
    )
    shapes: Counter[str] = Counter()
    for r in reviews:
        for sentence in _sentences(r["text"]):
            sig: list[str] = []
            for tok in re.findall(r"[a-z]+(?:'[a-z]+)?|[,;:?]", sentence.lower()):
                tok = tok if tok in function_words or not tok[0].isalpha() else "_"
                if not (tok == "_" and sig and sig[-1] == "_"):
                    sig.append(tok)
            shapes[" ".join(sig)] += 1
    assert len(shapes) > 40
    assert shapes.most_common(1)[0][1] < 0.1 * sum(shapes.values())  # no dominant template
    openings = Counter(
        " ".join(s.split()[:3]).lower() for r in reviews for s in _sentences(r["text"])
    )
    assert len(openings) > 40


def test_sentiment_drives_the_words(reviews):
    """Positive reviews use positive lexicon words, negative ones negative; some are mixed."""
    def polarity_counts(text):
        values = [LEXICON[w] for w in _words(text) if w in LEXICON]
        return sum(v > 0 for v in values), sum(v < 0 for v in values)

    rows = reviews[:2000]
    very_pos = [polarity_counts(r["text"]) for r in rows if r["sentiment"] > 0.7]
    very_neg = [polarity_counts(r["text"]) for r in rows if r["sentiment"] < -0.7]
    assert sum(p for p, _ in very_pos) > 5 * sum(n for _, n in very_pos)
    assert sum(n for _, n in very_neg) > 5 * sum(p for p, _ in very_neg)
    mixed = sum(p > 0 and n > 0 for p, n in map(polarity_counts, (r["text"] for r in rows)))
    assert mixed > 0.1 * len(rows)  # "the acting was superb but the plot dragged"


def test_neutral_material_carries_no_sentiment():
    import random

    rng = random.Random(0)
    titles = [make_title(rng) for _ in range(1000)]
    assert len(set(titles)) > 200
    assert all(sentiment_score(t) == 0.0 for t in titles)


def test_make_prompts():
    texts = [r["text"] for r in generate_reviews(300, seed=1)]
    prompts = make_prompts(texts, min_words=2, max_words=6, seed=0)
    assert prompts == make_prompts(texts, min_words=2, max_words=6, seed=0)
    assert len(prompts) == len(texts)
    lengths = Counter()
    for prompt, text in zip(prompts, texts):
        words = prompt.split()
        assert 2 <= len(words) <= 6
        assert text.split()[: len(words)] == words
        lengths[len(words)] += 1
    assert set(lengths) == {2, 3, 4, 5, 6}
    assert make_prompts(["just two"], min_words=4, max_words=4) == ["just two"]
    with pytest.raises(ValueError):
        make_prompts(texts, min_words=5, max_words=3)


# --------------------------------------------------------------------------------------------
# Judge


def _ranks(values: list[float]) -> list[float]:
    """Ranks with ties averaged (for Spearman)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_judge_agrees_with_latent_sentiment(reviews):
    rows = reviews[:2000]
    latent = [r["sentiment"] for r in rows]
    scores = [sentiment_score(r["text"]) for r in rows]
    assert _pearson(latent, scores) > 0.8
    assert _pearson(_ranks(latent), _ranks(scores)) > 0.8  # Spearman
    polar = [(s, j) for s, j in zip(latent, scores) if abs(s) > 0.3]
    agree = sum((s > 0) == (j > 0) and j != 0 for s, j in polar)
    assert agree > 0.9 * len(polar)
    # Normalised: typical reviews land in [-1, 1].
    assert sum(-1 <= j <= 1 for j in scores) > 0.98 * len(scores)


def test_judge_hand_cases():
    assert sentiment_score("a wonderful, moving film") > 0
    assert sentiment_score("not good at all") < 0
    assert sentiment_score("the film was terrible") < 0
    assert sentiment_score("") == 0.0
    assert sentiment_score("123 ... !!") == 0.0
    assert sentiment_score("a film about a lighthouse keeper") == 0.0
    # Intensifiers and downtoners scale; negation flips ("isn't" counts) and weakens.
    good = sentiment_score("good")
    assert sentiment_score("very good") > good > sentiment_score("somewhat good") > 0
    assert sentiment_score("it isn't good") < 0 < sentiment_score("it was not terrible")
    assert sentiment_score("never boring") > 0
    # Negation does not reach across clause punctuation.
    assert sentiment_score("not the plot. great acting") > 0
    # Stacked intensifiers cannot run away.
    assert sentiment_score("very " * 50 + "good") <= 2 * sentiment_score("good")


def test_demo_judge_returns_float_tensor():
    texts = ["a superb film", "a dull film", "", "not bad"]
    scores = DemoJudge()(texts)
    assert isinstance(scores, torch.Tensor)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert torch.allclose(scores, torch.tensor([sentiment_score(t) for t in texts]))
    assert scores[0] > 0 > scores[1] and scores[2] == 0
    assert DemoJudge()([]).shape == (0,)
    with pytest.raises(TypeError):
        DemoJudge()("a single string")


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_through_save_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = [r["text"] for r in generate_reviews(1500, seed=0)]
    tok = build_tokenizer(texts, vocab_size=1024)
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))

    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for t in (tok, loaded):
        assert t.eos_token_id is not None and t.pad_token_id is not None
        assert t.eos_token_id != t.pad_token_id
        assert t.bos_token_id == t.eos_token_id
        assert t.model_max_length == 1024
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert len(loaded) == len(tok) <= 1024

    specials = {tok.eos_token_id, tok.pad_token_id}
    samples = texts[:100] + [" leading space", "Ünïcödé, emoji 🎬", "tabs\tand\nnewlines  ", ""]
    for text in samples:
        ids = tok(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids == tok.encode(text)
        assert not specials & set(ids)  # nothing added automatically
        assert loaded.decode(ids) == text
    assert tok("")["input_ids"] == []
    # A known word is one token (the BPE learned the corpus), and EOS encodes as one id.
    assert len(tok.tokenize(" film")) == 1
    assert loaded("<|endoftext|>")["input_ids"] == [tok.eos_token_id]


def test_tiny_llama_config():
    from transformers import LlamaConfig

    assert "vocab_size" not in TINY_LLAMA and "model_type" not in TINY_LLAMA
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=2048, **ids)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2
    assert config.tie_word_embeddings is False


# --------------------------------------------------------------------------------------------
# prepare_demo


def _check_complete(paths: DemoPaths, n_train: int, n_val: int) -> None:
    from transformers import AutoTokenizer

    assert json.loads((paths.root / "DONE").read_text())["n_train"] == n_train
    train, val = read_jsonl(paths.train_file), read_jsonl(paths.val_file)
    assert len(train) == n_train and len(val) == n_val
    assert all(set(r) == {"text", "sentiment"} for r in train + val)
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer_dir))
    assert tok.decode(tok(val[0]["text"])["input_ids"]) == val[0]["text"]
    leftovers = [p.name for p in paths.root.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary or stale directories left behind


def test_demo_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_RLHF_CACHE", str(tmp_path))
    assert demo_cache_root() == tmp_path / "demo-v1"
    monkeypatch.delenv("LIT_RLHF_CACHE")
    assert demo_cache_root() == Path.home() / ".cache" / "lit_rlhf" / "demo-v1"


def test_prepare_demo_builds_once_and_caches(tmp_path):
    root = tmp_path / "demo"
    paths = prepare_demo(root, **SMALL)
    assert paths == DemoPaths.under(root.resolve())
    assert paths.train_file.is_file() and paths.val_file.is_file() and paths.tokenizer_dir.is_dir()
    assert paths.pairs_train_file.is_file() and paths.pairs_val_file.is_file()
    _check_complete(paths, **SMALL)

    train = read_jsonl(paths.train_file)
    val = read_jsonl(paths.val_file)
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert train == generate_reviews(SMALL["n_train"], seed=0)

    stamps = {p: p.stat().st_mtime_ns for p in (paths.train_file, paths.val_file, root / "DONE")}
    assert prepare_demo(root, **SMALL) == paths
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # cache hit: nothing rewritten

    # Other parameters: the old build is replaced by a complete new one.
    prepare_demo(root, n_train=300, n_val=20)
    _check_complete(paths, n_train=300, n_val=20)


def test_prepare_demo_refuses_foreign_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare_demo(root, **SMALL)
    assert (root / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_losing_the_publish_race_keeps_the_winner(tmp_path):
    """Two finished builds for the same root: the second rename finds the first and backs off."""
    from lit_rlhf.demo import FORMAT_VERSION, VOCAB_SIZE, _build, _publish

    root = tmp_path / "demo"
    params = dict(version=FORMAT_VERSION, n_train=50, n_val=5, seed=0, vocab_size=VOCAB_SIZE)
    first, second = tmp_path / ".first", tmp_path / ".second"
    for d in (first, second):
        d.mkdir()
        _build(d, params)
    (first / "marker").write_text("first")
    _publish(first, root, params)
    _publish(second, root, params)
    assert (root / "marker").read_text() == "first"
    assert second.is_dir()  # left for prepare_demo's cleanup; the published root is untouched
    assert prepare_demo(root, n_train=50, n_val=5) == DemoPaths.under(root.resolve())
    assert (root / "marker").exists()  # the matching build was reused


def test_prepare_demo_concurrent_processes(tmp_path):
    root = tmp_path / "shared"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=prepare_demo, args=(str(root),), kwargs=SMALL) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_complete(DemoPaths.under(root.resolve()), **SMALL)


def test_pairs_are_labelled_by_the_judge():
    from lit_rlhf.demo import make_pairs

    rows = generate_reviews(400, seed=3)
    pairs = make_pairs(rows, seed=0)
    assert 100 < len(pairs) <= 200  # 200 candidate pairs, near-ties left out
    assert all(sentiment_score(p["chosen"]) >= sentiment_score(p["rejected"]) + 0.1 for p in pairs)
    texts = [r["text"] for r in rows]
    # Each side is the first 6-40 words of one review.
    for side in ("chosen", "rejected"):
        assert all(6 <= len(p[side].split()) <= 40 and any(t.startswith(p[side]) for t in texts) for p in pairs)


def test_a_cached_demo_model_is_rebuilt_when_its_recipe_changes(tmp_path, monkeypatch):
    # The training run and the export are faked: what is checked is when they happen.
    from lit_rlhf.demo import models

    configs = tmp_path / "configs" / "sft"
    configs.mkdir(parents=True)
    (configs / "base.yaml").write_text("trainer: {max_steps: 1}\n")
    (configs / "arithmetic.yaml").write_text("config: base.yaml\nmodel: {}\n")
    monkeypatch.setattr("lit_rlhf.recipes.RECIPES", tmp_path / "configs")  # the shipped recipes
    monkeypatch.setenv("LIT_RLHF_CACHE", str(tmp_path / "cache"))
    builds = []
    # Asked from inside a rank of a multi-process run (a reward model resolved after launch): the
    # build must not believe it is that rank.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "12910")

    def fake_run(cmd, cwd, check, env):
        assert "LOCAL_RANK" not in env and "MASTER_PORT" not in env and env["LIT_RLHF_CACHE"]
        root = Path(cmd[-1].split("=", 1)[1])
        (root / "lightning_logs" / "version_0").mkdir(parents=True)
        builds.append(cmd)

    def fake_export(run_dir, target):
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / "config.json").write_text("{}")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    monkeypatch.setattr("lit_rlhf.export.export_run", fake_export)
    target = models.ensure_demo_model("arithmetic-sft")
    assert len(builds) == 1 and (target / models.STAMP_FILE).is_file()
    models.ensure_demo_model("arithmetic-sft")
    assert len(builds) == 1  # same recipe: the cached model
    (configs / "base.yaml").write_text("trainer: {max_steps: 2}\n")  # a base the recipe builds on
    models.ensure_demo_model("arithmetic-sft")
    assert len(builds) == 2
    (target / models.STAMP_FILE).unlink()  # e.g. a build interrupted after the export
    models.ensure_demo_model("arithmetic-sft")
    assert len(builds) == 3
