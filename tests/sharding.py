"""FSDP2 equivalence runs: each stage trained a few steps through the CLI, on one process with
the global batch, and sharded over two gloo processes with half of it each; their exports
compared tensor by tensor.

The two-process runs of every stage share one process group: ``OUT=dir RUNS="sft-full rm-lora ..."
python -m tests.sharding`` runs them one after the other (Lightning launches the second rank
as the same command, with the same environment), so the suite pays Python's imports and the
group's start once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ("--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
        "--model.init_args.lm.tokenizer=demo")
# Responses of one length on every rank: the per-rank token means that DDP and FSDP2 average
# are then the global batch's token mean (see the README: token means are per rank).
ONLINE = (*TINY, "--model.init_args.reward=lit_rlhf.demo.JudgeReward", "--model.init_args.judge=null",
          "--model.init_args.sampling.min_new_tokens=6", "--model.init_args.sampling.max_new_tokens=6",
          "--model.init_args.sampling.stop_at_eos=false")
LORA = '--model.init_args.lm.lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}'
NO_LORA = "--model.init_args.lm.lora=null"

# name -> (recipe, arguments, global batch -> per-device batch arguments)
STAGES: dict[str, tuple[str, tuple[str, ...], object]] = {
    "sft": ("configs/sft/demo.yaml", ("--trainer.max_steps=3", "--data.init_args.shuffle_buffer=0"),
            lambda b: (f"--data.init_args.batch_size={b}",)),
    "rm": ("configs/rm/demo.yaml", (*TINY, "--trainer.max_steps=3", "--data.init_args.max_train_pairs=64"),
           lambda b: (f"--data.init_args.batch_size={b}",)),
    "dpo": ("configs/dpo/demo.yaml", (*TINY, "--trainer.max_steps=3", "--data.init_args.max_train_pairs=64"),
            lambda b: (f"--data.init_args.batch_size={b}",)),
    "ppo": ("configs/ppo/demo.yaml", (*ONLINE, "--trainer.limit_train_batches=2", "--model.init_args.ppo.ppo_epochs=2"),
            lambda b: (f"--data.init_args.batch_size={b}", f"--model.init_args.ppo.mini_batch_size={b}")),
    "grpo": ("configs/grpo/demo.yaml", (*ONLINE, "--trainer.limit_train_batches=2",
                                        "--model.init_args.grpo.num_generations=2"),
             lambda b: (f"--data.init_args.batch_size={b}", f"--model.init_args.grpo.mini_batch_size={2 * b}")),
    # Multi-turn GRPO: episodes of 2 or 3 turns (tests/envs/scripted.py), so their lengths differ:
    # the passes are packed, and a rank may finish its episodes before the other. The loss is a
    # mean over sequences (GRPO's default), so the ranks' means average to the global batch's.
    # Micro-batches of at most 64 tokens: each rank cuts as many as the rank that needs the most.
    "turns": ("configs/grpo/demo.yaml", (*ONLINE, "--trainer.limit_train_batches=2",
                                         "--model.init_args.grpo.num_generations=2",
                                         "--model.init_args.grpo.mini_batch_tokens=64",
                                         "--model.init_args.env.class_path=tests.envs.scripted.Scripted",
                                         "--model.init_args.env.init_args.vary=true",
                                         "--model.init_args.episodes.max_turns=3"),
              lambda b: (f"--data.init_args.batch_size={b}", f"--model.init_args.grpo.mini_batch_size={2 * b}")),
}
GLOBAL_BATCH = 8


def arguments(name: str, out: Path, world: int) -> list[str]:
    """The ``fit`` command line of run ``name`` (``<stage>-full`` or ``<stage>-lora``) on
    ``world`` processes, logging under ``out/<name>-<world>``."""
    stage, kind = name.split("-")
    recipe, args, per_device = STAGES[stage]
    strategy = ("--trainer.strategy=fsdp2", f"--trainer.devices={world}") if world > 1 else ("--trainer.devices=1",)
    return ["fit", "-c", recipe, *args, *per_device(GLOBAL_BATCH // world), LORA if kind == "lora" else NO_LORA,
            *strategy, "--seed_everything=7", "--model.init_args.optim.lr=5e-5", "--model.init_args.optim.warmup_steps=0", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false", f"--trainer.default_root_dir={out / f'{name}-{world}'}"]


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file a run exported, keyed ``<file>/<tensor>``."""
    files = sorted(run_dir.rglob("*.safetensors"))
    assert files, f"{run_dir}: nothing exported"
    return {f"{f.relative_to(run_dir)}/{k}": v for f in files for k, v in load_file(f).items()}


def differences(a: Path, b: Path) -> tuple[float, float]:
    """The largest absolute difference between the exports of two runs (which hold the same
    tensors), and the 99.9th percentile of the absolute differences of all their elements."""
    ta, tb = exported(a), exported(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
    every = torch.cat([(ta[k].double() - tb[k].double()).abs().flatten() for k in ta])
    return float(every.max()), float(every.kthvalue(max(1, int(0.999 * every.numel()))).values)


# ------------------------------------------------------------------ checks in one process group
# Each check trains through the Trainer under fsdp2 on two processes and returns what the test
# asserts on (tensors, floats): ``CHECKS="invariants offload" OUT=dir python -m tests.sharding``
# writes every rank's results to ``OUT/rank<r>.pt``.


def _trainer(out: Path, **kwargs):
    import lightning as L

    from lit_rlhf.strategies import FSDP2Strategy

    strategy = FSDP2Strategy(**kwargs.pop("strategy", {}))
    kwargs.setdefault("max_steps", -1)
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, default_root_dir=out, max_epochs=1,
                     log_every_n_steps=1, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                     enable_checkpointing=False, logger=False, enable_model_summary=False, **kwargs)


def _recording(module) -> dict:
    """Records the first update micro-batch's statistics, the first rollout's logged statistics
    and its sampled tokens."""
    seen, loss, log_step, sample = {}, module.loss, module._log_step, module.sample

    def recording_loss(sub, *args):
        value, stats = loss(sub, *args)
        seen.setdefault("update", {k: float(v) for k, v in stats.items()})
        return value, stats

    def recording_log(stats):
        seen.setdefault("logged", {k: float(v) for k, v in stats.items()})
        log_step(stats)

    def recording_sample(*args, **kwargs):
        rollout = sample(*args, **kwargs)
        seen.setdefault("tokens", rollout.response_ids.cpu())
        return rollout

    module.loss, module._log_step, module.sample = recording_loss, recording_log, recording_sample
    return seen


def check_invariants(out: Path) -> dict:
    """bf16-mixed under fsdp2: a LoRA reward model, then PPO scored by it as an AdapterReward
    (sampling gathered once per rollout, and not), then GRPO with a frozen sharded reference:
    ratio exactly 1 and KL exactly 0 at step 0; the value head float32."""
    from lit_rlhf.data import PreferenceDataModule, PromptDataModule
    from lit_rlhf.models import LoraSettings, ModelConfig
    from lit_rlhf.modules import GRPOModule, PPOModule, RewardModule
    from lit_rlhf.modules.grpo import GRPOConfig
    from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
    from lit_rlhf.optim import OptimConfig
    from lit_rlhf.rewards import AdapterReward
    from tests.conftest import TINY_LLAMA
    from tests.modules.ppo_helpers import LetterReward

    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora)
    results = {}
    rm = RewardModule(lm, OptimConfig(lr=1e-3))
    _trainer(out / "rm", max_steps=2, precision="bf16-mixed").fit(
        rm, PreferenceDataModule("demo", batch_size=4, max_length=64, tokenizer=rm.tokenizer, max_train_pairs=16,
                                 val_size=8))
    for gather in (True, False):
        ppo = PPOModule(lm, AdapterReward(str(rm.export_dir), normalize=False, batch_size=4),
                        ppo=PPOConfig(mini_batch_size=4, ppo_epochs=2),
                        sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8), rollout_batch_size=4)
        seen = _recording(ppo)
        _trainer(out / f"ppo-{gather}", limit_train_batches=2, precision="bf16-mixed",
                 strategy={"gather_for_sampling": gather}).fit(
            ppo, PromptDataModule("demo", batch_size=4, val_size=8, tokenizer=ppo.tokenizer))
        results[f"ppo-gather-{gather}"] = {**seen, "value_head": str(ppo.policy.value_head.weight.dtype)}
    full = ModelConfig(arch=TINY_LLAMA, tokenizer="demo")
    grpo = GRPOModule(full, LetterReward(), optim=OptimConfig(lr=1e-3),
                      grpo=GRPOConfig(num_generations=2, mini_batch_size=8, kl_loss_coef=0.04),
                      sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8), rollout_batch_size=4)
    seen = _recording(grpo)
    _trainer(out / "grpo", limit_train_batches=2, precision="bf16-mixed").fit(
        grpo, PromptDataModule("demo", batch_size=4, val_size=8, tokenizer=grpo.tokenizer))
    results["grpo"] = seen
    return results


def check_dpo_precompute(out: Path) -> dict:
    """DPO with full fine-tuning and the reference log-probs precomputed by a sharded frozen copy,
    over a number of batches that the two ranks cannot split evenly (every rank must run as many
    forwards as the other)."""
    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import DPOModule
    from lit_rlhf.optim import OptimConfig
    from tests.conftest import TINY_LLAMA

    module = DPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), OptimConfig(lr=1e-3), precompute_reference=True)
    data = PreferenceDataModule("demo", batch_size=4, max_length=64, tokenizer=module.tokenizer, max_train_pairs=20,
                                val_size=8)
    trainer = _trainer(out / "dpo", max_steps=2)
    trainer.fit(module, data)
    refs = [p.reference for p in data.train_set.pairs]
    return {"steps": trainer.global_step, "pairs": len(refs), "references": torch.tensor(refs, dtype=torch.float64)}


def check_offload(out: Path) -> dict:
    """cpu_offload: parameters, gradients and optimizer states stay in CPU memory; SFT trains."""
    from lit_rlhf.data import SFTDataModule
    from lit_rlhf.models import ModelConfig
    from lit_rlhf.modules import SFTModule
    from lit_rlhf.optim import OptimConfig
    from tests.conftest import TINY_LLAMA

    module = SFTModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), OptimConfig(lr=1e-3), seq_length=64)
    trainer = _trainer(out / "offload", max_steps=2, strategy={"cpu_offload": True}, gradient_clip_val=1.0)
    trainer.fit(module, SFTDataModule(path="demo", seq_length=64, batch_size=2, tokenizer=module.tokenizer,
                                      val_size=8))
    return {"steps": trainer.global_step,
            "finite": all(bool(p.isfinite().all()) for p in module.parameters()),
            "offloaded": sorted({type(u._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
                                 for u in __import__("lit_rlhf.models.sharding", fromlist=["x"]).fsdp_modules(module)})}


def check_meta_load(out: Path) -> dict:
    """A pretrained model (tied embeddings, in safetensors) under fsdp2: built on meta, each rank
    reading its own rows. For SFT (full, LoRA), PPO (the frozen reference copy, the value head) and
    a reward model with a new score head: the gathered weights after one validation batch, and the
    same model loaded unsharded (LoRA's A matrices are drawn anew: left out)."""
    import lightning as L
    import torch.distributed as dist

    from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lit_rlhf.models import LoraSettings, ModelConfig, load_model, load_tokenizer
    from lit_rlhf.models.sharding import full_state_dict
    from lit_rlhf.modules import PPOModule, RewardModule, SFTModule
    from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
    from tests.conftest import TINY_LLAMA
    from tests.modules.ppo_helpers import LetterReward

    source = out / "pretrained"
    if not source.exists():  # rank 0, before Lightning starts rank 1 with this same script
        tokenizer = load_tokenizer("demo")
        load_model(ModelConfig(arch={**TINY_LLAMA, "tie_word_embeddings": True}, tokenizer="demo"),
                   tokenizer).save_pretrained(source)
        tokenizer.save_pretrained(source)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")

    class Gather(L.Callback):
        def on_validation_start(self, trainer, module):
            roots = [r for r in module.fsdp_roots() if r is not None]
            module.gathered = [full_state_dict(r) for r in roots]
            module.devices = sorted({str(t.device) for r in roots for t in r.state_dict().values()})

    cases = {
        "sft-full": (SFTModule(ModelConfig(name_or_path=str(source)), seq_length=32), "causal_lm",
                     lambda m: SFTDataModule(path="demo", seq_length=32, batch_size=2, tokenizer=m.tokenizer, val_size=8)),
        "sft-lora": (SFTModule(ModelConfig(name_or_path=str(source), lora=lora), seq_length=32), "causal_lm",
                     lambda m: SFTDataModule(path="demo", seq_length=32, batch_size=2, tokenizer=m.tokenizer, val_size=8)),
        "ppo-full": (PPOModule(ModelConfig(name_or_path=str(source)), LetterReward(), rollout_batch_size=4,
                               ppo=PPOConfig(mini_batch_size=4), sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4)), "causal_lm",
                     lambda m: PromptDataModule("demo", batch_size=4, val_size=8, tokenizer=m.tokenizer)),
        "rm-lora": (RewardModule(ModelConfig(name_or_path=str(source), lora=lora)), "seq_cls",
                    lambda m: PreferenceDataModule("demo", batch_size=4, max_length=64, tokenizer=m.tokenizer,
                                                   max_train_pairs=8, val_size=8)),
    }
    results = {}
    for name, (module, task, data) in cases.items():
        trainer = _trainer(out / name, callbacks=[Gather()])
        trainer.limit_val_batches = 1
        trainer.validate(module, data(module))
        whole = load_model(ModelConfig(name_or_path=str(source), lora=module.lm_config.lora), module.tokenizer,
                           task=task, new_head=task == "seq_cls").state_dict()
        differ, compared = [], 0
        for gathered in module.gathered if dist.get_rank() == 0 else []:
            for key, value in gathered.items():  # a root's names end the whole model's
                same = [k for k in whole if f".{k}".endswith(f".{key.removeprefix('lm.')}")]
                if len(same) != 1 or any(x in key for x in ("lora_A", "score", "modules_to_save", "original_module")):
                    # the value head, LoRA's A, the reward model's new score head: drawn anew
                    continue
                want = whole[same[0]]
                compared += 1
                if not torch.equal(value, want):
                    differ.append(key)
        results[name] = {"load_device": str(module.load_device), "differ": differ, "compared": compared,
                         "devices": module.devices}
    return results


if __name__ == "__main__" and os.environ.get("CHECKS"):
    import torch.distributed as dist

    out = Path(os.environ["OUT"])
    results = {name: globals()[f"check_{name}"](out) for name in os.environ["CHECKS"].split()}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
elif __name__ == "__main__":
    from lit_rlhf.cli import main

    # From the environment: LightningCLI reads the command line unless it is empty (each run's
    # goes by `args`), and Lightning starts the second rank with this command line.
    out, runs = Path(os.environ["OUT"]), os.environ["RUNS"].split()
    for run in runs:
        main(arguments(run, out, 2))
