"""``--trainer.strategy=fsdp2``: every stage sharded over two gloo processes trains as one process
on the same global batch, keeps the step-0 invariants under bf16, resumes exactly after SIGKILL
from sharded checkpoints, and refuses what it cannot shard in one line.

The two-process runs share process groups (see tests/sharding.py): one for the five stages x
(full fine-tuning, LoRA), one for the invariant checks.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.resume import kill_and_resume
from tests.sharding import LORA, ONLINE, arguments, differences

ROOT = Path(__file__).resolve().parents[1]
RUNS = [f"{stage}-{kind}" for stage in ("sft", "rm", "dpo", "ppo", "grpo") for kind in ("full", "lora")] + ["turns-lora"]


def launch(out: Path, **env) -> None:
    """``python -m tests.sharding`` with ``env``: its runs or checks on two processes."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "tests.sharding"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OUT": str(out), **env})
    assert done.returncode == 0, done.stderr[-4000:]


def test_fsdp2_is_a_strategy_name_that_shards_over_every_process():
    import lightning as L

    from lit_rlhf.strategies import FSDP2Strategy

    trainer = L.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    # Lightning's ModelParallelStrategy defaults would make tensor parallelism over the processes.
    assert trainer.strategy._tensor_parallel_size == 1 and trainer.strategy._data_parallel_size == "auto"
    assert trainer.strategy.gather_for_sampling and not trainer.strategy.cpu_offload


@pytest.mark.parametrize("args, message", [
    (("--model.init_args.lm.quantization=4bit-nf4", "--model.init_args.lm.lora.r=8"),
     "error: trainer.strategy='fsdp2': model.init_args.lm.quantization='4bit-nf4' cannot be sharded"),
    (("--trainer.precision=16-mixed",), "error: trainer.strategy='fsdp2' with trainer.precision='16-mixed'"),
])
def test_what_cannot_be_sharded_is_refused_in_one_line_before_weights_load(cli, args, message):
    out = cli.run(["fit", "-c", "configs/sft/demo.yaml", "--trainer.strategy=fsdp2", "--trainer.devices=2", *args])
    assert out.code == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.error_lines[-1].startswith(message), out.error_lines


def _on_a_gpu(monkeypatch, module, device="cuda"):
    """``module`` under an fsdp2 trainer whose ranks compute on ``device`` (a CPU torch cannot make
    a CUDA generator or tensor: the tests record what is asked for instead)."""
    from types import SimpleNamespace

    from lit_rlhf.strategies import FSDP2Strategy

    monkeypatch.setattr(FSDP2Strategy, "root_device", property(lambda self: torch.device(device, 0)))
    strategy = FSDP2Strategy()
    module._trainer = SimpleNamespace(strategy=strategy, precision="32-true", world_size=2)
    monkeypatch.setattr(module, "shard", lambda: None)  # no process group here
    return strategy


def test_sampling_generators_live_on_the_compute_device_not_the_load_device(monkeypatch):
    # Under fsdp2 the weights load on the CPU and are sharded onto the GPU: a generator made on the
    # load device would meet CUDA probabilities ("Expected a 'cuda' device type for generator").
    from tests.modules.ppo_helpers import make_module

    module = make_module()
    _on_a_gpu(monkeypatch, module)
    assert module.load_device == torch.device("cpu")
    made, real = [], torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: made.append(torch.device(device or "cpu")) or real())
    module.configure_model()
    module.on_validation_epoch_start()
    assert made == [torch.device("cuda", 0)] * 2  # the sampling generator, then validation's


def test_cpu_offload_keeps_shards_on_the_cpu_but_the_module_computes_on_the_device(monkeypatch):
    # Inputs, metric values and generators follow `module.device`: with cpu_offload it must still be
    # the accelerator (meta stands in for it), though the sharded weights stay in CPU memory.
    from tests.modules.ppo_helpers import make_module

    module = make_module()
    strategy = _on_a_gpu(monkeypatch, module, device="meta")
    strategy.cpu_offload, strategy.model = True, module
    strategy.model_to_device()
    assert module.device == torch.device("meta", 0) and module.val_score.device.type == "meta"


@pytest.fixture
def one_rank_group():
    """A one-process gloo group and its 1-D CPU mesh, in this process (torn down after)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharded_clipping_reduces_one_scalar_on_the_mesh_device_and_clips_as_torch(monkeypatch, one_rank_group):
    # cpu_offload under NCCL: the gradients' shards are CPU tensors, the group reduces only on the
    # GPU. Only the sum of squares, on the mesh's device, may cross; the result is torch's clipping.
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from lit_rlhf.models.sharding import clip_grad_norm

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    sharded = copy.deepcopy(plain)
    fully_shard(sharded[0], mesh=one_rank_group, offload_policy=CPUOffloadPolicy(pin_memory=False))
    fully_shard(sharded, mesh=one_rank_group, offload_policy=CPUOffloadPolicy(pin_memory=False))
    x = torch.randn(5, 8)
    for model in (plain, sharded):
        (model(x) ** 2).sum().mul(10).backward()
    reduced, all_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: reduced.append((t.shape, t.device.type)) or all_reduce(t, **kw))
    want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    got = clip_grad_norm(sharded.parameters(), 0.5)
    assert reduced == [(torch.Size([]), one_rank_group.device_type)]
    assert want > 0.5 and torch.allclose(got, want, rtol=1e-6)
    for p, q in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-6, atol=1e-7)


def test_every_clipping_under_fsdp2_goes_through_the_sharded_clip(monkeypatch):
    # Lightning's (trainer.gradient_clip_val) and the online update's (max_grad_norm) clipping both
    # end in torch's clip_grad_norm_, which cannot clip CPU-offloaded shards under NCCL.
    from lit_rlhf.modules import base, update
    from tests.modules.ppo_helpers import make_module

    module = make_module()
    _on_a_gpu(monkeypatch, module)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    clipped = []
    for where in (base, update):
        monkeypatch.setattr(where, "clip_grad_norm", lambda params, norm: clipped.append((list(params), norm)))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("torch's clip_grad_norm_"))
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.5, gradient_clip_algorithm="norm")
    module._clip_gradients(optimizer, 0.7)
    assert [(params == [weight], norm) for params, norm in clipped] == [(True, 1.5), (True, 0.7)]


class Killed(BaseException):
    """The process dies here (SIGKILL): nothing after it runs."""


def test_a_sharded_save_killed_between_any_two_filesystem_steps_leaves_a_loadable_last_checkpoint(
        monkeypatch, tmp_path):
    import shutil

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_rlhf import strategies
    from lit_rlhf.modules.base import check_checkpoint

    steps = []  # each write, rename or removal; the k-th one is killed (a removal halfway: one file gone)
    kill_at = [None]

    def step(name, real):
        def run(*args, **kwargs):
            steps.append(name)
            if len(steps) == kill_at[0]:
                if name == "rmtree":  # killed halfway through: the checkpoint's index is gone
                    (Path(args[0]) / ".metadata").unlink(missing_ok=True)
                raise Killed
            return real(*args, **kwargs)
        return run

    def write(strategy, checkpoint, path, storage_options=None):
        """A stand-in for the ranks' shard files: what check_checkpoint and the strategy read."""
        path = Path(path)
        path.mkdir()
        (path / "__0_0.distcp").write_text(str(checkpoint["global_step"]))
        step("write", lambda: None)()  # killed while writing: no index yet
        torch.save({"loops": {}, **checkpoint}, path / "meta.pt")
        (path / ".metadata").write_text("index")

    monkeypatch.setattr(Path, "rename", step("rename", Path.rename))
    monkeypatch.setattr(shutil, "rmtree", step("rmtree", shutil.rmtree))
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write)
    strategy = strategies.FSDP2Strategy()  # one process: broadcast and barrier return at once

    def loadable(path: Path) -> int:
        found = strategies.sharded_checkpoint_path(path)
        check_checkpoint(str(path), "lit_rlhf.modules.SFTModule", None)  # the CLI's check before resuming
        assert (found / ".metadata").is_file() and (found / "meta.pt").is_file(), sorted(path.parent.iterdir())
        return int((found / "__0_0.distcp").read_text())

    def save(folder: Path, step: int, kill: int | None) -> bool:
        """One save, killed at its ``kill``-th step; True if it finished."""
        steps.clear()
        kill_at[0] = kill
        try:
            strategy.save_checkpoint({"global_step": step}, folder / "last.ckpt")
            return True
        except Killed:
            return False

    killed = set()
    for first, second in itertools.product([*range(1, 7), None], repeat=2):
        folder = tmp_path / f"{first}-{second}"
        folder.mkdir()
        assert save(folder, 1, None) and loadable(folder / "last.ckpt") == 1
        done = save(folder, 2, first)
        killed.update([steps[-1]] if not done else [])
        assert loadable(folder / "last.ckpt") == 2 if done else loadable(folder / "last.ckpt") in (1, 2)
        done = save(folder, 3, second)  # the next save, after a restart
        assert loadable(folder / "last.ckpt") == 3 if done else loadable(folder / "last.ckpt") in (1, 2, 3)
        assert save(folder, 4, None) and loadable(folder / "last.ckpt") == 4
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # nothing left aside
    assert killed == {"write", "rename", "rmtree"}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Every stage, full fine-tuning and LoRA, a few steps under fsdp2 on two processes."""
    out = tmp_path_factory.mktemp("fsdp2_runs")
    launch(out, RUNS=" ".join(RUNS))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_on_two_processes_trains_as_one_process_on_the_global_batch(cli, sharded_runs, run):
    single = cli.run(arguments(run, sharded_runs, 1))
    assert single.code == 0, single.stderr[-3000:]
    # fp32, 3 AdamW steps (PPO, GRPO: 2 rollouts): only the order of the sums differs, so nearly
    # every weight agrees to rounding. AdamW divides each gradient by its own size plus eps (1e-8),
    # so a weight whose gradient is near eps (an embedding row of a token seen once or twice) can
    # move by a few 1e-6 (measured: 1.5e-6 in 7 elements of one row, GRPO full) - a thirtieth of one
    # step at lr 5e-5, where a rank training on the wrong data moves most weights by about lr.
    largest, bulk = differences(sharded_runs / f"{run}-1", sharded_runs / f"{run}-2")
    assert bulk <= 1e-7 and largest <= 5e-6, (largest, bulk)


@pytest.mark.slow
def test_a_sharded_export_loads_with_auto_model(sharded_runs):
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    causal = sharded_runs / "sft-full-2" / "model"
    assert json.loads((causal / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert AutoModelForCausalLM.from_pretrained(causal).num_parameters() > 0
    assert AutoModelForSequenceClassification.from_pretrained(sharded_runs / "rm-lora-2" / "export").num_labels == 1


@pytest.mark.slow
def test_bf16_under_fsdp2_keeps_ratio_one_and_kl_zero_at_step_0_offload_and_precomputed_dpo_train(tmp_path):
    launch(tmp_path, CHECKS="invariants offload dpo_precompute")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for results in ranks:
        checks = results["invariants"]
        for name in ("ppo-gather-True", "ppo-gather-False", "grpo"):
            update, logged = checks[name]["update"], checks[name]["logged"]
            assert update["ratio_mean"] == 1.0 and update["ratio_max"] == 1.0, (name, update)
            kl = logged["objective/kl"] if name.startswith("ppo") else update["kl"]
            assert kl == 0.0, (name, logged)
        assert checks["ppo-gather-True"]["value_head"] == "torch.float32"
        # One gather per rollout or one per block and token: the same samples.
        assert torch.equal(checks["ppo-gather-True"]["tokens"], checks["ppo-gather-False"]["tokens"])
        offload = results["offload"]
        assert offload["steps"] == 2 and offload["finite"] and offload["offloaded"] == ["CPUOffloadPolicy"]
        # 20 pairs in 5 batches of 4 over two ranks: every pair's reference, on both ranks.
        dpo = results["dpo_precompute"]
        assert dpo["steps"] == 2 and dpo["pairs"] == 20 and torch.isfinite(dpo["references"]).all()
    assert torch.equal(ranks[0]["dpo_precompute"]["references"], ranks[1]["dpo_precompute"]["references"])


@pytest.mark.slow
def test_a_pretrained_model_loads_each_ranks_rows_from_meta_as_the_unsharded_load(tmp_path):
    # SFT (full, LoRA), PPO (its frozen reference copy) and a LoRA reward model with a new score head,
    # from a tied-embedding checkpoint: every weight read from the files equals the unsharded load.
    launch(tmp_path, CHECKS="meta_load")
    checks = torch.load(tmp_path / "rank0.pt", weights_only=False)["meta_load"]
    assert set(checks) == {"sft-full", "sft-lora", "ppo-full", "rm-lora"}
    for name, check in checks.items():
        assert check["load_device"] == "meta" and check["devices"] == ["cpu"], (name, check)
        assert check["differ"] == [] and check["compared"] >= 21, (name, check)


FSDP2 = ("--trainer.strategy=fsdp2", "--trainer.devices=2")


@pytest.mark.slow
def test_fsdp2_resumes_exactly_from_sharded_checkpoints(cli, tmp_path):
    from lit_rlhf.strategies import sharded_checkpoint_keys

    # PPO with LoRA: the partial (trainable-only) load, the online state and the sampling generators.
    ppo = (*ONLINE, "--model.init_args.ppo.ppo_epochs=1", "--data.init_args.batch_size=4",
           "--model.init_args.ppo.mini_batch_size=4")
    assert kill_and_resume(cli, tmp_path, "configs/ppo/demo.yaml", args=(*ppo, LORA, *FSDP2), steps=4,
                           kill_at=2) == 0.0
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert last.is_dir() and not list(last.parent.glob(".*partial"))  # sharded, nothing half-written
    # The trainable-only rule: the adapter and the value head, never the frozen base.
    assert all("lora_" in k or "value_head" in k for k in sharded_checkpoint_keys(last))
    other_rank = LORA.replace('"r": 8', '"r": 4')
    wrong = cli.run(["fit", "-c", "configs/ppo/demo.yaml", *ppo, other_rank, *FSDP2, f"--ckpt_path={last}"])
    assert wrong.code == 2 and "lora.r=8" in wrong.error_lines[-1], wrong.stderr[-2000:]


@pytest.mark.slow
def test_fsdp2_sft_resumes_mid_epoch_exactly(cli, tmp_path):
    # Full fine-tuning: every weight and moment sharded; the packed stream's position restored.
    args = ("--data.init_args.batch_size=4", "--trainer.limit_val_batches=0", *FSDP2)
    assert kill_and_resume(cli, tmp_path, "configs/sft/demo.yaml", args=args, steps=4, kill_at=2) == 0.0
