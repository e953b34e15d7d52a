"""The same per-stage benchmark as ``benchmarks/run.py``, measured on TRL's Trainer-based trainers.

    python benchmarks/trl_baseline.py --workload tiny-cpu --out trl.json
    python benchmarks/trl_baseline.py --workload tiny-cpu --out smoke.json --steps-override 1,2
    python benchmarks/trl_baseline.py --workload small-cpu --out trl-small.json   # the realistic shape

The workload (model, batch shapes, warm-up and timed steps, threads) is read from
``benchmarks/run.py``'s WORKLOADS, so both scripts measure the same thing, and the output
uses the same names (``sft_tokens_per_s``, ``rm_pairs_per_s``, ``ppo_episodes_per_s``,
``ppo_generate_tokens_per_s``, ``dpo_pairs_per_s``, ``grpo_completions_per_s``,
``grpo_generate_tokens_per_s``, ``*_peak_memory_mb``; ``_bf16`` appended for bf16 mixed
precision), so the two JSON files compare key by key.

Trainers (TRL 1.16.0, the ``bench`` extra; the PPO stages run on TRL 1.12.0, the last release
with PPO (``trl.experimental.ppo``), which the parent installs aside on first use, see
:func:`trl_for`):

* SFT: ``SFTTrainer`` on pre-tokenized random ``input_ids`` (no tokenization), ``packing=True``
  with ``packing_strategy="wrapped"`` (plain concatenate-and-chunk; rows are already
  ``seq_length`` long, so every packed row is one input row), full fine-tuning.
* RM: ``RewardTrainer`` on pre-tokenized ``chosen_ids``/``rejected_ids`` (TRL 1.12's names),
  ``AutoModelForSequenceClassification(num_labels=1)``; TRL's default random sampler, each
  batch padded to its longest sequence.
* PPO: ``trl.experimental.ppo.PPOTrainer``: separate policy, reference (TRL's own copy of the
  policy), value model and reward model (both sequence classifiers, 1 label), exactly
  ``new_tokens`` sampled tokens (``stop_token=None``), one mini-batch per rollout batch. With the
  workload's ``ppo.eos_bias`` (``small-cpu``), responses end at EOS instead, as in run.py: the EOS
  logit of the policy and of TRL's reference raised by that bias in every forward,
  ``stop_token="eos"`` (generation stops once every row has sampled EOS, at ``new_tokens`` at the
  latest; TRL then masks each response after its first EOS), and ``ppo_mean_response_length``
  reports the tokens up to and with the first EOS.
* DPO: ``DPOTrainer``, full fine-tuning, ``loss_type=["sigmoid"]``, the workload's ``beta``, no
  precomputed reference log-probs, ``max_length`` = ``prompt_max + response_max`` (nothing is
  truncated; checked: the batches hold every token of every pair). Reference: TRL's own, from
  ``ref_model=None``; TRL 1.12 builds it by loading ``model.config._name_or_path`` again (it does
  not copy the model in memory), so the random-init policy is saved and given to TRL as a path
  (``_init_checkpoint``): policy and reference load the same weights in fp32. Data: TRL 1.12 has
  no pre-tokenized input for DPO (``_prepare_dataset`` always extracts the prompt, appends EOS to
  both responses' text and tokenizes ``prompt``/``chosen``/``rejected``), so a subclass skips
  ``_prepare_dataset`` and the collator gets run.py's ids as they are (no EOS appended) in the
  ``prompt_ids``/``chosen_ids``/``rejected_ids`` columns it reads. ``DataCollatorForPreference``
  stacks the B prompt+chosen rows and then the B prompt+rejected rows into one (2B, L) batch,
  right-padded to the longest of the 2B rows (``pad_to_multiple_of=None``), and the policy and
  the reference each run one forward over it; ``dpo_padding_fraction`` reports the padding.
  TRL's default random sampler.
* GRPO: ``GRPOTrainer``, full fine-tuning, one python reward function (``low_id_fraction`` of
  the ``completion_ids`` that TRL passes reward functions next to the decoded text),
  ``per_device_train_batch_size`` = prompts x generations = 32 (TRL counts GRPO batches in
  completions), ``num_generations=8``, ``steps_per_generation=1``, ``num_iterations=1``: one
  generation batch per optimizer step, sampled by HF ``generate`` (KV cache; no vLLM) inside the
  training step. Temperature 1, ``top_p=1``, ``top_k=0`` (transformers adds no top-k warper for
  0), exactly ``new_tokens`` tokens (``max_completion_length`` and ``min_new_tokens`` through
  ``generation_kwargs``, so EOS cannot end a completion; checked). ``beta`` = the workload's
  ``kl_loss_coef`` (TRL's KL is the k3 estimator ``exp(r) - r - 1`` added to the per-token loss),
  so a reference forward runs every step; the reference is built as DPO's (reloaded from the
  initial checkpoint). ``scale_rewards="group"`` (group mean and std), ``loss_type="dapo"``
  (TRL 1.12's default and its token mean: summed over the completion tokens of the generation
  batch, divided by their count; ``"bnpo"`` divides by the local batch's count, the same here).
  With generation and optimizer steps aligned, TRL runs no old-log-prob pass (the ratio is
  the current log-probs against themselves, detached). Prompts: TRL 1.12 tokenizes the
  ``prompt`` text column itself, and the demo tokenizer (2,048 tokens, while the model has
  8,000) cannot round-trip the ids: decoded and re-tokenized, the 12-token prompts become 1 to
  9 tokens. So the column holds the ids written out as text and a subclass's
  ``_tokenize_prompts`` parses them back (checked: every prompt is ``prompt_len`` tokens).
* PPO memory (``ppo_pss``; the ``memory-cpu`` and ``memory-tiny-cpu`` workloads, whose jobs
  and names come from run.py and carry no ``_bf16``): ``trl.experimental.ppo.PPOTrainer`` on
  4-bit NF4 bases (``BitsAndBytesConfig``: double quantization, bf16 compute, bf16 for the
  rest, ``device_map={"": "cpu"}``) loaded from random-init bf16 checkpoints
  (``memory.random_checkpoint``, built before the job in a process of their own). Policy: the
  causal LM, with LoRA through PPOTrainer's ``peft_config`` (the workload's r, alpha, dropout,
  all linear layers) and ``ref_model=None``, so the reference is the policy with the adapter
  disabled (checked: TRL builds no reference model). Value and reward model: two loads of one
  sequence-classifier checkpoint (1 label); PPOTrainer takes a ``peft_config`` for the policy
  only, so the value model gets its own LoRA (``get_peft_model``, SEQ_CLS, the same settings),
  which makes its score head a trained ``modules_to_save`` copy; checked: only LoRA weights and
  that score head train. TRL handles the peft value model unchanged: ``PolicyAndValueWrapper``
  runs ``getattr(value_model, "model")``, which on a PeftModel is the whole adapted classifier
  (its score head runs once more, unused, a hidden-size x 1 matmul), and then
  ``value_model.score`` on the last hidden state. The reward model has no adapter. All three
  get lit_rlhf's ``disable_cpu_4bit_repacking`` (a no-op on CPUs without AVX512-BF16; where
  bitsandbytes repacks, both sides keep one 4-bit layout). Rollout: 8 prompts of 32 random ids
  below the demo tokenizer's size, exactly 32 sampled tokens (``stop_token=None``; checked on
  the length and that no row ends in EOS and padding), one PPO epoch of one 8-episode
  mini-batch, two rollout + update steps (``total_episodes=16``), no gradient checkpointing.
  Precision: ``ACCELERATE_MIXED_PRECISION=bf16`` as for PPO above, but ``bf16=False`` in the
  config: there its only effect is ``peft_module_casting_to_bf16`` on a 4-bit peft policy,
  which casts the norms to fp32, after which TRL's rollout (not autocast) feeds fp32 hidden
  states to the bf16 LM head and fails. Every weight outside the adapters is bf16 either way.
  Figures: ``memory.SmapsSampler`` over the whole job (the three loads, the trainer, both
  steps): ``ppo_peak_pss_mb``, ``ppo_peak_rss_anon_mb``, ``ppo_peak_rss_mb`` (VmHWM), and
  ``ppo_s_per_step``, the median of the two step times (with two, their mean). The job prints
  (``[trl-bench]`` lines, which the parent passes on) the peaks of each phase (loading, step
  1, step 2) and each step's process CPU time per wall second, which is about the thread
  count on an idle machine and lower where other processes took the cores. run.py's
  ``ppo_pss_separate_rm`` has no TRL counterpart: TRL's reward model is always a model of its own.

Everything else is left at TRL's defaults (AdamW, linear schedule, grad-norm clip 1.0 in the
Trainer-based SFT/RM/DPO/GRPO), except what the workload fixes or what would add work that run.py does
not do: no gradient checkpointing (TRL defaults to it), no logging/reporting, saving,
evaluation or sample generations.

Timing: a ``TrainerCallback`` times each optimizer step from ``on_step_begin`` to
``on_step_end`` (after the batch is fetched, like Lightning's ``on_train_batch_start``).
PPOTrainer runs its own loop and only fires ``on_step_end``, once per PPO update, so there a
step is the time between consecutive ``on_step_end`` calls (the first from ``on_train_begin``):
one rollout batch (generation, reference/value/reward passes) plus its PPO epochs. GRPOTrainer
generates, scores and runs the reference pass in ``_prepare_inputs``, inside the training step,
so its timed step holds all of them. The figure
is the median over the timed steps after the warm-up steps. Each (stage, precision) runs in its
own process so that peak RSS (``ru_maxrss``) belongs to that stage alone.

Precision: fp32, and bf16 mixed (``bf16=True``; autocast on CPU). PPOTrainer builds its own
``Accelerator`` that ignores ``bf16`` in its config, so for PPO the bf16 run sets
``ACCELERATE_MIXED_PRECISION=bf16`` (what ``accelerate launch --mixed_precision bf16`` does).
Accelerate then autocasts only the prepared policy+value forward of the PPO epochs; TRL runs
generation and the reference/value/reward passes of the rollout in fp32. DPO and GRPO use the
Trainer's accelerator, whose ``prepare_model`` wraps the forward of the policy and of TRL's
reference in autocast, so their bf16 runs autocast every pass: policy and reference forwards,
and in GRPO every ``generate`` step too (checked on a layer's output dtype).

Where the work differs from run.py's (read ratios with these in mind):

* PPO: TRL trains a separate value model (a second full transformer, forward and backward
  in every PPO epoch), where lit_rlhf puts a value head on the policy; TRL computes the
  old log-probs from the generation scores instead of a separate policy pass; it does not
  clip gradients (lit_rlhf clips at 1.0); and its bf16 autocasts only the PPO epochs.
* RM: TRL's random batches are padded to their longest pair (``rm_padding_fraction`` reports
  how much); run.py uses lit_rlhf's length-grouped batches.
* DPO: TRL pads the 2B sequences of a batch to one width (``dpo_padding_fraction``), where
  lit_rlhf's DPOModule packs them into one unpadded row; TRL also computes per-step metrics
  over the full logits (entropy, mean chosen/rejected logits).
* GRPO: TRL computes the entropy of every completion position in the training forward (for its
  metrics), decodes prompts and completions to text every step, and runs no old-log-prob pass
  (lit_rlhf's rollout computes old log-probs).
* SFT/RM/DPO/GRPO: the Trainer clips gradients at 1.0 (run.py's Lightning Trainer does not for
  SFT/RM), and TRL computes per-step metrics (SFT: entropy and token accuracy over the full
  logits).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StepTimer:
    """Wall time of each optimizer step (a ``TrainerCallback``; made one in ``_timer()``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None
        self._last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        # Trainer: step_begin -> step_end. PPOTrainer (no step_begin): step_end -> step_end.
        self.times.append(now - (self._start if self._start is not None else self._last))
        self._start, self._last = None, now


def _timer() -> StepTimer:
    from transformers import TrainerCallback

    return type("StepTimerCallback", (StepTimer, TrainerCallback), {})()


def _median_after_warmup(times: list[float], w: dict, stage: str) -> float:
    expected = w["warmup"] + w["timed"]
    if len(times) != expected:
        raise RuntimeError(f"{stage}: timed {len(times)} steps, expected {expected}")
    return statistics.median(times[w["warmup"]:])


def _llama_config(w: dict, tokenizer):
    """The workload's architecture; special ids from the tokenizer, as lit_rlhf's ModelConfig does."""
    from transformers import AutoConfig

    fields = {k: v for k, v in w["arch"].items() if k != "model_type"}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    return AutoConfig.for_model(w["arch"]["model_type"], **fields)


def _model(config, task: str, seed: int):
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "causal_lm":
        return AutoModelForCausalLM.from_config(config)
    config = copy.deepcopy(config)
    config.num_labels = 1  # `from_config(..., num_labels=1)` is refused by transformers 5
    return AutoModelForSequenceClassification.from_config(config)


def _check_no_checkpointing(*models) -> None:
    for model in models:
        if model.is_activation_checkpointing:  # transformers 5 name of `is_gradient_checkpointing`
            raise RuntimeError(f"{type(model).__name__} trained with activation checkpointing")


def _check_precision(trainer, precision: str) -> None:
    expected = "bf16" if precision == "bf16-mixed" else "no"
    if trainer.accelerator.mixed_precision != expected:
        raise RuntimeError(f"accelerator mixed precision is {trainer.accelerator.mixed_precision!r}, not {expected!r}")


def _common_args(precision: str, steps: int, out_dir: str, batch_size: int) -> dict:
    """TrainingArguments shared by every stage: no logging, saving, eval or checkpointing."""
    import torch

    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        bf16=precision == "bf16-mixed",  # TRL configs default bf16 to True: always set it
        use_cpu=not torch.cuda.is_available(),  # transformers requires it for bf16 on CPU
        # TRL configs default `gradient_checkpointing` to True; transformers 5 renamed it
        # `activation_checkpointing` (the old name only applies while the new one is unset).
        activation_checkpointing=False,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def bench_sft(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = w["sft"]
    steps = w["warmup"] + w["timed"]
    g = torch.Generator().manual_seed(0)
    # One extra batch so the sampler never runs short.
    ids = torch.randint(2, w["arch"]["vocab_size"], ((steps + 1) * cfg["batch_size"], cfg["seq_length"]), generator=g)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    model = _model(_llama_config(w, tokenizer), "causal_lm", seed=0)
    args = SFTConfig(**_common_args(precision, steps, out_dir, cfg["batch_size"]),
                     max_length=cfg["seq_length"], packing=True, packing_strategy="wrapped")
    timer = _timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    _check_no_checkpointing(model)
    _check_precision(trainer, precision)
    step = _median_after_warmup(timer.times, w, "sft")
    return {"sft_tokens_per_s": cfg["batch_size"] * cfg["seq_length"] / step}


def bench_rm(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    from datasets import Dataset
    from pairs import random_pairs
    from trl import RewardConfig, RewardTrainer

    cfg = w["rm"]
    steps = w["warmup"] + w["timed"]
    pairs = random_pairs(w)  # the same pairs as run.py
    dataset = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    model = _model(_llama_config(w, tokenizer), "seq_cls", seed=0)
    args = RewardConfig(**_common_args(precision, steps, out_dir, cfg["batch_size"]), max_length=cfg["max_len"])
    timer = _timer()
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[timer])
    # Record how much of each batch is padding (TRL pads every batch to its longest sequence).
    collate, real, padded = trainer.data_collator, [], []

    def recording_collate(examples):
        batch = collate(examples)
        real.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    trainer.data_collator = recording_collate
    trainer.train()
    _check_no_checkpointing(model)
    _check_precision(trainer, precision)
    step = _median_after_warmup(timer.times, w, "rm")
    return {"rm_pairs_per_s": cfg["batch_size"] / step, "rm_padding_fraction": 1 - sum(real) / sum(padded)}


def bench_ppo(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    import torch
    from datasets import Dataset

    if precision == "bf16-mixed":
        # PPOTrainer creates `Accelerator(...)` itself and never passes `bf16` on: the
        # accelerate-launch way is the only way to get mixed precision into its loop.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    cfg = w["ppo"]
    varlen = "eos_bias" in cfg  # responses end at EOS, as run.py's
    steps = w["warmup"] + w["timed"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, w["arch"]["vocab_size"], (steps * cfg["batch_size"], cfg["prompt_len"]), generator=g)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    config = _llama_config(w, tokenizer)
    policy = _model(config, "causal_lm", seed=0)
    value_model = _model(config, "seq_cls", seed=2)
    reward_model = _model(config, "seq_cls", seed=1)
    args = PPOConfig(
        **_common_args(precision, steps, out_dir, cfg["batch_size"]),
        total_episodes=steps * cfg["batch_size"],  # one PPO update per rollout batch: `steps` updates
        num_ppo_epochs=cfg["ppo_epochs"],
        num_mini_batches=1,
        response_length=cfg["new_tokens"],
        stop_token="eos" if varlen else None,  # None: no EOS stop, exactly `new_tokens` tokens
        temperature=1.0,  # lit_rlhf's default (TRL's is 0.7); cost is the same
        num_sample_generations=0,  # no debugging generations (they need an eval set anyway)
    )
    timer = _timer()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         callbacks=[timer])

    if varlen:  # the same biased model as run.py's, in every forward of the policy and the reference
        _raise_eos([trainer.policy_model, trainer.ref_model], tokenizer.eos_token_id, cfg["eos_bias"])

    # Time the sampling alone (run.py's `ppo_generate_tokens_per_s`: KV-cached sampling), and
    # check the response length.
    generate_s: list[float] = []
    lengths: list[float] = []
    batch_generation = ppo_trainer.batch_generation

    def timed_batch_generation(model, queries, *rest, **kwargs):
        start = time.perf_counter()
        query_responses, logits = batch_generation(model, queries, *rest, **kwargs)
        generate_s.append(time.perf_counter() - start)
        width = query_responses.shape[1] - queries.shape[1]
        if width > cfg["new_tokens"] or (width != cfg["new_tokens"] and not varlen):
            raise RuntimeError(f"generated {width} tokens, expected {cfg['new_tokens']}")
        responses = query_responses[:, queries.shape[1]:]
        # Each row's tokens up to and with its first EOS (all of them if none): what was sampled.
        ends = [row.index(tokenizer.eos_token_id) + 1 if varlen and tokenizer.eos_token_id in row else width
                for row in responses.tolist()]
        lengths.append(sum(ends) / len(ends))
        return query_responses, logits

    ppo_trainer.batch_generation = timed_batch_generation
    trainer.train()
    _check_no_checkpointing(policy, value_model)
    _check_precision(trainer, precision)
    step = _median_after_warmup(timer.times, w, "ppo")
    sample = statistics.median(generate_s[w["warmup"]:])
    out = {"ppo_episodes_per_s": cfg["batch_size"] / step,
           "ppo_generate_tokens_per_s": cfg["batch_size"] * cfg["new_tokens"] / sample}
    if varlen:  # as run.py: the median of the timed steps' own sampling rates, and the mean length
        rates = [cfg["batch_size"] * n / s for n, s in zip(lengths[w["warmup"]:], generate_s[w["warmup"]:])]
        out.update(ppo_generate_tokens_per_s=statistics.median(rates),
                   ppo_mean_response_length=statistics.mean(lengths[w["warmup"]:]))
    return out


def _raise_eos(models, eos: int, bias: float) -> None:
    """Add ``bias`` to the EOS logit in every forward of each of ``models`` (causal LMs), as
    run.py's ``_raise_eos`` does to lit_rlhf's policy and reference."""
    import torch

    for model in models:
        model.get_output_embeddings().register_forward_hook(
            lambda mod, args, out: out.index_add(-1, torch.tensor([eos], device=out.device),
                                                 torch.full((*out.shape[:-1], 1), bias, dtype=out.dtype,
                                                            device=out.device)))


class _PhaseMarks:
    """Tells a SmapsSampler where each PPO step starts (a ``TrainerCallback``; made one in ``_phase_marks()``).

    PPOTrainer fires ``on_train_begin`` once and ``on_step_end`` after each rollout + update.
    """

    def __init__(self, sampler) -> None:
        self.sampler, self.steps = sampler, 0
        self.cpu_per_wall: list[float] = []  # process CPU s per wall s of each step: ~threads if uncontended

    def _mark(self, name: str) -> None:
        self.sampler.phase(name)
        self._clock = time.perf_counter(), time.process_time()

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark("step 1")

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = time.perf_counter() - self._clock[0], time.process_time() - self._clock[1]
        self.cpu_per_wall.append(cpu / wall)
        self.steps += 1
        self._mark(f"step {self.steps + 1}" if self.steps < state.max_steps else "end")


def _phase_marks(sampler):
    from transformers import TrainerCallback

    return type("PhaseMarksCallback", (_PhaseMarks, TrainerCallback), {})(sampler)


def _memory_checkpoints(w: dict, in_subprocess: bool = False) -> tuple:
    """The memory workloads' random-init checkpoints: (causal LM, sequence classifier), bf16."""
    from memory import bench_cache, random_checkpoint

    arch = w["memory"]["arch"]
    return tuple(random_checkpoint(arch, bench_cache(), task, in_subprocess=in_subprocess)
                 for task in ("causal_lm", "seq_cls"))


def bench_ppo_pss(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    """Peak memory and seconds per step of two PPO steps (rollout + update) on 4-bit NF4 bases with LoRA.

    The memory workloads' job (``w["memory"]``): the peaks (PSS, anonymous RSS, VmHWM; see
    ``memory.SmapsSampler``) cover everything from loading the three models to the end of the
    second step; the step time is the median of the two step times (with two steps, their mean).
    """
    import torch
    from datasets import Dataset
    from memory import SmapsSampler
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BitsAndBytesConfig,
    )

    from lit_rlhf.models import disable_cpu_4bit_repacking

    if precision != "bf16-mixed":
        raise ValueError(f"ppo_pss runs in bf16-mixed only, not {precision}")
    # As bench_ppo: the accelerate-launch way is the only way into PPOTrainer's Accelerator.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    cfg = w["memory"]
    steps = w["warmup"] + w["timed"]
    # Built by the parent process (main) already; a fresh process would build one here, outside
    # this process's VmHWM.
    policy_path, scorer_path = _memory_checkpoints(w, in_subprocess=True)
    g = torch.Generator().manual_seed(0)
    vocab = min(cfg["arch"]["vocab_size"], len(tokenizer))  # ids the demo tokenizer has
    ids = torch.randint(2, vocab, (steps * cfg["batch_size"], cfg["prompt_len"]), generator=g)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    lora = cfg["lora"]

    def lora_config(task_type):
        return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          target_modules=lora["target_modules"], task_type=task_type)

    load = dict(dtype=torch.bfloat16, device_map={"": "cpu"},
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16,
                                                       bnb_4bit_use_double_quant=True))
    with SmapsSampler() as sampler:
        sampler.phase("load")
        policy = AutoModelForCausalLM.from_pretrained(policy_path, **load)
        # Value and reward model: one sequence-classifier checkpoint (a value model started from
        # the reward model), each loaded on its own.
        value_model = AutoModelForSequenceClassification.from_pretrained(scorer_path, **load)
        reward_model = AutoModelForSequenceClassification.from_pretrained(scorer_path, **load)
        for model in (policy, value_model, reward_model):
            # The guard lit_rlhf's loader applies (a no-op on CPUs without AVX512-BF16): the same
            # 4-bit layout on both sides.
            disable_cpu_4bit_repacking(model)
        # PPOTrainer takes one `peft_config`, for the policy; the value model gets its adapter
        # here. SEQ_CLS makes the score head a trained `modules_to_save` copy.
        value_model = get_peft_model(value_model, lora_config(TaskType.SEQ_CLS))
        args = PPOConfig(
            # bf16=False: in PPOTrainer its only effect is that a 4-bit peft policy gets
            # `peft_module_casting_to_bf16`, which casts the norms to fp32; the rollout (not
            # autocast) then feeds fp32 hidden states to the bf16 LM head and fails. The mixed
            # precision of the update comes from ACCELERATE_MIXED_PRECISION, as in bench_ppo.
            **{**_common_args(precision, steps, out_dir, cfg["batch_size"]), "bf16": False},
            total_episodes=steps * cfg["batch_size"],  # one PPO update per rollout batch: `steps` updates
            num_ppo_epochs=cfg["ppo_epochs"],
            num_mini_batches=cfg["batch_size"] // cfg["mini_batch_size"],
            response_length=cfg["new_tokens"],
            stop_token=None,  # no EOS stop: exactly `new_tokens` tokens
            temperature=1.0,
            num_sample_generations=0,
        )
        timer = _timer()
        # ref_model=None with a peft policy: the reference is the policy with its adapter disabled.
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                             callbacks=[timer, marks := _phase_marks(sampler)],
                             peft_config=lora_config(TaskType.CAUSAL_LM))
        if trainer.ref_model is not None or not trainer.is_peft_model:
            raise RuntimeError("PPOTrainer built a reference model: the adapter-disabled policy was wanted")
        _check_trainable(trainer)

        def timed_batch_generation(model, queries, *rest, **kwargs):
            query_responses, logits = batch_generation(model, queries, *rest, **kwargs)
            responses = query_responses[:, queries.shape[1]:]
            if responses.shape[1] != cfg["new_tokens"]:
                raise RuntimeError(f"generated {responses.shape[1]} tokens, expected {cfg['new_tokens']}")
            # A row that EOS ended would be EOS and then pads only.
            for row in responses.tolist():
                if tokenizer.eos_token_id in row[:-1]:
                    rest_ = row[row.index(tokenizer.eos_token_id) + 1:]
                    if all(t == tokenizer.pad_token_id for t in rest_):
                        raise RuntimeError("generation stopped at EOS")
            return query_responses, logits

        batch_generation = ppo_trainer.batch_generation
        ppo_trainer.batch_generation = timed_batch_generation
        trainer.train()
    _check_no_checkpointing(trainer.policy_model, trainer.value_model)
    _check_precision(trainer, precision)
    peaks = sampler.figures
    for name, phase in sampler.phases.items():
        print(f"[trl-bench] ppo_pss {name}: peak PSS {phase['peak_pss_mb']:.0f} MiB, "
              f"anon {phase['peak_rss_anon_mb']:.0f} MiB", file=sys.stderr)
    print(f"[trl-bench] ppo_pss: {peaks['samples']} samples, {peaks['pss_samples']} of smaps_rollup (peak read "
          f"{peaks['peak_pss_read_mb']:.0f} MiB), sampler CPU {peaks['sampler_cpu_s']:.1f} s; "
          f"step times {[round(t, 1) for t in timer.times]} s, CPU/wall {[round(r, 2) for r in marks.cpu_per_wall]}",
          file=sys.stderr)
    return {"ppo_peak_pss_mb": peaks["peak_pss_mb"], "ppo_peak_rss_anon_mb": peaks["peak_rss_anon_mb"],
            "ppo_peak_rss_mb": peaks["peak_rss_mb"], "ppo_s_per_step": _median_after_warmup(timer.times, w, "ppo_pss")}


def _check_trainable(trainer) -> None:
    """Only LoRA weights (policy and value model) and the value model's score head train."""
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    policy = [n for n in names if n.startswith("policy.")]
    value = [n for n in names if n.startswith("value_model.")]
    wrong = [n for n in policy if "lora_" not in n] + [n for n in value if "lora_" not in n and ".score." not in n]
    if wrong or not policy or not any(".score." in n for n in value) or len(policy) + len(value) != len(names):
        raise RuntimeError(f"unexpected trainable parameters: {wrong[:5] or names[:5]}")


def _init_checkpoint(w: dict, tokenizer, out_dir: str) -> str:
    """The random-init policy (``_model(..., seed=0)``) saved: DPO's and GRPO's reference loads from it.

    DPOTrainer (``ref_model=None``) and GRPOTrainer (``beta != 0``) build the reference with
    ``create_model_from_path(model.config._name_or_path)``: a fresh load of the policy's checkpoint,
    not a copy of the model in memory. So both get the policy as this path, and TRL loads the
    policy and its reference (fp32) from the same weights.
    """
    path = os.path.join(out_dir, "init")
    _model(_llama_config(w, tokenizer), "causal_lm", seed=0).save_pretrained(path)
    return path


def bench_dpo(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    from datasets import Dataset
    from pairs import random_dpo_pairs
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        # TRL 1.12's `_prepare_dataset` always extracts, EOS-terminates and tokenizes `prompt`/`chosen`/
        # `rejected` text; the columns its collator reads are `prompt_ids`/`chosen_ids`/`rejected_ids`.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    cfg = w["dpo"]
    steps = w["warmup"] + w["timed"]
    triples = random_dpo_pairs(w)  # the same (prompt, chosen, rejected) ids as run.py
    dataset = Dataset.from_dict({"prompt_ids": [p for p, _, _ in triples], "chosen_ids": [c for _, c, _ in triples],
                                 "rejected_ids": [r for _, _, r in triples]})
    args = DPOConfig(**_common_args(precision, steps, out_dir, cfg["batch_size"]),
                     max_length=cfg["prompt_max"] + cfg["response_max"],  # nothing is truncated
                     beta=cfg["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=False)
    timer = _timer()
    trainer = PreTokenizedDPOTrainer(model=_init_checkpoint(w, tokenizer, out_dir), ref_model=None, args=args,
                                     train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    if trainer.ref_model is None:
        raise RuntimeError("DPOTrainer built no reference model")
    # Record how much of each batch is padding: the collator stacks the 2 * batch_size rows
    # prompt+chosen and prompt+rejected and right-pads them all to the longest one.
    collate, real, padded = trainer.data_collator, [], []

    def recording_collate(examples):
        batch = collate(examples)
        if batch["input_ids"].shape[0] != 2 * len(examples):
            raise RuntimeError(f"DPO batch has {batch['input_ids'].shape[0]} rows for {len(examples)} pairs")
        real.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    trainer.data_collator = recording_collate
    trainer.train()
    expected_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in triples)
    if sum(real) != expected_tokens:
        raise RuntimeError(f"DPO trained on {sum(real)} tokens, expected {expected_tokens} (truncated or dropped)")
    _check_no_checkpointing(trainer.model, trainer.ref_model)
    _check_precision(trainer, precision)
    step = _median_after_warmup(timer.times, w, "dpo")
    return {"dpo_pairs_per_s": cfg["batch_size"] / step, "dpo_padding_fraction": 1 - sum(real) / sum(padded)}


def bench_grpo(w: dict, precision: str, tokenizer, out_dir: str, varlen: bool = False) -> dict:
    """``varlen``: completions end at EOS (the model's EOS logit raised by ``grpo_varlen.eos_bias``,
    as in run.py), up to ``grpo_varlen.new_tokens``; keys ``grpo_varlen_*``."""
    from datasets import Dataset
    from pairs import low_id_fraction, random_prompts
    from trl import GRPOConfig, GRPOTrainer

    class PreTokenizedGRPOTrainer(GRPOTrainer):
        # TRL 1.12 reads prompts only as text (`processing_class(text=prompts)`), and the demo
        # tokenizer (2,048 tokens) cannot round-trip the workload's ids (vocabulary 8,000): the
        # `prompt` column holds the ids written out, and this parses them back.
        def _tokenize_prompts(self, prompts):
            return [[int(t) for t in prompt.split()] for prompt in prompts], None, {}

    def low_id_reward(completions, completion_ids, **kwargs):
        return [low_id_fraction(ids) for ids in completion_ids]

    cfg = dict(w["grpo"], **({"new_tokens": w["grpo_varlen"]["new_tokens"]} if varlen else {}))
    steps = w["warmup"] + w["timed"]
    completions = cfg["prompts"] * cfg["generations"]
    dataset = Dataset.from_dict({"prompt": [" ".join(map(str, p)) for p in random_prompts(w)]})
    args = GRPOConfig(
        # TRL counts the batch in completions: 32 completions per optimizer step.
        **_common_args(precision, steps, out_dir, completions),
        num_generations=cfg["generations"],
        steps_per_generation=1,  # generate every step, one optimizer step per generation batch
        num_iterations=1,
        max_completion_length=cfg["new_tokens"],
        # Fixed length: EOS never ends a completion; varlen: it does.
        generation_kwargs={} if varlen else {"min_new_tokens": cfg["new_tokens"]},
        temperature=1.0, top_p=1.0, top_k=0,  # top_k=0: transformers adds no top-k warper
        beta=cfg["kl_loss_coef"],  # k3 KL term: the reference pass runs
        loss_type="dapo",  # token mean over the generation batch
        scale_rewards="group",
        use_vllm=False,
    )
    timer = _timer()
    trainer = PreTokenizedGRPOTrainer(model=_init_checkpoint(w, tokenizer, out_dir), reward_funcs=low_id_reward,
                                      args=args, train_dataset=dataset, processing_class=tokenizer,
                                      callbacks=[timer])
    if trainer.ref_model is None:
        raise RuntimeError("GRPOTrainer built no reference model")
    if varlen:  # the same biased model as run.py's, in every forward of the policy and the reference
        _raise_eos([trainer.model, trainer.ref_model], tokenizer.eos_token_id, w["grpo_varlen"]["eos_bias"])
    lengths: list[float] = []

    # Time the sampling alone (HF generate, KV cache) and check the prompt and completion lengths.
    generate_s: list[float] = []
    generate_single_turn = trainer._generate_single_turn

    def timed_generate(prompt_ids, *rest, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = generate_single_turn(prompt_ids, *rest, **kwargs)
        generate_s.append(time.perf_counter() - start)
        sizes = {len(ids) for ids in prompt_ids}, {len(ids) for ids in completion_ids}
        ok = sizes[0] == {cfg["prompt_len"]} and (max(sizes[1]) <= cfg["new_tokens"] if varlen
                                                  else sizes[1] == {cfg["new_tokens"]})
        if len(completion_ids) != completions or not ok:
            raise RuntimeError(f"generated {len(completion_ids)} completions, prompt/completion lengths {sizes}")
        lengths.append(sum(len(ids) for ids in completion_ids) / len(completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    trainer.train()
    _check_no_checkpointing(trainer.model, trainer.ref_model)
    _check_precision(trainer, precision)
    step = _median_after_warmup(timer.times, w, "grpo")
    sample = _median_after_warmup(generate_s, w, "grpo generation")
    if varlen:
        return {"grpo_varlen_completions_per_s": completions / step,
                "grpo_varlen_mean_response_length": statistics.mean(lengths[w["warmup"]:])}
    return {"grpo_completions_per_s": completions / step,
            "grpo_generate_tokens_per_s": completions * cfg["new_tokens"] / sample}


def bench_grpo_varlen(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    """GRPO on completions that end at EOS (keys ``grpo_varlen_*``), as run.py's stage."""
    return bench_grpo(w, precision, tokenizer, out_dir, varlen=True)


def bench_grpo_long(w: dict, precision: str, tokenizer, out_dir: str) -> dict:
    """The GRPO stage with ``grpo_long.prompt_len``-token prompts (keys ``grpo_long_*``)."""
    from pairs import with_long_prompts

    return with_long_prompts(bench_grpo, w, precision, tokenizer, out_dir)


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(w: dict, stage: str, precision: str) -> dict:
    """One stage in this process; returns its figures (names without the precision suffix)."""
    import torch
    import trl

    sys.path.insert(0, str(REPO))
    from lit_rlhf.models import load_tokenizer

    if stage in PPO_STAGES and trl.__version__ != PPO_TRL:
        raise RuntimeError(f"the PPO stages run on trl {PPO_TRL} (see trl_for), this process has {trl.__version__}")

    torch.set_num_threads(w["threads"])
    torch.manual_seed(0)
    tokenizer = load_tokenizer("demo")
    bench = {"sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo, "dpo": bench_dpo,
             "grpo": bench_grpo, "grpo_long": bench_grpo_long, "grpo_varlen": bench_grpo_varlen,
             **MEMORY_BENCHES}[stage]
    with tempfile.TemporaryDirectory() as tmp:
        out = bench(w, precision, tokenizer, tmp)
    if torch.get_num_threads() != w["threads"]:
        raise RuntimeError(f"torch threads changed to {torch.get_num_threads()} during the run")
    if stage not in MEMORY_BENCHES:  # those report their own peaks
        out[f"{stage}_peak_memory_mb"] = _peak_memory_mb()
    return out


# The memory workloads' jobs that TRL has. run.py's `ppo_pss_separate_rm` is not one: it is
# lit_rlhf's variant with the reward model as a model of its own, and TRL's reward model is
# always one (so `ppo_pss` is TRL's only memory job).
MEMORY_BENCHES = {"ppo_pss": bench_ppo_pss}

# PPO left TRL after 1.12.0: its stages run on that release, installed aside (no dependencies:
# the rest of the environment is the bench extra's) and put first on the child's path.
PPO_TRL = "1.12.0"
PPO_STAGES = {"ppo", "ppo_pss"}


def trl_for(stage: str) -> dict[str, str]:
    """Environment variables for a stage's child process: TRL 1.12.0 first on the path for PPO."""
    if stage not in PPO_STAGES:
        return {}
    base = os.environ.get("LIT_RLHF_BENCH_CACHE") or Path.home() / ".cache" / "lit_rlhf" / "bench"
    target = Path(base) / f"trl-{PPO_TRL}"
    if not (target / "trl").is_dir():
        print(f"[trl-bench] installing trl=={PPO_TRL} (PPO) into {target}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"trl=={PPO_TRL}"], check=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def _workload(name: str, steps_override: str | None) -> dict:
    """run.py's workload (imported in this parent process only: the children get it as JSON)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from run import WORKLOADS, with_steps

    return json.loads(json.dumps(with_steps(WORKLOADS[name], steps_override)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny-cpu", help="a key of run.py's WORKLOADS")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--stages", default="sft,rm,ppo,dpo,grpo")
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="comma-separated precisions")
    parser.add_argument("--steps-override", metavar="[WARMUP,]TIMED",
                        help="for smoke tests: TIMED timed steps after WARMUP (default 1) warm-up steps")
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD_JSON", "STAGE", "PRECISION"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        w, stage, precision = json.loads(opts.one[0]), opts.one[1], opts.one[2]
        print(json.dumps(run_one(w, stage, precision)))
        return

    import torch
    import transformers
    import trl

    w = _workload(opts.workload, opts.steps_override)
    results: dict = {"implementation": f"trl {trl.__version__} (transformers {transformers.__version__})",
                     "workload": opts.workload, "torch_threads": w["threads"],
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "warmup": w["warmup"], "timed": w["timed"]}
    start = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # each child decides its own precision
    if "memory" in w:
        # The workload's own jobs (--stages and --precisions do not apply), those TRL has.
        jobs = [(stage, precision) for stage, precision in w["jobs"] if stage in MEMORY_BENCHES]
        # Build the checkpoints now, in a process of their own: not inside a job's VmHWM.
        _memory_checkpoints(w, in_subprocess=True)
    else:
        jobs = [(stage, precision) for precision in ("32-true", "bf16-mixed") if precision in opts.precisions.split(",")
                for stage in opts.stages.split(",")]
    for stage, precision in jobs:
        print(f"[trl-bench] {stage} {precision}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--out", "-", "--one", json.dumps(w), stage, precision],
                              capture_output=True, text=True, env={**env, **trl_for(stage)})
        if proc.returncode != 0:
            sys.exit(f"{stage} {precision} failed:\n{proc.stderr[-3000:]}")
        # The job's own notes (e.g. ppo_pss's peak per phase).
        print("".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith("[trl-bench]")),
              end="", file=sys.stderr, flush=True)
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        # Memory workloads are bf16 only and name their keys without the precision suffix.
        suffix = "_bf16" if precision == "bf16-mixed" and "memory" not in w else ""
        results.update({k + suffix: round(v, 4 if "fraction" in k else 2) for k, v in figures.items()})
    if any(stage in PPO_STAGES for stage, _ in jobs):
        results["ppo_implementation"] = f"trl {PPO_TRL}"
    results["wall_s"] = round(time.perf_counter() - start, 1)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
