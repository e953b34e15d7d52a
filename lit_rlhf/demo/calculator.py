"""The calculator demo: the policy learns to call a tool for ``"{a}*{b}="``.

Products of ``a`` in 10-999 and ``b`` in 10-99 are too hard for a tiny model to compute in its
head, and easy for a calculator. The policy calls it as ``<calc>EXPR</calc>`` (an expression of
digits, ``+``, ``-``, ``*`` and spaces); the result comes back directly after the closing tag
as ``<result>VALUE</result>`` (:class:`~lit_rlhf.envs.ToolEnvironment` with
:func:`~lit_rlhf.envs.calculator`), and the final answer is the last number the policy writes
before EOS. At most 3 calls per problem, at most 64 new tokens per turn.

SFT learns the format from demonstrations of which only a minority call the tool (the rest
answer directly, and are mostly wrong after SFT); GRPO with the exact-answer reward on the
final answer then trains on other problems. Both are measured on held-out problems by greedy
decoding with the real tool loop: exact-answer accuracy and the tool-use rate.

:func:`prepare_calculator` writes, once, under ``$LIT_RLHF_CACHE/calculator-v1``:

* ``sft/{train,validation}.jsonl``: ``{"prompt": "123*45=", "completion": "<calc>123*45</calc><result>5535</result>5535"}``
  or ``{"prompt": "123*45=", "completion": "5535"}``;
* ``prompts/{train,validation}.jsonl``: ``{"prompt": "123*45=", "answer": "5535"}`` (GRPO);
* ``test.jsonl``: held-out problems;
* ``tokenizer/``: one token per character, plus the four tags as single tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lit_rlhf.demo.arithmetic import TaskPaths, write_splits

CALCULATOR = "calculator"
FORMAT_VERSION = 1
TAGS = ("<calc>", "</calc>", "<result>", "</result>")
MAX_CALLS, MAX_TURN_TOKENS = 3, 64
TOOL_FRACTION = 0.25  # of the SFT demonstrations that call the tool
SPLITS = dict(sft=6000, sft_val=200, prompts_val=200, test=500)  # the rest: GRPO training prompts


CalculatorPaths = TaskPaths


def problem(a: int, b: int) -> tuple[str, str]:
    """(prompt, answer) of ``a * b``."""
    return f"{a}*{b}=", str(a * b)


def demonstration(a: int, b: int, tool: bool) -> str:
    """The SFT completion: a tool call, its result and the answer; or the answer alone."""
    answer = str(a * b)
    return f"<calc>{a}*{b}</calc><result>{answer}</result>{answer}" if tool else answer


def all_problems(seed: int = 0) -> list[tuple[int, int]]:
    """Every ``(a, b)``, ``10 <= a <= 999``, ``10 <= b <= 99``, in a seeded order (89,100)."""
    pairs = [(a, b) for a in range(10, 1000) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def build_calculator_tokenizer(texts: list[str]):
    """Byte-level, no merges (one token per character), the four tags as added tokens."""
    from tokenizers import AddedToken

    from lit_rlhf.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(texts, vocab_size=258)
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in TAGS])
    return tokenizer


def _build(target: Path, params: dict) -> None:
    rng = random.Random(params["seed"] + 1)  # which demonstrations call the tool
    paths = CalculatorPaths.under(target)
    write_splits(paths, all_problems(params["seed"]), SPLITS,
                 lambda part: [{"prompt": problem(a, b)[0],
                                "completion": demonstration(a, b, rng.random() < TOOL_FRACTION)} for a, b in part],
                 lambda part: [dict(zip(("prompt", "answer"), problem(a, b))) for a, b in part])
    build_calculator_tokenizer(["0123456789*=+- "]).save_pretrained(str(paths.tokenizer_dir))
    (target / "DONE").write_text(json.dumps(params, sort_keys=True))


def calculator_root() -> Path:
    from lit_rlhf.demo import cache_root

    return cache_root("calculator-v1")


def prepare_calculator(root: str | Path | None = None, seed: int = 0) -> CalculatorPaths:
    """Build the calculator data and tokenizer once (atomically, like :func:`~lit_rlhf.demo.prepare_demo`)."""
    from lit_rlhf.demo import build_once

    root = Path(root).expanduser().resolve() if root is not None else calculator_root()
    build_once(root, dict(version=FORMAT_VERSION, seed=seed, splits=SPLITS, tool_fraction=TOOL_FRACTION), _build)
    return CalculatorPaths.under(root)


def calculator_env():
    """The demo's environment: ``<calc>EXPR</calc>`` -> ``<result>VALUE</result>``, 3 calls at most."""
    from lit_rlhf.envs import ToolEnvironment, calculator

    return ToolEnvironment({"calc": calculator}, result_tags=("<result>", "</result>"), max_calls=MAX_CALLS)


def play(model, tokenizer, rows: list[dict], greedy: bool = True, seed: int = 0, batch_size: int = 250):
    """Episodes of ``model`` (a plain HF causal LM) on ``{"prompt", "answer"}`` rows with the real
    tool loop: greedy (``top_k=1``) or sampled at temperature 1. Returns the
    :class:`~lit_rlhf.modules.rollout.Rollout` of each batch and its episodes."""
    import torch

    from lit_rlhf.data.prompts import left_pad
    from lit_rlhf.models.heads import PolicyWithValueHead
    from lit_rlhf.models.templates import end_of_turn_ids
    from lit_rlhf.modules.episodes import EpisodeConfig, Sampler, run_episodes, start_episodes

    policy = PolicyWithValueHead(model.eval(), value_head=False)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    kwargs = dict(eos_token_id=end_of_turn_ids(tokenizer, model.generation_config),
                  pad_token_id=tokenizer.pad_token_id, generator=generator, top_k=1 if greedy else 0)
    config = EpisodeConfig(max_turns=MAX_CALLS + 1, max_tokens=(MAX_CALLS + 1) * MAX_TURN_TOKENS)
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        ids, mask = left_pad([tokenizer(r["prompt"])["input_ids"] for r in part], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        batch = {"input_ids": ids, "attention_mask": mask, "prompt": [r["prompt"] for r in part]}
        episodes = start_episodes(calculator_env(), tokenizer, batch, 1)
        rollout = run_episodes(policy, episodes, Sampler(tokenizer, MAX_TURN_TOKENS, kwargs, device=model.device),
                               config)
        out.append((rollout, episodes))
    return out


def evaluate_policy(model, tokenizer, rows: list[dict], greedy: bool = True, seed: int = 0) -> dict:
    """Exact-answer accuracy, the tool-use rate and the trajectories of ``model`` on ``rows``
    (see :func:`judge_episodes`)."""
    from lit_rlhf.modules.rollout import decode_trajectories

    correct, used, trajectories = [], [], []
    for rollout, episodes in play(model, tokenizer, rows, greedy, seed):
        right, called = judge_episodes(tokenizer, rollout, episodes, [r["answer"] for r in rows[len(correct):]])
        correct, used = correct + right, used + called
        trajectories += decode_trajectories(tokenizer, rollout, ("", ""))
    return {"accuracy": sum(correct) / len(rows), "tool_use_rate": sum(used) / len(rows),
            "trajectories": trajectories, "correct": correct}


def judge_episodes(tokenizer, rollout, episodes, answers: list) -> tuple[list[bool], list[bool]]:
    """Per episode: right (the last number of the policy's final turn is the answer, and the
    turn ends with EOS) and whether it called the tool at least once."""
    from lit_rlhf.models.templates import end_of_turn_ids
    from lit_rlhf.modules.rollout import decode_responses
    from lit_rlhf.rewards import final_answer, same_answer

    ended = rollout.ended_with(end_of_turn_ids(tokenizer)).tolist()
    finals = decode_responses(tokenizer, rollout)
    right = [eos and same_answer(final_answer(text, "last_number"), answer)
             for text, eos, answer in zip(finals, ended, answers)]
    return [bool(r) for r in right], [e.info.get("tool_calls", 0) > 0 for e in episodes]


def pipeline_results(model_dir: Path, ref_dir: Path | None, rows: list[dict], n_sampled: int, seed: int) -> dict:
    """What ``python train.py pipeline --task calculator`` reports of one policy: sampled episodes
    (temperature 1) on the first ``n_sampled`` problems (``judge_score``: their exact-answer rate,
    ``kl_to_sft``: the summed log-ratio of the policy's tokens to ``ref_dir``'s, observations
    excluded, ``mean_length``: the policy's tokens per episode), and greedy episodes on all
    ``rows`` (``greedy_accuracy``, ``tool_use_rate``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_rlhf.models.heads import PolicyWithValueHead
    from lit_rlhf.modules.rollout import decode_trajectories, evaluate_actions

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    greedy = evaluate_policy(model, tokenizer, rows)
    sampled = evaluate_policy(model, tokenizer, rows[:n_sampled], greedy=False, seed=seed)
    rollout, _ = play(model, tokenizer, rows[:n_sampled], greedy=False, seed=seed, batch_size=n_sampled)[0]
    mask = rollout.action_mask.float()
    kl = 0.0
    if ref_dir is not None:
        with torch.no_grad():
            logp = evaluate_actions(PolicyWithValueHead(model, value_head=False), rollout, with_values=False)[0]
            ref = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(ref_dir).eval(), value_head=False)
            kl = float(((logp - evaluate_actions(ref, rollout, with_values=False)[0]) * mask).sum(-1).mean())
    return {"responses": decode_trajectories(tokenizer, rollout, ("", "")), "scores": [float(c) for c in sampled["correct"]],
            "judge_score": sampled["accuracy"], "kl_to_sft": kl, "distinct_2": None,
            "mean_length": float(mask.sum(-1).mean()), "greedy_accuracy": greedy["accuracy"],
            "tool_use_rate": greedy["tool_use_rate"], "sampled_tool_use_rate": sampled["tool_use_rate"],
            "greedy_trajectories": greedy["trajectories"][:4]}


def test_rows() -> list[dict]:
    return [json.loads(line) for line in prepare_calculator().test_file.read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_rlhf.demo.calculator MODEL_DIR [MODEL_DIR ...]``: greedy exact-answer
    accuracy and tool-use rate of exported models on the held-out problems, with the real tool loop."""
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("models", nargs="+", help="exported model folders (config.json, weights, tokenizer)")
    parser.add_argument("--show", type=int, default=2, help="trajectories to print per model")
    opts = parser.parse_args(argv)
    rows = test_rows()
    for path in opts.models:
        if not (Path(path) / "config.json").is_file():
            parser.error(f"{path}: not an exported model folder (no config.json)")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        result = evaluate_policy(model, tokenizer, rows)
        print(f"{path}: greedy exact-answer accuracy {result['accuracy']:.3f}, tool use {result['tool_use_rate']:.3f} "
              f"on {len(rows)} held-out problems")
        for row, trajectory in list(zip(rows, result["trajectories"]))[: opts.show]:
            print(f"  {row['prompt']}{trajectory}")


if __name__ == "__main__":
    main()
