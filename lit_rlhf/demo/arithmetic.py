"""The arithmetic demo: problems ``"{a}+{b}="`` answered by the digits of the sum and EOS.

A task whose reward is a rule, not a model: the answer is right or wrong. SFT learns the
format and some of the sums from a slice of the problems; GRPO with
:class:`~lit_rlhf.rewards.ExactAnswerReward` then trains on other problems, and both are
measured by greedy exact-answer accuracy on problems neither has seen.

:func:`prepare_arithmetic` writes, once, under ``$LIT_RLHF_CACHE/arithmetic-v1``:

* ``sft/{train,validation}.jsonl``: ``{"prompt": "12+34=", "completion": "46"}``;
* ``prompts/{train,validation}.jsonl``: ``{"prompt": "12+34=", "answer": "46"}`` (GRPO);
* ``test.jsonl``: held-out problems for the final accuracy;
* ``tokenizer/``: a byte-level tokenizer with no merges, so every digit is one token.

``path: arithmetic`` in ``SFTDataModule`` and ``PromptDataModule`` reads these splits, and the
model loader knows ``tokenizer: arithmetic``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ARITHMETIC = "arithmetic"
FORMAT_VERSION = 1
MAX_OPERAND = 99
SPLITS = dict(sft=2000, sft_val=200, prompts_val=200, test=500)  # the rest: GRPO training prompts


@dataclass(frozen=True)
class TaskPaths:
    """The files of a problem task (this one, and the calculator's)."""

    root: Path
    sft_dir: Path  # train.jsonl, validation.jsonl: {"prompt", "completion"}
    prompts_dir: Path  # train.jsonl, validation.jsonl: {"prompt", "answer"}
    test_file: Path  # {"prompt", "answer"}
    tokenizer_dir: Path

    @classmethod
    def under(cls, root: Path) -> TaskPaths:
        return cls(root, root / "sft", root / "prompts", root / "test.jsonl", root / "tokenizer")


ArithmeticPaths = TaskPaths


def write_splits(paths: TaskPaths, problems: list, splits: dict[str, int], sft, answers) -> None:
    """Cut ``problems`` into ``splits`` (``sft``, ``sft_val``, ``prompts_val``, ``test``: sizes, in
    order; the rest are GRPO's training prompts) and write them; ``sft(part)`` and
    ``answers(part)`` make the SFT rows and the ``{prompt, answer}`` rows of a part."""
    from lit_rlhf.demo import write_rows

    cuts, start = {}, 0
    for name, n in splits.items():
        cuts[name], start = problems[start : start + n], start + n
    write_rows(paths.sft_dir / "train.jsonl", sft(cuts["sft"]))
    write_rows(paths.sft_dir / "validation.jsonl", sft(cuts["sft_val"]))
    write_rows(paths.prompts_dir / "train.jsonl", answers(problems[start:]))
    write_rows(paths.prompts_dir / "validation.jsonl", answers(cuts["prompts_val"]))
    write_rows(paths.test_file, answers(cuts["test"]))


def problem(a: int, b: int) -> tuple[str, str]:
    """(prompt, answer) of ``a + b``."""
    return f"{a}+{b}=", str(a + b)


def all_problems(seed: int = 0) -> list[tuple[str, str]]:
    """Every ``a + b`` with ``0 <= a, b <= 99``, in a seeded random order (10,000 problems)."""
    problems = [problem(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(problems)
    return problems


def _build(target: Path, params: dict) -> None:
    from lit_rlhf.demo.tokenizer import build_tokenizer

    problems = all_problems(params["seed"])
    paths = ArithmeticPaths.under(target)
    write_splits(paths, problems, SPLITS, lambda part: [{"prompt": p, "completion": a} for p, a in part],
                 lambda part: [{"prompt": p, "answer": a} for p, a in part])
    # 256 byte symbols + 2 specials and no merges: one token per character.
    build_tokenizer([p + a for p, a in problems], vocab_size=258).save_pretrained(str(paths.tokenizer_dir))
    (target / "DONE").write_text(json.dumps(params, sort_keys=True))


def arithmetic_root() -> Path:
    from lit_rlhf.demo import cache_root

    return cache_root("arithmetic-v1")


def prepare_arithmetic(root: str | Path | None = None, seed: int = 0) -> ArithmeticPaths:
    """Build the arithmetic data and tokenizer once (atomically, like :func:`~lit_rlhf.demo.prepare_demo`)."""
    from lit_rlhf.demo import build_once

    root = Path(root).expanduser().resolve() if root is not None else arithmetic_root()
    build_once(root, dict(version=FORMAT_VERSION, seed=seed, splits=SPLITS), _build)
    return ArithmeticPaths.under(root)


def greedy_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 250) -> float:
    """Fraction of ``{"prompt", "answer"}`` rows that ``model`` answers exactly: greedy
    decoding gives the answer's characters followed by EOS, and nothing else."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    longest = max(len(tokenizer(r["answer"])["input_ids"]) for r in rows)
    correct = 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in part]
        width = max(map(len, prompts))  # left-padded: every prompt ends at the same column
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in prompts])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=False, max_new_tokens=longest + 1, eos_token_id=eos, pad_token_id=pad)
        for row, tokens in zip(part, out[:, ids.size(1):].tolist()):
            if eos in tokens:
                correct += tokenizer.decode(tokens[: tokens.index(eos)]) == row["answer"]
    return correct / len(rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_rlhf.demo.arithmetic MODEL_DIR [MODEL_DIR ...]``: greedy exact-answer
    accuracy of exported models on the held-out test problems."""
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("models", nargs="+", help="exported model folders (config.json, weights, tokenizer)")
    opts = parser.parse_args(argv)
    rows = [json.loads(line) for line in prepare_arithmetic().test_file.read_text().splitlines()]
    for path in opts.models:
        if not (Path(path) / "config.json").is_file():
            parser.error(f"{path}: not an exported model folder (no config.json)")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        print(f"{path}: greedy exact-answer accuracy {greedy_accuracy(model, tokenizer, rows):.3f} "
              f"on {len(rows)} held-out problems")


if __name__ == "__main__":
    main()
