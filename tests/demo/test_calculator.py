"""The calculator demo: its data and tokenizer, how an episode is judged, and the recipe run
through the CLI with the real tool loop, then evaluated by ``python -m lit_rlhf.demo.calculator``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_rlhf.demo.calculator import TAGS, all_problems, judge_episodes, prepare_calculator


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_are_disjoint_and_a_minority_of_demonstrations_call_the_tool(tmp_path):
    paths = prepare_calculator(tmp_path / "calc")
    sft = _rows(paths.sft_dir / "train.jsonl")
    grpo = _rows(paths.prompts_dir / "train.jsonl") + _rows(paths.prompts_dir / "validation.jsonl")
    test = _rows(paths.test_file)
    prompts = [r["prompt"] for r in sft + _rows(paths.sft_dir / "validation.jsonl") + grpo + test]
    assert len(prompts) == len(set(prompts)) == len(all_problems()) == 990 * 90
    assert all(eval(r["prompt"][:-1]) == int(r["answer"]) for r in test)  # noqa: S307 (our own digits)
    tool = [r for r in sft if r["completion"].startswith("<calc>")]
    assert 0.2 < len(tool) / len(sft) < 0.3
    a, b = tool[0]["prompt"][:-1].split("*")
    assert tool[0]["completion"] == f"<calc>{a}*{b}</calc><result>{int(a) * int(b)}</result>{int(a) * int(b)}"


def test_the_tags_are_single_tokens_and_digits_one_token_each(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepare_calculator(tmp_path / "calc").tokenizer_dir)
    ids = tok("123*45=<calc>123*45</calc><result>5535</result>5535")["input_ids"]
    assert len(ids) == 7 + 1 + 6 + 1 + 1 + 4 + 1 + 4 and tok.convert_tokens_to_ids(list(TAGS)) == ids[7:8] + ids[14:16] + ids[20:21]
    assert tok.decode(ids, skip_special_tokens=True) == "123*45=<calc>123*45</calc><result>5535</result>5535"


def test_an_episode_is_right_when_its_final_turn_ends_with_the_answer_and_eos(tmp_path):
    from transformers import AutoTokenizer

    from lit_rlhf.envs import Transcript
    from lit_rlhf.modules.episodes import Episode, episode_rollout

    tok = AutoTokenizer.from_pretrained(prepare_calculator(tmp_path / "calc").tokenizer_dir)
    eos = [tok.eos_token_id]

    def episode(*turns, calls=0):
        """Alternating policy turns and observations."""
        e = Episode(None, Transcript(tok), tok("12*3=")["input_ids"], info={"tool_calls": float(calls)})
        for k, text in enumerate(turns):
            ids = text if isinstance(text, list) else tok(text, add_special_tokens=False)["input_ids"]
            e.tokens += ids
            e.observed += [k % 2 == 1] * len(ids)
            e.logprobs += [0.0] * len(ids)
        return e

    episodes = [episode(tok("<calc>12*3</calc>")["input_ids"], "<result>36</result>", tok("36")["input_ids"] + eos, calls=1),
                episode(tok("36")["input_ids"] + eos),  # right without the tool
                episode("<calc>12*3</calc>", "<result>36</result>", eos, calls=1),  # the answer only in the result
                episode("36"),  # no EOS: cut off
                episode(tok("35")["input_ids"] + eos)]
    right, used = judge_episodes(tok, episode_rollout(episodes, tok.pad_token_id, "cpu"), episodes, ["36"] * 5)
    assert right == [True, True, False, False, False] and used == [True, False, True, False, False]


@pytest.mark.slow
def test_the_grpo_recipe_runs_episodes_through_the_cli_and_the_evaluator_reads_its_export(cli, tmp_path):
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512})
    run = cli.run(["fit", "-c", "configs/grpo/calculator.yaml", "--model.init_args.lm.name_or_path=null",
                   f"--model.init_args.lm.arch={tiny}", "--model.init_args.lm.tokenizer=calculator",
                   "--data.init_args.batch_size=4", "--model.init_args.grpo.mini_batch_size=16",
                   "--model.init_args.sampling.min_new_tokens=8", "--model.init_args.sampling.max_new_tokens=8",
                   "--trainer.limit_train_batches=2",
                   "--trainer.limit_val_batches=1", "--data.init_args.val_batch_size=4", "--trainer.val_check_interval=2",
                   "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    assert run.code == 0, run.stderr[-3000:]
    version = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(next(version.glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/tool_use",
            "episode/observation_tokens", "episode/cut", "val/accuracy"} <= tags
    out = subprocess.run([sys.executable, "-m", "lit_rlhf.demo.calculator", str(version / "model"), "--show", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "greedy exact-answer accuracy" in out.stdout and "tool use" in out.stdout and "500 held-out" in out.stdout
