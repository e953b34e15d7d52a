"""Per-stage throughput and peak memory, measured through the real LightningModules and Trainer.

    python benchmarks/run.py --workload tiny-cpu --out results.json

Each (stage, precision) runs in its own process, so peak memory (RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) belongs to that stage alone. Every figure is
the median over timed steps after warm-up steps. The workload is fixed so that results
compare across implementations (see WORKLOADS).
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
        warmup=3,
        timed=10,
    ),
}


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
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **limits)


def bench_sft(w: dict, precision: str, tmp: Path) -> dict:
    from torch.utils.data import DataLoader

    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import SFTModule

    cfg = w["sft"]
    steps = w["warmup"] + w["timed"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, w["arch"]["vocab_size"], (steps * cfg["batch_size"], cfg["seq_length"]), generator=g)
    rows = [{"input_ids": x, "labels": x, "position_ids": torch.arange(cfg["seq_length"])} for x in ids]
    module = SFTModule(ModelConfig(arch=w["arch"], tokenizer="demo"), seq_length=cfg["seq_length"])
    timer = StepTimer()
    _trainer(precision, [timer], tmp, max_steps=steps).fit(module, DataLoader(rows, batch_size=cfg["batch_size"]))
    step = statistics.median(timer.times[w["warmup"]:])
    return {"sft_tokens_per_s": cfg["batch_size"] * cfg["seq_length"] / step}


def bench_rm(w: dict, precision: str, tmp: Path) -> dict:
    from torch.utils.data import DataLoader

    from lit_rlhf.data.preference import PairBatches, _Collate
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import RewardModule

    cfg = w["rm"]
    steps = w["warmup"] + w["timed"]
    g = torch.Generator().manual_seed(0)
    n = steps * cfg["batch_size"]
    lengths = torch.randint(cfg["min_len"], cfg["max_len"] + 1, (2 * n,), generator=g).tolist()
    vocab = w["arch"]["vocab_size"]
    pairs = [(torch.randint(2, vocab, (lengths[2 * i],), generator=g).tolist(),
              torch.randint(2, vocab, (lengths[2 * i + 1],), generator=g).tolist(), 0.0) for i in range(n)]

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, index):
            return [pairs[i] for i in index]

    module = RewardModule(ModelConfig(arch=w["arch"], tokenizer="demo"))
    # The library's own batching: length-grouped batches, little padding.
    sampler = PairBatches([max(len(c), len(r)) for c, r, _ in pairs], cfg["batch_size"], shuffle=True, seed=0)
    loader = DataLoader(Pairs(), batch_size=None, sampler=sampler, collate_fn=_Collate(module.tokenizer.pad_token_id))
    timer = StepTimer()
    _trainer(precision, [timer], tmp, max_steps=steps).fit(module, loader)
    step = statistics.median(timer.times[w["warmup"]:])
    return {"rm_pairs_per_s": cfg["batch_size"] / step}


def bench_ppo(w: dict, precision: str, tmp: Path) -> dict:
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
    module = PPOModule(
        ModelConfig(arch=w["arch"], tokenizer="demo"),
        RewardModelReward(str(tmp / "rm"), normalize=False, batch_size=cfg["batch_size"]),
        sampling=SamplingConfig(min_new_tokens=cfg["new_tokens"], max_new_tokens=cfg["new_tokens"], stop_at_eos=False),
        ppo=PPOConfig(ppo_epochs=cfg["ppo_epochs"], mini_batch_size=cfg["batch_size"]),
        kl=KLConfig(adaptive=False),
        rollout_batch_size=cfg["batch_size"],
    )
    sample_s: list[float] = []
    log_step = module._log_step
    module._log_step = lambda stats: (sample_s.append(float(stats["time/sample_s"])), log_step(stats))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, w["arch"]["vocab_size"], (steps, cfg["batch_size"], cfg["prompt_len"]), generator=g)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x),
                "prompt": tokenizer.batch_decode(x)} for x in ids]
    timer = StepTimer()
    trainer = _trainer(precision, [timer], tmp, limit_train_batches=steps)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    step = statistics.median(timer.times[w["warmup"]:])
    sample = statistics.median(sample_s[w["warmup"]:])
    return {"ppo_episodes_per_s": cfg["batch_size"] / step,
            "ppo_generate_tokens_per_s": cfg["batch_size"] * cfg["new_tokens"] / sample}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(workload: str, stage: str, precision: str) -> dict:
    """One stage in this process; returns its figures (names without the precision suffix)."""
    w = WORKLOADS[workload]
    torch.set_num_threads(w["threads"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bench = {"sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo}[stage]
        out = bench(w, precision, Path(tmp))
    out[f"{stage}_peak_memory_mb"] = _peak_memory_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-cpu")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "PRECISION"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(run_one(opts.workload, *opts.one)))
        return
    results: dict = {"workload": opts.workload, "torch_threads": WORKLOADS[opts.workload]["threads"],
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    start = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for precision, suffix in (("32-true", ""), ("bf16-mixed", "_bf16")):
        for stage in opts.stages.split(","):
            print(f"[bench] {stage} {precision}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--workload", opts.workload, "--out", "-",
                                   "--one", stage, precision], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{stage} {precision} failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            results.update({k + suffix: round(v, 2) for k, v in figures.items()})
    results["wall_s"] = round(time.perf_counter() - start, 1)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
