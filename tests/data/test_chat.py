"""Conversational data: templates, assistant-only labels (packed), schemas of real datasets
as local files, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_rlhf.data import ConstantLengthDataset, SFTDataModule
from lit_rlhf.data.chat import assistant_spans, check_messages, split_pair, tokens_with_mask
from lit_rlhf.data.packing import IGNORE_INDEX
from lit_rlhf.models.templates import TEMPLATES

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "A film?"},
    {"role": "assistant", "content": "Watch Avalon."},
]

# The rendering of CONVERSATION (without its system turn for chatml-system), trained text in [].
MARKED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\n[Hello!<|im_end|>\n]<|im_start|>user\nA film?<|im_end|>\n"
              "<|im_start|>assistant\n[Watch Avalon.<|im_end|>\n]",
    "chatml-system": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there"
                     "<|im_end|>\n<|im_start|>assistant\n[Hello!<|im_end|>\n]<|im_start|>user\nA film?<|im_end|>\n"
                     "<|im_start|>assistant\n[Watch Avalon.<|im_end|>\n]",
    "llama3": "<|endoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n[Hello!<|eot_id|>]<|start_header_id|>user<|end_header_id|>\n\nA film?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n[Watch Avalon.<|eot_id|>]",
}


def marked(tokenizer, ids, mask) -> str:
    out = []
    for i, (token, keep) in enumerate(zip(ids, mask)):
        opens = keep and (i == 0 or not mask[i - 1])
        closes = keep and (i == len(mask) - 1 or not mask[i + 1])
        out.append(("[" if opens else "") + tokenizer.decode([token]) + ("]" if closes else ""))
    return "".join(out)


@pytest.mark.parametrize("name", sorted(MARKED))
def test_assistant_turns_and_their_end_of_turn_are_the_trained_tokens(tokenizer, name):
    messages = CONVERSATION[1:] if name == "chatml-system" else CONVERSATION
    text, spans = assistant_spans(tokenizer, messages, TEMPLATES[name])
    ids, mask = tokens_with_mask(tokenizer, text, spans)
    assert marked(tokenizer, ids, mask) == MARKED[name]
    assert tokenizer.decode(ids) == text  # nothing added, nothing lost


def test_a_template_whose_prefixes_do_not_render_as_prefixes_is_named(tokenizer):
    ends_differently = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}[END]{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="row 3: the chat template does not render the conversation up to message 2"):
        assistant_spans(tokenizer, CONVERSATION, ends_differently, "row 3")


@pytest.mark.parametrize("messages, match", [
    ([{"content": "hi"}], "message 0 needs 'role' and 'content'"),
    ([{"role": "narrator", "content": "hi"}], "message 0 has unknown role 'narrator'"),
    ([{"role": "user", "content": 3}], "message 0 content is int, not text"),
    ([{"role": "user", "content": "hi"}], "the conversation has no assistant turn"),
    ([], "expected a non-empty list of messages"),
])
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        check_messages(messages, "x.jsonl: line 4: field 'messages'", need_assistant=True)


def test_pairs_split_into_a_shared_prompt_and_two_answers():
    user = {"role": "user", "content": "Film?"}
    good, bad = {"role": "assistant", "content": "Yes"}, {"role": "assistant", "content": "No"}
    assert split_pair([user, good], [user, bad], None, "r") == ([user], [good], [bad])  # implicit (HH)
    assert split_pair([user, good], [user, bad], [user], "r") == ([user], [good], [bad])  # sides repeat it
    assert split_pair([good], [bad], [user], "r") == ([user], [good], [bad])  # answers only
    other = {"role": "user", "content": "Book?"}
    with pytest.raises(ValueError, match="r: rejected starts with other messages than the prompt"):
        split_pair([user, good], [other, bad], [user], "r")
    with pytest.raises(ValueError, match="share no leading messages"):
        split_pair([user, good], [other, bad], None, "r")


def ultrachat_rows(n: int = 60) -> list[dict]:
    """UltraChat-like: a system turn in some rows, one or two user/assistant exchanges."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a film critic."}] if i % 3 == 0 else []
        for turn in range(1 + i % 2):
            messages += [{"role": "user", "content": f"Tell me about film {i}, part {turn}."},
                         {"role": "assistant", "content": f"Film {i} is a wonderful story, part {turn}."}]
        rows.append({"prompt_id": str(i), "messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packed_conversations_keep_their_assistant_labels(tokenizer):
    tokenizer.chat_template = TEMPLATES["chatml"]
    try:
        rows = ultrachat_rows(12)
        ds = ConstantLengthDataset(rows, tokenizer, seq_length=32, format_fn=lambda r: r["messages"],
                                   conversational=True)
        chunks = list(ds)
    finally:
        tokenizer.chat_template = None
    # The expected stream: documents back to back, labels only on assistant tokens; the first
    # token of a document that starts inside a chunk gets no label (see packing.py).
    ids, labels = [], []
    for row in rows:
        doc, mask = tokens_with_mask(tokenizer, *assistant_spans(tokenizer, row["messages"], TEMPLATES["chatml"]))
        ids += doc
        labels += [t if keep else IGNORE_INDEX for t, keep in zip(doc, mask)]
    got_ids = [t for c in chunks for t in c["input_ids"].tolist()]
    got_labels = [t for c in chunks for t in c["labels"].tolist()]
    assert got_ids == ids[: len(got_ids)] and len(ids) - len(got_ids) < 32
    starts = {c * 32 + i for c, chunk in enumerate(chunks) for i in range(1, 32) if chunk["position_ids"][i] == 0}
    for i, (got, want) in enumerate(zip(got_labels, labels)):
        assert got == (IGNORE_INDEX if i in starts else want), i
    assert sum(t != IGNORE_INDEX for t in got_labels) > 0


def test_sft_rows_with_a_bad_conversation_are_named_by_file_line_and_field(tmp_path, tokenizer):
    rows = ultrachat_rows(40)
    rows[29]["messages"] = [{"role": "user", "content": "no answer here"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    tokenizer.chat_template = TEMPLATES["chatml"]
    try:
        dm = SFTDataModule(path=str(path), seq_length=32, val_size=4, tokenizer=tokenizer)
        with pytest.raises(ValueError, match=r"chat\.jsonl: line 30: field 'messages': the conversation has no "
                                             r"assistant turn"):
            dm.setup("fit")
    finally:
        tokenizer.chat_template = None


def test_conversations_without_a_template_are_one_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", ultrachat_rows(20))
    dm = SFTDataModule(path=str(path), seq_length=32, val_size=4, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="has no chat template for conversational data .*model.init_args.lm.chat_template"):
        dm.setup("fit")


def ultrafeedback_rows(n: int = 40) -> list[dict]:
    """UltraFeedback-binarized-like: a text prompt, chosen/rejected whole conversations."""
    rows = []
    for i in range(n):
        user = {"role": "user", "content": f"Review film {i} in a sentence."}
        rows.append({"prompt": user["content"], "score_chosen": 8.0, "score_rejected": 3.0,
                     "chosen": [user, {"role": "assistant", "content": f"Film {i} is wonderful and moving."}],
                     "rejected": [user, {"role": "assistant", "content": f"Film {i} is dull and awful."}]})
    return rows


def hh_rows(n: int = 40) -> list[dict]:
    """HH-RLHF-like in conversational form: no prompt field, a shared leading exchange."""
    rows = []
    for i in range(n):
        shared = [{"role": "user", "content": f"Seen film {i}?"}, {"role": "assistant", "content": "Yes."},
                  {"role": "user", "content": "Was it good?"}]
        rows.append({"chosen": shared + [{"role": "assistant", "content": "Wonderful, truly moving."}],
                     "rejected": shared + [{"role": "assistant", "content": "Dull and awful."}]})
    return rows


def prompt_rows(n: int = 40) -> list[dict]:
    """Prompt-only (RL): a system turn and a user turn per row."""
    return [{"prompt": [{"role": "system", "content": "You are a film critic."},
                        {"role": "user", "content": f"Review film {i}:"}]} for i in range(n)]


TINY = ("--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
        "--model.init_args.lm.tokenizer=demo")
RUN = ("--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
       "--trainer.check_val_every_n_epoch=null", "--trainer.enable_progress_bar=false")


@pytest.mark.slow
@pytest.mark.parametrize("stage, rows, template, extra", [
    ("sft", ultrachat_rows, "chatml", ("--data.init_args.seq_length=64", "--data.init_args.batch_size=4")),
    ("rm", ultrafeedback_rows, "llama3", ("--data.init_args.batch_size=4",)),
    ("rm", hh_rows, "chatml-system", ("--data.init_args.batch_size=4",)),
    ("ppo", prompt_rows, "chatml-system", (*TINY, "--model.init_args.reward=lit_rlhf.demo.JudgeReward",
                                           "--model.init_args.judge=null", "--model.init_args.sampling.min_new_tokens=4",
                                           "--model.init_args.sampling.max_new_tokens=8", "--data.init_args.batch_size=8",
                                           "--model.init_args.ppo.mini_batch_size=8", "--data.init_args.max_prompt_length=160",
                                           "--trainer.val_check_interval=1")),
], ids=["sft-ultrachat", "rm-ultrafeedback", "rm-hh", "ppo-prompts"])
def test_every_stage_trains_from_conversational_files_through_the_cli(cli, tmp_path, stage, rows, template, extra):
    path = write_jsonl(tmp_path / f"{rows.__name__}.jsonl", rows())
    out = cli.run(["fit", "-c", f"configs/{stage}/demo.yaml", f"--model.init_args.lm.chat_template={template}",
                   f"--data.init_args.path={path}", "--data.init_args.val_size=8",
                   f"--trainer.default_root_dir={tmp_path}", *RUN, *extra])
    assert out.code == 0, out.stderr[-3000:]
    run = next(tmp_path.glob("lightning_logs/version_*"))
    saved = run / {"rm": "export", "sft": "model"}.get(stage, "adapter")  # the SFT demo fine-tunes in full
    # The template travels with what the run exports.
    assert (saved / "chat_template.jinja").read_text() == TEMPLATES[template]


def test_drop_oldest_turns_keeps_the_system_message_and_the_last_turn():
    from lit_rlhf.data.chat import drop_oldest_turns

    system = {"role": "system", "content": "S"}
    turns = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "u2"}]
    assert drop_oldest_turns([system, *turns], lambda p: len(p) <= 3) == ([system, *turns[1:]], 1)
    assert drop_oldest_turns([system, *turns], lambda p: len(p) <= 2) == ([system, turns[2]], 2)
    assert drop_oldest_turns([system, *turns], lambda p: len(p) <= 1) is None  # the last turn stays


def long_chat_pairs(n: int = 12) -> list[dict]:
    history = []
    for k in range(6):
        history += [{"role": "user", "content": f"Earlier question {k} about an old film or two."},
                    {"role": "assistant", "content": f"Earlier answer {k}, rather long for the sake of it."}]
    return [{"chosen": [*history, {"role": "user", "content": f"And film {i}?"},
                        {"role": "assistant", "content": "Wonderful and moving."}],
             "rejected": [*history, {"role": "user", "content": f"And film {i}?"},
                          {"role": "assistant", "content": "Dull."}]} for i in range(n)]


def test_too_long_chat_pairs_lose_their_oldest_turns_not_their_answers(tmp_path, tokenizer):
    from datasets import Dataset

    from lit_rlhf.data.preference import PairDataset

    tokenizer.chat_template = TEMPLATES["chatml"]
    try:
        rows = Dataset.from_list(long_chat_pairs())
        full = PairDataset(rows, tokenizer, max_length=10_000)
        limit = max(full.lengths()) // 2
        cut = PairDataset(rows, tokenizer, max_length=limit, too_long="truncate")
    finally:
        tokenizer.chat_template = None
    assert full.stats["prompt_turns_dropped"] == 0
    assert cut.stats["pairs"] == 12 and cut.stats["prompt_turns_dropped"] > 0 and cut.stats["truncated"] == 0
    for chosen, rejected, *_ in cut.pairs:
        assert max(len(chosen), len(rejected)) <= limit
        text = tokenizer.decode(chosen)
        assert text.endswith("Wonderful and moving.<|im_end|>\n") and "Earlier question 0 " not in text


def test_too_long_chat_prompts_lose_their_oldest_turns(tmp_path, tokenizer):
    from lit_rlhf.data import PromptDataModule

    rows = [{"prompt": pair["chosen"][:-1]} for pair in long_chat_pairs(40)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tokenizer.chat_template = TEMPLATES["chatml"]
    try:
        dm = PromptDataModule(path=str(path), max_prompt_length=60, val_size=4, batch_size=4, tokenizer=tokenizer)
        dm.setup("fit")
    finally:
        tokenizer.chat_template = None
    assert dm.stats["train_prompts"] == 36 and dm.stats["train_too_long"] == 0
    assert dm.stats["prompt_turns_dropped"] > 0
    for text, ids, messages, _ in dm.train_prompts:
        assert len(ids) <= 60 and text.endswith("<|im_start|>assistant\n") and "Earlier question 0 " not in text
        assert messages[-1]["content"].startswith("And film")  # the turn being answered stays


class _Recorder:
    """A reward function that asks for the prompts' messages and records what it gets."""

    wants_messages = True

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, responses):
        import torch

        self.seen.append(prompts)
        return torch.zeros(len(responses))


def test_reward_functions_that_ask_get_the_prompt_messages(tmp_path):
    import lightning as L

    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.modules.online import SamplingConfig
    from lit_rlhf.modules.ppo import PPOConfig
    from tests.conftest import TINY_LLAMA

    path = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(24))
    reward = _Recorder()
    module = PPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", chat_template="chatml"), reward,
                       rollout_batch_size=4, ppo=PPOConfig(mini_batch_size=4, ppo_epochs=1),
                       sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4))
    data = PromptDataModule(path=str(path), batch_size=4, val_size=4, max_prompt_length=128, tokenizer=module.tokenizer)
    L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(module, data)
    [prompts] = reward.seen
    assert len(prompts) == 4 and all(p[0]["role"] == "system" and p[1]["role"] == "user" for p in prompts)
    assert all(p[1]["content"].startswith("Review film") for p in prompts)


def test_left_truncation_keeps_the_end_of_chat_pairs_and_prompts(tmp_path, tokenizer):
    from datasets import Dataset

    from lit_rlhf.data import PromptDataModule
    from lit_rlhf.data.preference import PairDataset

    tokenizer.chat_template = TEMPLATES["chatml"]
    try:
        rows = Dataset.from_list(long_chat_pairs())
        pairs = PairDataset(rows, tokenizer, max_length=40, too_long="truncate", chat_truncation="left")
        path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["chosen"][:-1]} for p in long_chat_pairs(40)])
        dm = PromptDataModule(path=str(path), max_prompt_length=30, val_size=4, batch_size=4,
                              chat_truncation="left", tokenizer=tokenizer)
        dm.setup("fit")
    finally:
        tokenizer.chat_template = None
    assert pairs.stats["truncated"] == 12 and pairs.stats["prompt_turns_dropped"] == 0
    assert all(tokenizer.decode(c).endswith("Wonderful and moving.<|im_end|>\n") for c, *_ in pairs.pairs)
    assert dm.stats["train_cut_left"] == 36 and dm.stats["train_prompts"] == 36
    assert all(len(ids) == 30 and text.endswith("<|im_start|>assistant\n") for text, ids, *_ in dm.train_prompts)
    assert all(messages is not None for _, _, messages, _ in dm.train_prompts)  # still known to reward functions
