"""Per-rank peak memory of full fine-tuning, unsharded on one process and under fsdp2 on two,
measured on the CPU and set beside the estimator's prediction for the same job.

    python benchmarks/fsdp2_memory.py --out benchmarks/results/fsdp2_memory.json
    python benchmarks/fsdp2_memory.py --tiny --out /tmp/x.json      # the code on a tiny shape
    python benchmarks/fsdp2_memory.py --load --out benchmarks/results/fsdp2_load.json  # loading, below

The job: SFT of a random-init Llama (300M parameters: 24 layers, hidden 1024, intermediate 2816,
the demo tokenizer's small vocabulary, so the weights dominate) in float32 with AdamW, batch 1 x
128 tokens, 2 steps. Each rank's peak is its process's resident high-water mark (``VmHWM``) less
its resident memory when training is set up (Python, torch and the libraries; no weights yet):
what the tensors took, plus what the allocator keeps. The estimator counts tensors only.

glibc keeps freed blocks below its mmap threshold in its heaps (one per thread that allocates,
and gloo's threads do), and raises that threshold up to 32 MiB as large blocks are freed: FSDP2's
many mid-sized shards and gather buffers then stay resident after they are freed. Run with
``MALLOC_MMAP_THRESHOLD_=1048576`` (a fixed 1 MiB threshold: larger blocks go back to the system
when freed) to see the tensors' peak; the JSON records the setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
TINY_ARCH = {**ARCH, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4}
SEQ, BATCH, STEPS = 128, 1, 2
MIB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def train(devices: int, arch: dict, out: Path) -> None:
    """One SFT run (``devices`` > 1: fsdp2); every rank writes its peak to ``out/rank<r>.json``."""
    import lightning as L

    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.demo.models import register
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import SFTModule
    from lit_rlhf.optim import OptimConfig

    register()

    class Peak(L.Callback):
        def setup(self, trainer, module, stage):  # before configure_model loads any weights
            self.baseline = _status("VmRSS")

        def on_train_end(self, trainer, module):
            record = {"baseline_mib": self.baseline / MIB, "hwm_mib": _status("VmHWM") / MIB,
                      "peak_mib": (_status("VmHWM") - self.baseline) / MIB, "steps": trainer.global_step}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    L.seed_everything(0)
    module = SFTModule(ModelConfig(arch=arch, tokenizer="demo"), OptimConfig(lr=1e-4), seq_length=SEQ)
    data = SFTDataModule("demo", seq_length=SEQ, batch_size=BATCH, tokenizer=module.tokenizer, val_size=8,
                         shuffle_buffer=0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="fsdp2" if devices > 1 else "auto",
                        precision="32-true", max_steps=STEPS, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out, callbacks=[Peak()])
    trainer.fit(module, data)


# --load: the load of a pretrained model under fsdp2 (issue 41): Qwen2.5-0.5B's shape cut to 12
# layers (~315M parameters, a tied 151,936 x 896 embedding), random init saved once as safetensors;
# its baseline is the same run on a 1-layer model with a 1k vocabulary (1,536: the demo tokenizer's
# 1,324 ids must fit).
QWEN12 = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
          "num_hidden_layers": 12, "num_attention_heads": 14, "num_key_value_heads": 2,
          "max_position_embeddings": 512, "tie_word_embeddings": True}
QWEN_BASELINE = {**QWEN12, "vocab_size": 1536, "num_hidden_layers": 1}


def pretrained(arch: dict, folder: Path) -> Path:
    """``arch`` with random weights saved in ``folder`` once (safetensors)."""
    if not (folder / "model.safetensors").is_file():
        from lit_rlhf.models import ModelConfig, load_model, load_tokenizer

        load_model(ModelConfig(arch=arch, tokenizer="demo"), load_tokenizer("demo")).save_pretrained(folder)
    return folder


def validate(devices: int, source: Path, out: Path, whole: bool) -> None:
    """One validation batch of SFT from ``source`` (``devices`` > 1: fsdp2; ``whole``: every rank
    loads the whole model before sharding, the code before issue 41); each rank writes its
    resident high-water mark to ``out/rank<r>.json``."""
    import lightning as L

    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.demo.models import register
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import SFTModule
    from lit_rlhf.modules.base import HFModule

    register()
    if whole:
        HFModule.shard_source = property(lambda self: None)

    class Peak(L.Callback):
        def on_validation_start(self, trainer, module):  # loaded and sharded, before any forward
            self.loaded = _status("VmHWM") / MIB

        def on_validation_end(self, trainer, module):
            record = {"hwm_mib": _status("VmHWM") / MIB, "load_hwm_mib": self.loaded,
                      "load_device": str(module.load_device)}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    module = SFTModule(ModelConfig(name_or_path=str(source), tokenizer="demo"), seq_length=SEQ)
    data = SFTDataModule("demo", seq_length=SEQ, batch_size=BATCH, tokenizer=module.tokenizer, val_size=8,
                         shuffle_buffer=0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="fsdp2" if devices > 1 else "auto",
                        precision="32-true", limit_val_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, callbacks=[Peak()])
    trainer.validate(module, data)


def load_main(out: Path, models: Path) -> None:
    """Per-rank peak of ``validate`` net of the baseline model's: one process, two under fsdp2
    (each rank reading its rows), and two loading the whole model first (the code before)."""
    results = {"arch": QWEN12, "baseline_arch": QWEN_BASELINE, "seq_length": SEQ, "batch_size": BATCH,
               "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    sources = {"model": pretrained(QWEN12, models / "qwen12"), "baseline": pretrained(QWEN_BASELINE, models / "qwen1")}
    for name, devices, whole in (("unsharded", 1, False), ("fsdp2", 2, False), ("fsdp2-whole-load", 2, True)):
        hwm = {}
        for kind, source in sources.items():
            folder = Path(tempfile.mkdtemp(prefix=f"fsdp2_load_{name}_"))
            command = [sys.executable, __file__, "--validate", str(devices), "--source", str(source), "--out", str(folder)]
            subprocess.run(command + (["--whole"] if whole else []), check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            hwm[kind] = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)]
            shutil.rmtree(folder)
        results[name] = {"devices": devices, "load_device": hwm["model"][0]["load_device"],
                         "hwm_mib": [round(r["hwm_mib"], 1) for r in hwm["model"]],
                         "baseline_hwm_mib": [round(r["hwm_mib"], 1) for r in hwm["baseline"]],
                         "net_peak_mib": [round(a["hwm_mib"] - b["hwm_mib"], 1)
                                          for a, b in zip(hwm["model"], hwm["baseline"])],
                         # the peak up to the end of loading and sharding, before the forward
                         "net_load_peak_mib": [round(a["load_hwm_mib"] - b["load_hwm_mib"], 1)
                                               for a, b in zip(hwm["model"], hwm["baseline"])]}
    for key in ("net_peak_mib", "net_load_peak_mib"):
        single = results["unsharded"][key][0]
        for name in ("fsdp2", "fsdp2-whole-load"):
            results[name][key.replace("net_", "ratio_")] = round(max(results[name][key]) / single, 3)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k in ("unsharded", "fsdp2", "fsdp2-whole-load")}, indent=2))


def estimate(devices: int, arch: dict) -> float:
    """The estimator's per-rank prediction (MiB) for the same job."""
    from lit_rlhf.estimate import estimate_stage
    from lit_rlhf.models import ModelConfig

    est = estimate_stage(ModelConfig(arch=arch, tokenizer="demo"), "sft", batch_size=BATCH, seq_length=SEQ,
                         precision="32-true", accelerator="cpu", devices=devices,
                         fsdp2=devices if devices > 1 else 0)
    return est.total / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model (checks the code)")
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # internal: one training run
    parser.add_argument("--load", action="store_true",
                        help="the load of a pretrained ~315M Qwen2-shaped model: validate, per-rank peak")
    parser.add_argument("--models", default="/tmp/lit_rlhf_fsdp2_models", help="--load: where the random models are saved")
    parser.add_argument("--validate", type=int, help=argparse.SUPPRESS)  # internal: one validate run
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.validate:
        validate(opts.validate, Path(opts.source), Path(opts.out), opts.whole)
        return
    if opts.load:
        load_main(Path(opts.out), Path(opts.models))
        return
    arch = TINY_ARCH if opts.tiny else ARCH
    if opts.run:
        train(opts.run, arch, Path(opts.out))
        return
    results = {"arch": arch, "seq_length": SEQ, "batch_size": BATCH, "steps": STEPS,
               "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    for name, devices in (("unsharded", 1), ("fsdp2", 2)):
        folder = Path(tempfile.mkdtemp(prefix=f"fsdp2_memory_{name}_"))  # the runs' exports: not kept
        command = [sys.executable, __file__, "--run", str(devices), "--out", str(folder)] + (["--tiny"] if opts.tiny else [])
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)]
        shutil.rmtree(folder)
        results[name] = {"devices": devices, "measured_peak_mib_per_rank": [round(r["peak_mib"], 1) for r in ranks],
                         "estimated_mib_per_rank": round(estimate(devices, arch), 1), "ranks": ranks}
    Path(opts.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k in ("unsharded", "fsdp2")}, indent=2))


if __name__ == "__main__":
    main()
