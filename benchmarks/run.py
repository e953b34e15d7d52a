"""Per-stage throughput and peak memory, measured through the real LightningModules and Trainer.

    python benchmarks/run.py --workload tiny-cpu --out results.json
    python benchmarks/run.py --workload gpu --out gpu.json      # on a CUDA machine

Each (stage, precision) runs in its own process, so peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) belongs to that stage alone. Every figure is
the median over timed steps after warm-up steps. The workload is fixed so that results
compare across implementations (see WORKLOADS).

Workloads:

* ``tiny-cpu``: SFT, RM, PPO, DPO and GRPO throughput of an 8.3M-parameter Llama in fp32 and
  bf16 mixed, the workload that ``benchmarks/trl_baseline.py`` runs on TRL.
* ``gpu``: SFT model FLOPs utilisation (MFU) of a 1.1B Llama in bf16 mixed at 2,048 tokens,
  and the peak GPU memory of one PPO step (rollout + update) with a 4-bit NF4 base + LoRA
  for Llama shapes of 1.1B, 7B, 13B and 20B parameters (a stage that runs out of memory is
  reported as ``"oom"``).
  ``--quick``: SFT MFU and the 1.1B PPO step only, fewer steps (what ``scripts/gpu_check.sh`` runs).
* ``gpu-tiny``: the ``gpu`` workload's code on tiny shapes, so that tests can run it on a CPU.
* ``tiny-cpu-smoke``: the ``tiny-cpu`` workload's code on tiny shapes, for the same reason.
* ``small-cpu``: the same stages at a realistic shape: a 134M-parameter Llama (12 layers, 768
  wide, vocabulary 32,000), SFT and RM/DPO sequences up to 512 tokens, PPO and GRPO-varlen
  responses that end at EOS, spread up to 256 tokens (GRPO: exactly 128), fp32 and bf16 mixed,
  also run on TRL (``benchmarks/compare.py --workload small-cpu``); ``small-cpu-smoke`` is its
  code on tiny shapes, for the tests.
* ``memory-cpu``: the CPU memory of two PPO steps (rollout + update; 8 prompts of 32 tokens,
  exactly 32 new tokens, one PPO epoch, one mini-batch) of a 1.1B Llama (TinyLlama's shape)
  loaded 4-bit NF4 from a random-init bf16 checkpoint, with LoRA r=16 on all linear layers:
  peak PSS, anonymous RSS and VmHWM sampled from ``/proc`` over the whole job, loading
  included (``benchmarks/memory.py``), and seconds per step; ``ppo_pss`` and
  ``ppo_pss_separate_rm`` (the reward model a separate model). Keys carry no ``_bf16``.
* ``memory-tiny-cpu``: the ``memory-cpu`` workload's code on the ``tiny-cpu`` shape;
  ``memory-smoke`` on a 2-layer model, for the tests.
* ``memory-real``: the peak resident memory of a whole ``train.py fit`` of GRPO (full fine-tuning)
  at Qwen2.5-0.5B's shape cut to 4 layers (vocabulary 151,936), 4 prompts x 4 completions x 512
  response tokens, fp32 and bf16 mixed, beside ``lit-rlhf estimate``'s prediction for the same
  config (``grpo_fit_*``); ``memory-real-smoke`` on a 2-layer model, for the tests.
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

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKLOADS = {
    "tiny-cpu": dict(
        # Llama from config, random init (seed 0), untied embeddings.
        arch=dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=1024, vocab_size=8000, max_position_embeddings=512,
                  tie_word_embeddings=False),
        threads=2,
        sft=dict(seq_length=256, batch_size=8),
        rm=dict(batch_size=8, min_len=32, max_len=256),
        ppo=dict(batch_size=8, prompt_len=12, new_tokens=40, ppo_epochs=4),
        # DPO: full fine-tuning against a frozen copy, sigmoid loss; 8 pairs per step.
        dpo=dict(batch_size=8, prompt_min=16, prompt_max=64, response_min=16, response_max=192, beta=0.1),
        # GRPO: 4 prompts x 8 generations = 32 completions per step, exactly 32 new tokens,
        # KL as a k3 loss term (coefficient 0.04, so the reference pass runs), token-mean loss.
        grpo=dict(prompts=4, prompt_len=12, generations=8, new_tokens=32, kl_loss_coef=0.04),
        # The same with 128-token prompts (fp32 only): what running a group's prompt once saves.
        grpo_long=dict(prompt_len=128),
        # Responses that end at EOS, as real ones do: the model's EOS logit raised by eos_bias, so
        # lengths spread from 1 to the 64-token cap (mean about 30); the passes carry padding
        # unless packed. grpo_varlen_padded: the same with the padding-free passes off.
        grpo_varlen=dict(new_tokens=64, eos_bias=5.0),
        # grpo_compiled, grpo_varlen_compiled: the GRPO stages with sampling.decoder: compiled (a
        # static KV cache, the decode step under torch.compile; the compile falls in the warm-up
        # and is reported as *_compile_s).
        warmup=3,
        timed=10,
        jobs=[(stage, precision) for precision in ("32-true", "bf16-mixed")
              for stage in ("sft", "rm", "ppo", "dpo", "grpo", "grpo_varlen")]
             + [("grpo_long", "32-true"), ("grpo_varlen_padded", "32-true"), ("grpo_compiled", "32-true"),
                ("grpo_varlen_compiled", "32-true")],
    ),
}


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = 32000) -> dict:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=4096, tie_word_embeddings=False)


# Shapes of TinyLlama-1.1B, Llama-2-7B and Llama-2-13B, and a 20B Llama (GPT-NeoX-20B's width,
# depth and vocabulary), all random init: memory and speed do not depend on the weights.
GPU_ARCHS = {
    "1b": _llama(2048, 22, 32, 4, 5632),
    "7b": _llama(4096, 32, 32, 32, 11008),
    "13b": _llama(5120, 40, 40, 40, 13824),
    "20b": _llama(6144, 44, 48, 48, 16384, vocab=50432),
}
TINY_ARCHS = {"tiny": _llama(64, 2, 4, 2, 128, vocab=1000)}


def _gpu_workload(archs: dict, sft_arch: dict, seq_length: int, new_tokens: int) -> dict:
    return dict(
        threads=None,
        sft=dict(arch=sft_arch, seq_length=seq_length, batch_size=4),
        ppo_memory=dict(archs=archs, batch_size=8, prompt_len=64, new_tokens=new_tokens, mini_batch_size=4,
                        lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")),
        warmup=3,
        timed=10,
        jobs=[("sft_mfu", "bf16-mixed")] + [(f"ppo_memory:{name}", "bf16-mixed") for name in archs],
        # --quick: the smallest shape only (its random-init checkpoint, written once to be
        # quantized on load, is 2.2 GB; the 20B one would be 40 GB), fewer steps.
        quick=dict(warmup=2, timed=5, jobs=[("sft_mfu", "bf16-mixed"), (f"ppo_memory:{next(iter(archs))}", "bf16-mixed")]),
    )


# The tiny-cpu workload's code on tiny shapes: what the test suite runs (figures unchecked).
WORKLOADS["tiny-cpu-smoke"] = dict(
    WORKLOADS["tiny-cpu"], arch=dict(TINY_ARCHS["tiny"], max_position_embeddings=512),
    sft=dict(seq_length=64, batch_size=4), rm=dict(batch_size=4, min_len=16, max_len=64),
    ppo=dict(batch_size=4, prompt_len=8, new_tokens=8, ppo_epochs=1),
    dpo=dict(batch_size=2, prompt_min=4, prompt_max=8, response_min=4, response_max=16, beta=0.1),
    grpo=dict(prompts=2, prompt_len=6, generations=4, new_tokens=8, kl_loss_coef=0.04), grpo_long=dict(prompt_len=24),
    grpo_varlen=dict(new_tokens=16, eos_bias=5.0),
)
WORKLOADS["tiny-cpu-smoke"]["jobs"] = [job for job in WORKLOADS["tiny-cpu"]["jobs"] if job[0] != "grpo_compiled"]

# Speed where users are: the tiny-cpu stages at a realistic shape, where per-call overhead no longer
# dominates (a gain measured at tiny-cpu may not exist here). A Llama of 12 layers, 768 wide, 12
# heads, MLP 2,048 (SwiGLU's 8/3 x 768), vocabulary 32,000, untied: 134M parameters, 109.5M of them
# in matrix products (tiny-cpu: 6.2M), random init.
#
# Step counts: `compare.py --workload small-cpu --repeats 1 --precisions 32-true` (12 jobs, each
# stage on both implementations) should end within 90 minutes on the 2-core development machine.
# Estimated from tiny-cpu's fp32 step times (RESULTS.md, 2026-12-07 night; ours / TRL's) scaled by
# each stage's FLOPs (same FLOP rate assumed, 6N per trained token + 2N per scored one), and
# sampling from a measured decode rate at this shape (GUIDE: HF generate, 32 rows x 128 tokens at
# ~213 tok/s in fp32, ~150 ms a step; taken as ~22 ms + 4 ms per row, and runs to the 256 cap):
#   SFT   4 x 512 tokens, 714M FLOP/token vs 40.6M at 2,048 tokens: x17.6; 0.58 / 0.99 s -> 10 / 17 s
#   RM    4 pairs, 2,176 tokens (32-512 each) at 539M vs 2,304 at 27M: x19; 0.41 / 0.80 s -> 8 / 15 s
#   DPO   4 pairs, 2,240 tokens, policy 6N + frozen copy 2N: x17; 0.90 / 2.22 s -> 15 / 38 s
#   PPO   8 x (32 + <=256) tokens padded, 2 epochs; passes 4.4 TFLOP at tiny's 107 GFLOP/s -> 41 s,
#         sampling 256 steps x 54 ms -> 14 s: ~55 s; TRL (value model trained too, 6.7 TFLOP) ~90 s
#   GRPO  4 x 4 completions of 128 tokens: sampling ~11 s + passes 2.4 TFLOP ~20 s: ~30 s; TRL ~41 s
#   GRPO-varlen 4 x 4 up to 256 (mean ~105): sampling ~13-22 s + packed passes ~15-19 s: ~35 s;
#         TRL pads the passes to the longest (4.0 TFLOP) and samples every row to the end: ~75 s
# With 1 warm-up + 4 timed steps: ~36 min of steps + ~9 min of process start, model building
# and checkpoint saving (12 jobs) = ~45 min, half the budget (the machine's speed varies by up to
# 20% between runs, and the decode rate is the least certain figure). PPO runs 2 epochs (tiny-cpu:
# 4) to stay in it: at 4 its step would be ~95 s ours, ~180 s TRL's. Checked here (2026-12-07, AMD
# EPYC, other jobs running): a forward + backward of 2 x 512 tokens took 4.7 s (155 GFLOP/s, as
# assumed); single-threaded, a decode step's 2048 x 768 linear took 0.44 ms at 8 rows and the LM
# head 17 ms (a ~40 ms step at 8 rows, under the 54 ms taken). On a busy machine the estimate does
# not hold: with both cores taken, each 2-thread linear waits on its threads (2048 x 768 at 8 rows:
# 5-11 ms instead of 0.44) and a decode step took 1-1.7 s. Run it on an otherwise idle machine.
WORKLOADS["small-cpu"] = dict(
    arch=dict(model_type="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12, intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024,
              tie_word_embeddings=False),
    threads=2,
    sft=dict(seq_length=512, batch_size=4),
    rm=dict(batch_size=4, min_len=32, max_len=512),
    # Responses end at EOS (eos_bias, as grpo_varlen below), up to new_tokens: a sampler that lets
    # finished rows go and passes that skip padding are measured, as real responses need them.
    ppo=dict(batch_size=8, prompt_len=32, new_tokens=256, ppo_epochs=2, eos_bias=5.5),
    # Prompt + response at most 128 + 384 = 512 tokens.
    dpo=dict(batch_size=4, prompt_min=16, prompt_max=128, response_min=32, response_max=384, beta=0.1),
    grpo=dict(prompts=4, prompt_len=32, generations=4, new_tokens=128, kl_loss_coef=0.04),
    grpo_long=dict(prompt_len=256),
    # EOS raised by e^5.5 = 245 over 32,000 ids: the random-init model's mean EOS probability was
    # 1/118 over one forward, so lengths spread over 1..256, mean ~105, ~11% at the cap.
    grpo_varlen=dict(new_tokens=256, eos_bias=5.5),
    warmup=1,
    timed=4,
    jobs=[(stage, precision) for precision in ("32-true", "bf16-mixed")
          for stage in ("sft", "rm", "ppo", "dpo", "grpo", "grpo_varlen")],
)
# The small-cpu workload's code on tiny shapes (PPO's responses end at EOS, as there): for the tests.
# One thread: at these shapes a 2-thread op on a busy machine mostly waits for its second thread.
WORKLOADS["small-cpu-smoke"] = dict(
    WORKLOADS["tiny-cpu-smoke"], ppo=dict(WORKLOADS["tiny-cpu-smoke"]["ppo"], new_tokens=16, eos_bias=5.0),
    threads=1, warmup=1, timed=1, jobs=WORKLOADS["small-cpu"]["jobs"])
WORKLOADS["gpu"] = _gpu_workload(GPU_ARCHS, GPU_ARCHS["1b"], seq_length=2048, new_tokens=128)
WORKLOADS["gpu-tiny"] = _gpu_workload(TINY_ARCHS, TINY_ARCHS["tiny"], seq_length=64, new_tokens=8)

# CPU memory of PPO at a real size: a 1.1B policy in 4-bit NF4 with LoRA, two rollout + update
# steps, the peaks sampled from /proc (benchmarks/memory.py). Keys carry no precision suffix:
# the jobs are bf16 only.
WORKLOADS["memory-cpu"] = dict(
    threads=2,
    memory=dict(arch=GPU_ARCHS["1b"], batch_size=8, prompt_len=32, new_tokens=32, ppo_epochs=1, mini_batch_size=8,
                lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")),
    warmup=0,
    timed=2,
    jobs=[("ppo_pss", "bf16-mixed"), ("ppo_pss_separate_rm", "bf16-mixed")],
)
# The memory-cpu workload's code on the tiny-cpu workload's shape (about 20 s per step on 2
# cores: bitsandbytes dequantizes every 4-bit weight on every CPU forward).
WORKLOADS["memory-tiny-cpu"] = dict(
    WORKLOADS["memory-cpu"], memory=dict(WORKLOADS["memory-cpu"]["memory"], arch=WORKLOADS["tiny-cpu"]["arch"]))
# The same code on a 2-layer, 64-wide model and 4 new tokens: what the test suite runs.
WORKLOADS["memory-smoke"] = dict(
    WORKLOADS["memory-cpu"], timed=1,
    # The demo tokenizer's 2,048 ids: the reward model re-tokenizes the sampled text.
    memory=dict(WORKLOADS["memory-cpu"]["memory"], arch=dict(TINY_ARCHS["tiny"], vocab_size=2048), prompt_len=8, new_tokens=4, batch_size=4,
                mini_batch_size=4))

# The peak memory of a whole GRPO `fit` at a real vocabulary: Qwen2.5-0.5B's published shape
# (151,936 ids, hidden 896, 14 heads, 2 key-value heads, MLP 4864, tied embeddings) cut to 4 of
# its 24 layers, random init, full fine-tuning (so a frozen reference copy), 4 prompts x 4
# completions x 512 response tokens, one rollout. Measured from outside: the fit runs as
# `python train.py fit -c <config>` in its own process, and its peak resident set (VmHWM, from
# wait4) covers everything: imports, loading, the step, the export of model/ at the end. Beside
# it, `lit-rlhf estimate` on the same config (its `total (peak):` line).
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
WORKLOADS["memory-real"] = dict(
    threads=2,
    real=dict(arch=dict(QWEN25_05B, num_hidden_layers=4, max_position_embeddings=2048), prompts=4, generations=4,
              prompt_len=32, new_tokens=512),
    warmup=0, timed=1,
    jobs=[("grpo_fit", "32-true"), ("grpo_fit", "bf16-mixed")],
)
# The same code on a 2-layer, 64-wide model with 4,096 ids and 8 new tokens: what the tests run.
WORKLOADS["memory-real-smoke"] = dict(
    WORKLOADS["memory-real"],
    real=dict(arch=dict(QWEN25_05B, vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256),
              prompts=2, generations=2, prompt_len=8, new_tokens=8),
    jobs=[("grpo_fit", "32-true")],
)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendor data sheets, matched
# against torch.cuda.get_device_name(); --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 125.0, "L4": 121.0, "RTX 4090": 165.0}


class ResetPeakMemory(L.Callback):
    """Start the CUDA peak-memory statistics with training: the peak is the stage's, not that
    of building the random-init model or of an earlier stage in the same process."""

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


class StepTimer(L.Callback):
    """Wall time of each training batch: data, forward, backward and optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def _trainer(precision: str, callbacks, root: Path, **limits) -> L.Trainer:
    """A quiet one-device Trainer; ``limits`` say when to stop (max_steps or limit_train_batches)."""
    return L.Trainer(default_root_dir=root, accelerator="auto", devices=1, precision=precision, max_epochs=1,
                     limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=[ResetPeakMemory(), *callbacks],
                     **limits)


def _time_sft(arch: dict, cfg: dict, w: dict, precision: str, tmp: Path):
    """Median step time (s) of SFT full fine-tuning on random packed rows, and the module."""
    from torch.utils.data import DataLoader

    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import SFTModule

    steps = w["warmup"] + w["timed"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (steps * cfg["batch_size"], cfg["seq_length"]), generator=g)
    rows = [{"input_ids": x, "labels": x, "position_ids": torch.arange(cfg["seq_length"])} for x in ids]
    module = SFTModule(ModelConfig(arch=arch, tokenizer="demo"), seq_length=cfg["seq_length"])
    timer = StepTimer()
    _trainer(precision, [timer], tmp, max_steps=steps).fit(module, DataLoader(rows, batch_size=cfg["batch_size"]))
    return statistics.median(timer.times[w["warmup"]:]), module


def bench_sft(w: dict, precision: str, tmp: Path) -> dict:
    cfg = w["sft"]
    step, _ = _time_sft(w["arch"], cfg, w, precision, tmp)
    return {"sft_tokens_per_s": cfg["batch_size"] * cfg["seq_length"] / step}


def flops_per_token(model: torch.nn.Module, seq_length: int) -> float:
    """Training FLOPs per token, forward + backward: ``6 N + 12 L H T`` (PaLM, appendix B).

    N counts the parameters that take part in matmuls (all but the input embedding), L the
    layers, H the hidden size and T the sequence length (the attention score and value matmuls;
    causal masking is not discounted, as in PaLM's MFU).
    """
    config = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_length


def _device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def bench_sft_mfu(w: dict, precision: str, tmp: Path, peak_tflops: float | None = None) -> dict:
    """SFT tokens/s of the workload's ``sft.arch`` and its model FLOPs utilisation."""
    cfg = w["sft"]
    step, module = _time_sft(cfg["arch"], cfg, w, precision, tmp)
    tokens_per_s = cfg["batch_size"] * cfg["seq_length"] / step
    out = {"sft_tokens_per_s": tokens_per_s,
           "sft_model_tflops": tokens_per_s * flops_per_token(module.model, cfg["seq_length"]) / 1e12}
    peak = peak_tflops or _device_peak_tflops()
    if peak:
        out["sft_mfu"] = out["sft_model_tflops"] / peak
    return out


class _Batches(torch.utils.data.Dataset):
    """Pairs handed out a whole batch of indices at a time, as PairDataset does."""

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        return [self.pairs[i] for i in index]


def _grouped_pair_loader(pairs: list, batch_size: int, warmup: int, collate):
    """The library's own batching of ``pairs``: length-grouped batches, each packed into one row.

    Grouped batches differ widely in size, so the warm-up batches come from pairs of their own
    and the timed steps are one whole epoch over the rest: every length range is timed once,
    instead of whichever batches the warm-up left over.
    """
    from torch.utils.data import DataLoader

    from lit_rlhf.data.preference import PairBatches

    warm = warmup * batch_size
    lengths = [max(len(p[0]), len(p[1])) for p in pairs]

    def epoch(first: int, last: int) -> list[list[int]]:
        sampler = PairBatches(lengths[first:last], batch_size, shuffle=True, seed=0)
        return [[first + i for i in batch] for batch in sampler]

    batches = epoch(0, warm) + epoch(warm, len(pairs))
    return DataLoader(_Batches(pairs), batch_size=None, sampler=batches, collate_fn=collate)


def bench_rm(w: dict, precision: str, tmp: Path) -> dict:
    from pairs import random_pairs

    from lit_rlhf.data.base import collate
    from lit_rlhf.data.preference import pack_pairs
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import RewardModule

    cfg = w["rm"]
    pairs = [(chosen, rejected, 0.0) for chosen, rejected in random_pairs(w)]
    module = RewardModule(ModelConfig(arch=w["arch"], tokenizer="demo"))
    loader = _grouped_pair_loader(pairs, cfg["batch_size"], w["warmup"], collate(pack_pairs, module.tokenizer.pad_token_id))
    timer = StepTimer()
    _trainer(precision, [timer], tmp, max_steps=w["warmup"] + w["timed"]).fit(module, loader)
    step = statistics.median(timer.times[w["warmup"]:])
    return {"rm_pairs_per_s": cfg["batch_size"] / step}


def bench_dpo(w: dict, precision: str, tmp: Path) -> dict:
    """DPO full fine-tuning against a frozen copy of the starting model (one forward per
    model over each packed batch), sigmoid loss, on random (prompt, chosen, rejected) pairs."""
    from pairs import random_dpo_pairs

    from lit_rlhf.data.base import collate
    from lit_rlhf.data.preference import Pair, pack_pairs, shared_prefix
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import DPOModule

    cfg = w["dpo"]
    pairs = []
    for prompt, chosen, rejected in random_dpo_pairs(w):
        c, r = prompt + chosen, prompt + rejected
        pairs.append(Pair(c, r, 0.0, shared_prefix(c, r)))
    module = DPOModule(ModelConfig(arch=w["arch"], tokenizer="demo"), beta=cfg["beta"], loss_type="sigmoid")
    loader = _grouped_pair_loader(pairs, cfg["batch_size"], w["warmup"], collate(pack_pairs, module.tokenizer.pad_token_id))
    timer = StepTimer()
    _trainer(precision, [timer], tmp, max_steps=w["warmup"] + w["timed"]).fit(module, loader)
    if module.ref_model is None:
        raise RuntimeError("the DPO benchmark must run the frozen reference copy")
    step = statistics.median(timer.times[w["warmup"]:])
    return {"dpo_pairs_per_s": cfg["batch_size"] / step}


def _raise_eos(module, eos: int, bias: float) -> None:
    """Every forward of ``module``'s policy and reference gets ``bias`` added to its EOS logit (once
    built, in ``configure_model``), so that random-init models end their responses at EOS.

    ``eos`` and ``bias`` are plain numbers in the hook: torch.compile traces it, and a tokenizer
    attribute breaks the graph."""
    original = module.configure_model

    def configure_model():
        original()
        for policy in (module.policy, module.ref_policy):
            if policy is not None:
                policy.base_model.get_output_embeddings().register_forward_hook(
                    lambda mod, args, out: out.index_add(-1, torch.tensor([eos]),
                                                         torch.full((*out.shape[:-1], 1), bias, dtype=out.dtype)))

    module.configure_model = configure_model


def bench_ppo(w: dict, precision: str, tmp: Path) -> dict:
    """PPO full fine-tuning with a value head and a separate reward model. Fixed-length responses
    of ``ppo.new_tokens``, or, with ``ppo.eos_bias``, responses that end at EOS up to that many
    (``ppo_mean_response_length``; the sampling rate counts the tokens sampled)."""
    from lit_rlhf.models import ModelConfig, load_model, load_tokenizer
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.modules.ppo import KLConfig, PPOConfig, SamplingConfig
    from lit_rlhf.rewards import RewardModelReward

    cfg = w["ppo"]
    tokenizer = load_tokenizer("demo")
    # Reward: a random-init reward model of the same size, loaded like a real export.
    rm = load_model(ModelConfig(arch=w["arch"], tokenizer="demo", seed=1), tokenizer, task="seq_cls")
    rm.save_pretrained(tmp / "rm")
    tokenizer.save_pretrained(tmp / "rm")
    steps = w["warmup"] + w["timed"]
    varlen = "eos_bias" in cfg
    module = PPOModule(
        ModelConfig(arch=w["arch"], tokenizer="demo"),
        RewardModelReward(str(tmp / "rm"), normalize=False, batch_size=cfg["batch_size"]),
        sampling=SamplingConfig(min_new_tokens=cfg["new_tokens"], max_new_tokens=cfg["new_tokens"], stop_at_eos=varlen),
        ppo=PPOConfig(ppo_epochs=cfg["ppo_epochs"], mini_batch_size=cfg["batch_size"]),
        kl=KLConfig(adaptive=False),
        rollout_batch_size=cfg["batch_size"],
    )
    if varlen:
        _raise_eos(module, tokenizer.eos_token_id, cfg["eos_bias"])
    sample_s: list[float] = []
    lengths: list[float] = []
    log_step = module._log_step
    module._log_step = lambda stats: (sample_s.append(float(stats["time/sample_s"])),
                                      lengths.append(float(stats["rollout/response_length"])), log_step(stats))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, w["arch"]["vocab_size"], (steps, cfg["batch_size"], cfg["prompt_len"]), generator=g)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x),
                "prompt": tokenizer.batch_decode(x)} for x in ids]
    timer = StepTimer()
    trainer = _trainer(precision, [timer], tmp, limit_train_batches=steps)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    step = statistics.median(timer.times[w["warmup"]:])
    out = {"ppo_episodes_per_s": cfg["batch_size"] / step,
           "ppo_generate_tokens_per_s": cfg["batch_size"] * cfg["new_tokens"] / statistics.median(sample_s[w["warmup"]:])}
    if varlen:  # the tokens sampled per second of sampling: the median of the timed steps' own rates
        rates = [cfg["batch_size"] * n / s for n, s in zip(lengths[w["warmup"]:], sample_s[w["warmup"]:])]
        out.update(ppo_generate_tokens_per_s=statistics.median(rates),
                   ppo_mean_response_length=statistics.mean(lengths[w["warmup"]:]))
    return out




def bench_grpo(w: dict, precision: str, tmp: Path, varlen: bool = False, packed: bool = True,
               decoder: str = "dynamic") -> dict:
    """GRPO full fine-tuning: prompts x generations completions of exactly ``new_tokens`` tokens,
    group-normalised advantages, token-mean loss, the k3 KL as a loss term (so the reference
    pass runs), one update per batch, gradients clipped at 1.0. ``varlen``: responses end at EOS
    (the model's EOS logit raised by ``grpo_varlen.eos_bias``), up to ``grpo_varlen.new_tokens``;
    ``packed``: the padding-free passes (``grpo.packed``); ``decoder``: ``sampling.decoder``."""
    from pairs import low_id_fraction, random_prompts

    from lit_rlhf.models import ModelConfig, load_tokenizer
    from lit_rlhf.modules import GRPOModule
    from lit_rlhf.modules.grpo import GRPOConfig
    from lit_rlhf.modules.online import SamplingConfig
    from lit_rlhf.rewards import RewardFunction

    cfg = dict(w["grpo"], **({"new_tokens": w["grpo_varlen"]["new_tokens"]} if varlen else {}))

    class LowIds(GRPOModule):
        """The reward needs token ids, not text: score the rollout's ids (nothing else changes)."""

        def score(self, prompts, responses, rollout, fields=None):
            ids, mask = rollout.response_ids.tolist(), rollout.response_mask.tolist()
            return torch.tensor([low_id_fraction(t for t, m in zip(row, keep) if m) for row, keep in zip(ids, mask)])

    tokenizer = load_tokenizer("demo")
    module = LowIds(
        ModelConfig(arch=w["arch"], tokenizer="demo"), RewardFunction(),
        sampling=SamplingConfig(min_new_tokens=cfg["new_tokens"], max_new_tokens=cfg["new_tokens"], stop_at_eos=varlen,
                                temperature=1.0, top_k=0, top_p=1.0, decoder=decoder),
        grpo=GRPOConfig(num_generations=cfg["generations"], kl_loss_coef=cfg["kl_loss_coef"], scale="group",
                        loss_aggregation="token_mean", num_iterations=1, max_grad_norm=1.0, packed=packed),
        rollout_batch_size=cfg["prompts"],
    )
    if varlen:  # every forward of the policy and its reference: the same biased model
        _raise_eos(module, tokenizer.eos_token_id, w["grpo_varlen"]["eos_bias"])
    sample_s: list[float] = []
    lengths: list[float] = []
    phases: dict[str, list[float]] = {"generate": [], "score": [], "learn": []}

    def record(stats):
        sample_s.append(float(stats["time/sample_s"]))
        lengths.append(float(stats["rollout/response_length"]))
        for phase, times in phases.items():
            times.append(float(stats[f"time/{phase}_s"]))
        log_step(stats)

    log_step, module._log_step = module._log_step, record
    steps = w["warmup"] + w["timed"]
    ids = torch.tensor(random_prompts(w)).view(steps, cfg["prompts"], cfg["prompt_len"])
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "prompt": tokenizer.batch_decode(x)} for x in ids]
    timer = StepTimer()
    _trainer(precision, [timer], tmp, limit_train_batches=steps).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    completions = cfg["prompts"] * cfg["generations"]
    step = statistics.median(timer.times[w["warmup"]:])
    # The first rollout's sampling beyond a timed one's: the compile of the decode step.
    compile_s = {"compile_s": sample_s[0] - statistics.median(sample_s[w["warmup"]:])} if decoder == "compiled" else {}
    # The step's breakdown (medians, s): sampling, the no-grad passes, scoring, update.
    timed = slice(w["warmup"], None)
    sample = statistics.median(sample_s[timed])
    breakdown = {"step_s": step, "sample_s": sample,
                 "scoring_passes_s": statistics.median(phases["generate"][timed]) - sample,
                 "reward_s": statistics.median(phases["score"][timed]),
                 "update_s": statistics.median(phases["learn"][timed]), **compile_s}
    if varlen:
        return {"grpo_varlen_completions_per_s": completions / step,
                "grpo_varlen_mean_response_length": statistics.mean(lengths[timed]),
                **{f"grpo_varlen_{k}": v for k, v in breakdown.items()}}
    return {"grpo_completions_per_s": completions / step,
            "grpo_generate_tokens_per_s": completions * cfg["new_tokens"] / sample,
            **{f"grpo_{k}": v for k, v in breakdown.items()}}


def bench_grpo_long(w: dict, precision: str, tmp: Path) -> dict:
    """The GRPO stage with ``grpo_long.prompt_len``-token prompts (keys ``grpo_long_*``)."""
    from pairs import with_long_prompts

    return with_long_prompts(bench_grpo, w, precision, tmp)


def bench_grpo_varlen(w: dict, precision: str, tmp: Path) -> dict:
    """GRPO on responses that end at EOS (keys ``grpo_varlen_*``): see ``grpo_varlen`` in WORKLOADS."""
    return bench_grpo(w, precision, tmp, varlen=True)


def bench_grpo_varlen_padded(w: dict, precision: str, tmp: Path) -> dict:
    """``grpo_varlen`` with the padding-free passes off (keys ``grpo_varlen_padded_*``): what packing saves."""
    figures = bench_grpo(w, precision, tmp, varlen=True, packed=False)
    return {key.replace("grpo_varlen_", "grpo_varlen_padded_", 1): v for key, v in figures.items()}


def bench_grpo_compiled(w: dict, precision: str, tmp: Path) -> dict:
    """``grpo`` with ``sampling.decoder: compiled`` (keys ``grpo_compiled_*``, + ``grpo_compiled_compile_s``)."""
    figures = bench_grpo(w, precision, tmp, decoder="compiled")
    return {key.replace("grpo_", "grpo_compiled_", 1): v for key, v in figures.items()}


def bench_grpo_varlen_compiled(w: dict, precision: str, tmp: Path) -> dict:
    """``grpo_varlen`` with ``sampling.decoder: compiled`` (keys ``grpo_varlen_compiled_*``)."""
    figures = bench_grpo(w, precision, tmp, varlen=True, decoder="compiled")
    return {key.replace("grpo_varlen_", "grpo_varlen_compiled_", 1): v for key, v in figures.items()}


def bench_ppo_memory(w: dict, precision: str, tmp: Path, name: str) -> dict:
    """Peak memory of PPO steps (rollout + update) on a 4-bit NF4 base with LoRA adapters.

    The reference is the base with adapters disabled, and gradient checkpointing is on: the
    configuration in which a large policy fits on one GPU. Two rollouts run; the peak covers
    sampling, the reference and value passes and the update (the statistics restart when
    training starts, so building the random-init model does not count; the quantized weights,
    on the GPU by then, do).
    """
    from lit_rlhf.models import LoraSettings, ModelConfig
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.modules.ppo import KLConfig, PPOConfig, SamplingConfig
    from lit_rlhf.rewards import RewardFunction

    class LengthReward(RewardFunction):
        """No model behind it, so that the peak memory is the policy's alone."""

        def __call__(self, prompts, responses):
            return torch.tensor([len(r) / 100 for r in responses])

    cfg, arch = w["ppo_memory"], w["ppo_memory"]["archs"][name]
    key = f"ppo_nf4_lora_peak_memory_mb_{name}"
    lm = ModelConfig(arch=arch, tokenizer="demo", dtype="bfloat16", quantization="4bit-nf4",
                     lora=LoraSettings(**cfg["lora"]), gradient_checkpointing=True)
    module = PPOModule(lm, LengthReward(),
                       sampling=SamplingConfig(min_new_tokens=cfg["new_tokens"], max_new_tokens=cfg["new_tokens"],
                                               stop_at_eos=False),
                       ppo=PPOConfig(ppo_epochs=1, mini_batch_size=cfg["mini_batch_size"]),
                       kl=KLConfig(adaptive=False), rollout_batch_size=cfg["batch_size"])
    vocab = min(arch["vocab_size"], len(module.tokenizer))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (2, cfg["batch_size"], cfg["prompt_len"]), generator=g)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "prompt": [""] * len(x)} for x in ids]
    try:
        _trainer(precision, [], tmp, limit_train_batches=2).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    except torch.OutOfMemoryError:
        return {key: "oom"}
    return {key: _peak_memory_mb(), f"ppo_nf4_lora_params_{name}": sum(p.numel() for p in module.policy.parameters())}


def reward_adapter(policy_path: Path, lora: dict) -> Path:
    """A reward model as the RM stage leaves it with LoRA: a SEQ_CLS adapter (LoRA on all linear
    layers + score head, random: memory does not depend on the values) on ``policy_path``, with
    the base recorded in ``lit_rlhf.json``. Built once beside the checkpoint, in a child process
    (loading the bf16 base to build it would otherwise be in the job's VmHWM)."""
    path = policy_path.parent / f"{policy_path.name}-rm-adapter-r{lora['r']}"
    if (path / "adapter_model.safetensors").is_file():
        return path
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import run; "
            "run._build_reward_adapter(__import__('pathlib').Path(sys.argv[2]), json.loads(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks"), str(policy_path), json.dumps(lora)], check=True)
    return path


def _build_reward_adapter(policy_path: Path, lora: dict) -> None:
    from lit_rlhf.models import (
        LoraSettings,
        ModelConfig,
        load_model,
        load_tokenizer,
        save_pretrained_atomic,
    )
    from lit_rlhf.models.adapters import base_identity

    cfg = ModelConfig(name_or_path=str(policy_path), dtype="bfloat16", lora=LoraSettings(**lora))
    tokenizer = load_tokenizer(str(policy_path))
    model = load_model(cfg, tokenizer, task="seq_cls", new_head=True)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the scores, as a trained one does
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    save_pretrained_atomic(model, policy_path.parent / f"{policy_path.name}-rm-adapter-r{lora['r']}", tokenizer,
                           base=base_identity(cfg))


def bench_ppo_pss(w: dict, precision: str, tmp: Path, separate_rm: bool) -> dict:
    """Peak PSS, anonymous RSS and VmHWM of two PPO steps on a 4-bit NF4 base with LoRA, and s/step.

    All four roles on one quantized base: policy (LoRA), reference (adapters off), value head,
    and the reward model as a second adapter (:class:`~lit_rlhf.rewards.AdapterReward`); or,
    with ``separate_rm``, the reward model as a separate 4-bit model (``RewardModelReward`` with
    ``quantization: 4bit-nf4``) as TRL holds it. Weights load from a random-init bf16
    checkpoint on disk (``memory.random_checkpoint``). The peaks cover the whole job, loading
    included (``memory.SmapsSampler``); ``ppo_steps_peak_pss_mb`` is the peak of the two steps
    alone. No gradient checkpointing (TRL's side has none either).
    """
    from memory import SmapsSampler, _read_kb, bench_cache, random_checkpoint

    from lit_rlhf.estimate import RewardSpec, estimate_stage
    from lit_rlhf.models import LoraSettings, ModelConfig
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.modules.ppo import KLConfig, PPOConfig, SamplingConfig
    from lit_rlhf.rewards import AdapterReward, RewardModelReward

    cfg = w["memory"]
    policy_path = random_checkpoint(cfg["arch"], bench_cache(), "causal_lm", in_subprocess=True)
    if separate_rm:
        reward = RewardModelReward(str(random_checkpoint(cfg["arch"], bench_cache(), "seq_cls", in_subprocess=True)),
                                   normalize=False, batch_size=cfg["batch_size"], dtype="bfloat16",
                                   quantization="4bit-nf4")
    else:
        reward = AdapterReward(str(reward_adapter(policy_path, cfg["lora"])), normalize=False,
                               batch_size=cfg["batch_size"])
    suffix = "_separate_rm" if separate_rm else ""

    class Phases(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            sampler.phase(f"step {batch_idx + 1}")

    # What the process holds before the job (Python, torch, transformers, lightning): the
    # estimator predicts tensors, so it compares with the peaks minus this.
    baseline_kb = _read_kb("/proc/self/smaps_rollup", ("Pss:",))["Pss:"]
    timer = StepTimer()
    with SmapsSampler() as sampler:
        sampler.phase("load")
        lm = ModelConfig(name_or_path=str(policy_path), dtype="bfloat16", quantization="4bit-nf4",
                         lora=LoraSettings(**cfg["lora"]))
        module = PPOModule(lm, reward,
                           sampling=SamplingConfig(min_new_tokens=cfg["new_tokens"], max_new_tokens=cfg["new_tokens"],
                                                   stop_at_eos=False),
                           ppo=PPOConfig(ppo_epochs=cfg["ppo_epochs"], mini_batch_size=cfg["mini_batch_size"]),
                           kl=KLConfig(adaptive=False), rollout_batch_size=cfg["batch_size"])
        g = torch.Generator().manual_seed(0)
        vocab = min(cfg["arch"]["vocab_size"], len(module.tokenizer))
        ids = torch.randint(2, vocab, (w["timed"], cfg["batch_size"], cfg["prompt_len"]), generator=g)
        batches = [{"input_ids": x, "attention_mask": torch.ones_like(x),
                    "prompt": module.tokenizer.batch_decode(x)} for x in ids]
        _trainer(precision, [timer, Phases()], tmp, limit_train_batches=w["timed"]).fit(
            module, torch.utils.data.DataLoader(batches, batch_size=None))
    peaks = sampler.figures
    for name, phase in sampler.phases.items():
        print(f"[bench] ppo_pss{suffix} {name}: peak PSS {phase['peak_pss_mb']:.0f} MiB, "
              f"anonymous {phase['peak_rss_anon_mb']:.0f} MiB", file=sys.stderr)
    steps = [p["peak_pss_mb"] for name, p in sampler.phases.items() if name.startswith("step")]
    # The estimator's prediction for this very job (tensors only, as on a GPU without its context).
    rm = (RewardSpec("model", arch=cfg["arch"], dtype="bfloat16", quantization="4bit-nf4", batch_size=cfg["batch_size"])
          if separate_rm else RewardSpec("adapter", lora_r=cfg["lora"]["r"], target_modules=cfg["lora"]["target_modules"],
                                         batch_size=cfg["batch_size"]))
    predicted = estimate_stage(lm, "ppo", batch_size=cfg["batch_size"], prompt_length=cfg["prompt_len"],
                               new_tokens=cfg["new_tokens"], mini_batch_size=cfg["mini_batch_size"],
                               precision=precision, accelerator="cpu", reward=rm)
    return {f"ppo_baseline_pss_mb{suffix}": baseline_kb / 1024, f"ppo_estimated_mb{suffix}": predicted.allocated / 2**20,
            f"ppo_peak_pss_mb{suffix}": peaks["peak_pss_mb"], f"ppo_peak_rss_anon_mb{suffix}": peaks["peak_rss_anon_mb"],
            f"ppo_peak_rss_mb{suffix}": peaks["peak_rss_mb"], f"ppo_steps_peak_pss_mb{suffix}": max(steps),
            f"ppo_s_per_step{suffix}": statistics.mean(timer.times)}


def real_checkpoint(arch: dict, directory: Path) -> Path:
    """A random-init model of ``arch`` with a tokenizer of exactly ``vocab_size`` ids, saved once
    under ``directory`` (bf16 safetensors, as real checkpoints ship) and reused.

    The tokenizer (in ``tokenizer/``) is a word-level one (``<|endoftext|>``, ``<pad>``, then ``t2`` ... ``t{V-1}``),
    so that every id the random policy samples decodes and re-encodes, at any vocabulary size.
    Built in a fresh process (the caller's peak resident set stays its own)."""
    import hashlib

    key = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
    path = directory / f"real-{arch['model_type']}-{key}-v2"
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--out", "-", "--build-real", json.dumps(arch), str(path)],
                       check=True)
    return path


def _build_real(arch: dict, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, arch["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fields = {k: v for k, v in arch.items() if k != "model_type"}
    config = AutoConfig.for_model(arch["model_type"], **fields, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    # In a folder of its own: beside a qwen2 config.json, AutoTokenizer would build Qwen2's BPE
    # tokenizer class around this word-level one.
    tokenizer.save_pretrained(tmp / "tokenizer")
    tmp.rename(path)


def real_fit_config(w: dict, model_dir: Path, tmp: Path, precision: str) -> Path:
    """The ``fit`` config of the ``memory-real`` job (and its prompts file) under ``tmp``."""
    import yaml

    cfg = w["real"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg["arch"]["vocab_size"], (cfg["prompts"] + 1, cfg["prompt_len"]), generator=g)  # + 1 held out
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": " ".join(f"t{i}" for i in row)}) + "\n"
                                               for row in ids.tolist()))
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lit_rlhf.modules.GRPOModule", "init_args": {
            "lm": {"name_or_path": str(model_dir), "tokenizer": str(model_dir / "tokenizer"), "dtype": "float32"},
            "reward": {"class_path": "lit_rlhf.rewards.RegexFormatReward",
                       "init_args": {"pattern": "t1[0-9]", "full_match": False}},
            "optim": {"lr": 1.0e-6, "warmup_steps": 0},
            "sampling": {"min_new_tokens": cfg["new_tokens"], "max_new_tokens": cfg["new_tokens"],
                         "stop_at_eos": False},
            "grpo": {"num_generations": cfg["generations"], "kl_loss_coef": 0.04}}},
        "data": {"class_path": "lit_rlhf.data.PromptDataModule", "init_args": {
            "path": str(tmp / "prompts.jsonl"), "batch_size": cfg["prompts"], "max_prompt_length": 4 * cfg["prompt_len"],
            "val_size": 1}},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": precision, "max_epochs": 1,
                    "limit_train_batches": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
                    "enable_checkpointing": False, "default_root_dir": str(tmp / "run")},
    }
    path = tmp / f"grpo-real-{precision}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bench_grpo_fit(w: dict, precision: str, tmp: Path) -> dict:
    """Peak resident memory (VmHWM) of a whole ``train.py fit`` of the ``memory-real`` job, its
    wall time, and ``lit-rlhf estimate``'s ``total (peak):`` for the same config."""
    import re

    from memory import bench_cache

    model_dir = real_checkpoint(w["real"]["arch"], bench_cache())
    config = real_fit_config(w, model_dir, tmp, precision)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(w["threads"] or "")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", "-c", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"grpo_fit {precision} failed:\n{output[-3000:]}")
    est = subprocess.run([sys.executable, str(REPO / "train.py"), "estimate", "-c", str(config)], env=env,
                         capture_output=True, text=True, check=True).stdout
    total = re.search(r"total \(peak\): ([0-9.]+) (GiB|MiB)", est)
    estimated_mb = float(total[1]) * (1024 if total[2] == "GiB" else 1)
    exported = (tmp / "run" / "model").exists() or any((tmp / "run").rglob("model.safetensors"))
    return {"grpo_fit_peak_rss_mb": usage.ru_maxrss / 1024, "grpo_fit_estimated_mb": estimated_mb,
            "grpo_fit_estimate_ratio": estimated_mb / (usage.ru_maxrss / 1024), "grpo_fit_s": seconds,
            "grpo_fit_exported": int(exported)}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def with_steps(w: dict, steps_override: str | None, quick: bool = False) -> dict:
    """``w`` with its ``quick`` set (``--quick``) and ``--steps-override [WARMUP,]TIMED``
    (WARMUP defaults to 1) applied."""
    if quick:
        if "quick" not in w:
            raise SystemExit("--quick: this workload has no quick set (the gpu workloads have one)")
        w = {**w, **w["quick"]}
    if not steps_override:
        return w
    warmup, _, timed = steps_override.rpartition(",")
    return {**w, "warmup": int(warmup or 1), "timed": int(timed)}


def run_one(workload: str, stage: str, precision: str, steps_override: str | None = None,
            peak_tflops: float | None = None, quick: bool = False) -> dict:
    """One stage in this process; returns its figures (names without the precision suffix)."""
    w = with_steps(WORKLOADS[workload], steps_override, quick)
    if w["threads"]:
        torch.set_num_threads(w["threads"])
    torch.manual_seed(0)
    kind, _, arg = stage.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "ppo_memory":
            return bench_ppo_memory(w, precision, Path(tmp), arg)
        if kind == "grpo_fit":  # a whole `train.py fit` in a process of its own
            return bench_grpo_fit(w, precision, Path(tmp))
        if kind in ("ppo_pss", "ppo_pss_separate_rm"):  # peaks of their own, sampled from /proc
            return bench_ppo_pss(w, precision, Path(tmp), separate_rm=kind == "ppo_pss_separate_rm")
        if kind == "sft_mfu":
            out = bench_sft_mfu(w, precision, Path(tmp), peak_tflops)
        else:
            out = {"sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo, "dpo": bench_dpo,
                   "grpo": bench_grpo, "grpo_long": bench_grpo_long, "grpo_varlen": bench_grpo_varlen,
                   "grpo_varlen_padded": bench_grpo_varlen_padded, "grpo_compiled": bench_grpo_compiled,
                   "grpo_varlen_compiled": bench_grpo_varlen_compiled}[kind](w, precision, Path(tmp))
    prefix = {"ppo_memory": "ppo", "sft_mfu": "sft"}.get(kind, kind)  # the stage the variant measures
    out[f"{prefix}_peak_memory_mb"] = _peak_memory_mb()
    return out


def _rounded(value):
    if not isinstance(value, float):
        return value  # counts, and "oom"
    return round(value, 2) if abs(value) >= 1 else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-cpu")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--stages", help="comma-separated stage names to run (default: all of the workload's)")
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="comma-separated Lightning precisions")
    parser.add_argument("--steps-override", metavar="[WARMUP,]TIMED",
                        help="for smoke tests: TIMED timed steps after WARMUP (default 1) warm-up steps")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense bf16 peak, for MFU on a GPU missing from PEAK_BF16_TFLOPS")
    parser.add_argument("--quick", action="store_true",
                        help="the workload's quick set (gpu: SFT MFU and the 1.1B PPO memory; what scripts/gpu_check.sh runs)")
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true",
                        help="for smoke tests: run the jobs in this process (faster; peak memory is then "
                             "cumulative, not per stage)")
    parser.add_argument("--build-real", nargs=2, metavar=("ARCH", "PATH"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.build_real:
        _build_real(json.loads(opts.build_real[0]), Path(opts.build_real[1]))
        return
    if opts.one:
        print(json.dumps(run_one(opts.workload, *opts.one, opts.steps_override, opts.peak_tflops, opts.quick)))
        return
    w = with_steps(WORKLOADS[opts.workload], opts.steps_override, opts.quick)
    results: dict = {"workload": opts.workload + (" (quick)" if opts.quick else ""), "torch_threads": w["threads"],
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "warmup": w["warmup"], "timed": w["timed"]}
    start = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    wanted = opts.stages.split(",") if opts.stages else None
    for stage, precision in w["jobs"]:
        if wanted is not None and stage.partition(":")[0] not in wanted and stage not in wanted:
            continue
        if precision not in opts.precisions.split(","):
            continue
        print(f"[bench] {stage} {precision}", file=sys.stderr, flush=True)
        extra = [f"--steps-override={opts.steps_override}"] if opts.steps_override else []
        extra += [f"--peak-tflops={opts.peak_tflops}"] if opts.peak_tflops else []
        extra += ["--quick"] if opts.quick else []
        if opts.in_process:
            figures = run_one(opts.workload, stage, precision, opts.steps_override, opts.peak_tflops, opts.quick)
        else:  # one process per job: each stage's peak memory is its own
            proc = subprocess.run([sys.executable, __file__, "--workload", opts.workload, "--out", "-", *extra,
                                   "--one", stage, precision], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{stage} {precision} failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
        # Memory workloads are bf16 only and name their keys without the precision suffix.
        suffix = "_bf16" if precision == "bf16-mixed" and "memory" not in w else ""
        results.update({k + suffix: _rounded(v) for k, v in figures.items()})
    results["wall_s"] = round(time.perf_counter() - start, 1)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
