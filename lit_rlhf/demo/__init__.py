"""The offline demo task: "generate positive movie reviews" without downloading anything.

It mirrors the classic IMDB + sentiment-classifier RLHF experiment:

* :func:`generate_reviews` writes plain-English movie reviews of mixed sentiment (the IMDB
  stand-in) and :func:`make_prompts` cuts their first few words into PPO prompts;
* :func:`sentiment_score` / :class:`DemoJudge` is a transparent lexicon-based judge (the
  sentiment-classifier stand-in), used as gold labeller and, as :class:`JudgeReward`, reward;
* :func:`build_tokenizer` trains a small byte-level BPE on the reviews;
* :func:`prepare_demo` builds the train/val files and tokenizer once, atomically, into a
  cache directory, and :data:`TINY_LLAMA` is the matching tiny model architecture.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from .corpus import generate_reviews, make_prompts
from .judge import DemoJudge, sentiment_score
from .rewards import JudgeReward
from .tokenizer import build_tokenizer

__all__ = [
    "TINY_LLAMA",
    "DemoJudge",
    "DemoPaths",
    "JudgeReward",
    "build_tokenizer",
    "demo_cache_root",
    "generate_reviews",
    "make_pairs",
    "make_prompts",
    "prepare_demo",
    "read_jsonl",
    "sentiment_score",
]

# Bump when the generator, judge or tokenizer change what prepare_demo writes, so that old
# caches are rebuilt rather than silently reused.
FORMAT_VERSION = 4
VOCAB_SIZE = 2048

# kwargs for transformers.LlamaConfig; vocab_size and the bos/eos/pad ids come from the tokenizer.
TINY_LLAMA: dict = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    train_file: Path  # jsonl rows {"text", "sentiment"}
    val_file: Path  # jsonl
    tokenizer_dir: Path  # HF format, AutoTokenizer-loadable
    pairs_train_file: Path  # jsonl rows {"chosen", "rejected"}: preference pairs for the RM
    pairs_val_file: Path  # jsonl

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        return cls(root, root / "train.jsonl", root / "val.jsonl", root / "tokenizer",
                   root / "pairs_train.jsonl", root / "pairs_val.jsonl")


def cache_root(folder: str) -> Path:
    """``$LIT_RLHF_CACHE/<folder>``, or ``~/.cache/lit_rlhf/<folder>``: where a demo task is built."""
    base = os.environ.get("LIT_RLHF_CACHE") or Path.home() / ".cache" / "lit_rlhf"
    return Path(base).expanduser() / folder


def demo_cache_root() -> Path:
    """``$LIT_RLHF_CACHE/demo-v1``, or ``~/.cache/lit_rlhf/demo-v1``."""
    return cache_root("demo-v1")


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as a jsonl file (its folder made if needed): the task builders' splits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a jsonl file (as written by :func:`prepare_demo`)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_done(root: Path) -> dict | None:
    try:
        return json.loads((root / "DONE").read_text())
    except (OSError, ValueError):
        return None


# Pairs whose judge scores differ by less than this are too close to call: a human labeller
# would flip a coin on them, so they are left out rather than labelled at random.
MIN_PAIR_GAP = 0.1


def make_pairs(rows: list[dict], seed: int = 0, min_words: int = 6, max_words: int = 40) -> list[dict]:
    """Preference pairs labelled by the demo judge (simulated human feedback).

    Reviews are shuffled and paired off, each cut to its first 6-40 words (PPO scores
    short continuations of prompts, so the reward model learns on texts of that length);
    the more positive one under :func:`sentiment_score` is ``chosen``. Returns rows
    ``{"chosen", "rejected"}`` (the implicit schema).
    """
    import random

    rng = random.Random(seed)
    texts = [row["text"] for row in rows]
    rng.shuffle(texts)
    texts = [" ".join(t.split()[: rng.randint(min_words, max_words)]) for t in texts]
    pairs = []
    for a, b in zip(texts[0::2], texts[1::2]):
        sa, sb = sentiment_score(a), sentiment_score(b)
        if abs(sa - sb) < MIN_PAIR_GAP:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        pairs.append({"chosen": chosen, "rejected": rejected})
    return pairs


def _build(target: Path, params: dict) -> None:
    """Write the whole demo into ``target`` (an empty directory); DONE goes last."""
    n_train, n_val, seed = params["n_train"], params["n_val"], params["seed"]
    # Train and val come from different seeds (2*seed and 2*seed+1: distinct for every seed),
    # and val drops any text that happens to occur in train, topping up from the same stream.
    train = generate_reviews(n_train, seed=2 * seed)
    seen = {row["text"] for row in train}
    val: list[dict] = []
    extra = 0
    while len(val) < n_val:
        extra += max(16, n_val // 10)
        candidates = generate_reviews(n_val + extra, seed=2 * seed + 1)
        val = [row for row in candidates if row["text"] not in seen]
    val = val[:n_val]
    paths = DemoPaths.under(target)
    _write_jsonl(paths.train_file, train)
    _write_jsonl(paths.val_file, val)
    _write_jsonl(paths.pairs_train_file, make_pairs(train, seed))
    _write_jsonl(paths.pairs_val_file, make_pairs(val, seed + 1))
    tokenizer = build_tokenizer((row["text"] for row in train), vocab_size=params["vocab_size"])
    tokenizer.save_pretrained(str(paths.tokenizer_dir))
    (target / "DONE").write_text(json.dumps(params, sort_keys=True))


def prepare_demo(
    root: str | Path | None = None, n_train: int = 20000, n_val: int = 2000, seed: int = 0
) -> DemoPaths:
    """Build the demo data and tokenizer under ``root`` once; later calls reuse it.

    ``root`` (default :func:`demo_cache_root`) is complete exactly when ``root/DONE`` holds
    these parameters. Otherwise everything is written into a temporary sibling directory that
    is then renamed into place, so readers never see a half-written demo and several processes
    (e.g. DDP ranks) may call this at once: the first rename wins and the others discard their
    copy. A complete build with other parameters is replaced; a non-empty directory that is
    not a demo build is refused rather than deleted.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train}, {n_val}")
    root = Path(root).expanduser().resolve() if root is not None else demo_cache_root()
    params = dict(
        version=FORMAT_VERSION, n_train=n_train, n_val=n_val, seed=seed, vocab_size=VOCAB_SIZE
    )
    build_once(root, params, _build)
    return DemoPaths.under(root)


def build_once(root: Path, params: dict, build) -> None:
    """Run ``build(tmp, params)`` into a temporary sibling of ``root`` and rename it into place,
    unless ``root/DONE`` already holds ``params`` (see :func:`prepare_demo`)."""
    if _read_done(root) == params:
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is normally shared
        build(tmp, params)
        _publish(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if our rename won


def _publish(tmp: Path, root: Path, params: dict) -> None:
    """Move the finished build ``tmp`` to ``root``, unless a matching build got there first."""
    for _ in range(10):  # retries only when builds with different parameters race
        try:
            os.replace(tmp, root)  # atomic; succeeds if root is absent or an empty directory
            return
        except OSError:
            if not root.is_dir():
                raise
        # root exists and is not empty.
        done = _read_done(root)
        if done == params:
            return  # another process won the race: keep theirs, ours is discarded
        if done is None:
            raise FileExistsError(
                f"{root} exists and is not a lit_rlhf demo build (no DONE file); "
                "remove it or pass another root"
            )
        # A complete build with other parameters: move it aside, then retry the rename.
        stale = root.parent / f".{root.name}.stale-{uuid.uuid4().hex}"
        try:
            os.replace(root, stale)
        except FileNotFoundError:
            continue  # someone else moved it already
        shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not publish the demo build into {root}: it keeps being replaced")
