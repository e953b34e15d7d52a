"""The arithmetic demo's data: disjoint splits, one token per character, exact greedy scoring."""

from __future__ import annotations

import json

import torch

from lit_rlhf.demo.arithmetic import all_problems, greedy_accuracy, prepare_arithmetic


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_are_disjoint_and_cover_the_problems(tmp_path):
    paths = prepare_arithmetic(tmp_path / "arith")
    sft = _rows(paths.sft_dir / "train.jsonl") + _rows(paths.sft_dir / "validation.jsonl")
    grpo = _rows(paths.prompts_dir / "train.jsonl") + _rows(paths.prompts_dir / "validation.jsonl")
    test = _rows(paths.test_file)
    prompts = [r["prompt"] for r in sft + grpo + test]
    assert len(prompts) == len(set(prompts)) == 10_000 == len(all_problems())
    assert all(eval(r["prompt"][:-1]) == int(r["answer"]) for r in grpo + test)  # noqa: S307 (our own digits)
    assert sft[0]["completion"] == str(eval(sft[0]["prompt"][:-1]))  # noqa: S307
    assert prepare_arithmetic(tmp_path / "arith") == paths  # built once, then reused


def test_every_character_is_one_token(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_arithmetic(tmp_path / "arith").tokenizer_dir)
    ids = tokenizer("73+48=121")["input_ids"]
    assert len(ids) == 9 and tokenizer.decode(ids) == "73+48=121"
    assert tokenizer.eos_token_id not in ids  # EOS is appended by the data, not the tokenizer


class _Answers:
    """A stand-in model whose greedy output is scripted per prompt."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, outputs: dict[str, str], eos: bool = True) -> None:
        self.tokenizer, self.outputs, self.eos = tokenizer, outputs, eos

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m])
            new = self.tokenizer(self.outputs[prompt])["input_ids"] + ([eos_token_id] if self.eos else [])
            new = (new + [pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_greedy_accuracy_wants_the_exact_answer_then_eos(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_arithmetic(tmp_path / "arith").tokenizer_dir)
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+5=", "answer": "15"},
            {"prompt": "9+9=", "answer": "18"}, {"prompt": "50+50=", "answer": "100"}]
    outputs = {"1+2=": "3", "10+5=": "15", "9+9=": "17", "50+50=": "100 "}  # wrong; trailing text
    assert greedy_accuracy(_Answers(tokenizer, outputs), tokenizer, rows, batch_size=3) == 0.5
    assert greedy_accuracy(_Answers(tokenizer, outputs, eos=False), tokenizer, rows) == 0.0  # no EOS: not an answer
