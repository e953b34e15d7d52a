"""SFTModule end to end on the demo: loss falls, adapter saved, NaN stops, DDP runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.data import SFTDataModule
from lit_rlhf.models import LoraSettings, ModelConfig, load_model
from lit_rlhf.modules import SFTModule
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[2]


def _module(lora=None, lr=3e-3):
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora)
    return SFTModule(lm, OptimConfig(lr=lr, warmup_steps=5), seq_length=64)


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
                    num_sanity_val_steps=0, limit_val_batches=4, log_every_n_steps=1)
    return L.Trainer(**{**defaults, **kwargs})


def _data(module, **kwargs):
    return SFTDataModule(path="demo", seq_length=64, batch_size=8, tokenizer=module.tokenizer, **kwargs)


def test_full_finetune_loss_falls(tmp_path):
    torch.manual_seed(0)
    module = _module()
    trainer = _trainer(tmp_path, max_steps=40, val_check_interval=20, check_val_every_n_epoch=None)
    trainer.fit(module, _data(module))
    losses = trainer.logged_metrics
    assert losses["val/loss"] < 0.8 * torch.log(torch.tensor(float(len(module.tokenizer))))
    assert (Path(trainer.log_dir) / "model" / "model.safetensors").is_file()
    assert any(Path(trainer.log_dir).glob("events.out.tfevents.*"))


@pytest.mark.parametrize("precision, clip, fused", [("32-true", 1.0, True), ("bf16-mixed", None, True),
                                                    ("bf16-mixed", 1.0, False)])
def test_adamw_is_fused_unless_lightning_must_clip_under_mixed_precision(tmp_path, precision, clip, fused):
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, precision=precision, gradient_clip_val=clip)
    trainer.fit(module, _data(module))  # Lightning raises if asked to clip a fused optimizer here
    assert trainer.optimizers[0].defaults["fused"] is fused


def test_lora_adapter_is_saved_in_peft_format_and_checkpoint_is_small(tmp_path):
    from peft import PeftModel

    module = _module(lora=LoraSettings(r=4, alpha=8, dropout=0.0), lr=1e-2)
    trainer = _trainer(tmp_path, max_steps=10, val_check_interval=10, check_val_every_n_epoch=None)
    trainer.fit(module, _data(module))
    adapter = Path(trainer.log_dir) / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()

    # The adapter reloads onto the same base with plain peft and reproduces the module's logits.
    # (the seeded random init rebuilds the same base weights)
    base = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), module.tokenizer)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(0, len(module.tokenizer), (1, 12))
    module.model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)

    ckpt = torch.load(next((Path(trainer.log_dir) / "checkpoints").glob("*.ckpt")), weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


class _PoisonAt(L.Callback):
    """Make every weight NaN before training step ``step`` (a diverged run)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(tmp_path, max_steps=10, callbacks=[ckpt, _PoisonAt(5)], limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"train/loss is nan at step 5: stopping; the newest "
                                                 r"checkpoint, .*epoch=0-step=4.ckpt \(step 4\), is finite"):
        trainer.fit(module, _data(module))
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    state = torch.load(tmp_path / "ckpt" / saved[-1], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


class _InfGradientAt(L.Callback):
    """Before optimizer step ``step``, set one gradient to ``value``: the loss is still finite."""

    def __init__(self, step, value):
        self.step, self.value = step, value

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(self.value)


class _BreakWeightAfter(L.Callback):
    """After step ``step`` (before the checkpoint of that step is written) make one weight inf."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("inf")


def _all_finite(path) -> bool:
    ckpt = torch.load(path, weights_only=True)
    moments = [t for opt in ckpt["optimizer_states"] for s in opt["state"].values() for t in s.values()]
    return all(torch.isfinite(t).all() for t in [*ckpt["state_dict"].values(), *moments])


@pytest.mark.parametrize("poison, match", [
    # An inf gradient: AdamW's update is NaN, the weight with it; the loss of that step was finite.
    (lambda: _InfGradientAt(3, float("inf")), r"optimizer step 4 made model\..* non-finite"),
    # A huge gradient: exp_avg_sq overflows to inf, the update is 0, the weights stay finite.
    (lambda: _InfGradientAt(3, 1e30), r"optimizer step 4 made model\..*:exp_avg_sq non-finite"),
    # Broken after the step's own check, before its checkpoint: the save refuses.
    (lambda: _BreakWeightAfter(4), r"refusing to save a checkpoint at step 4: model\..* is non-finite"),
], ids=["inf-gradient", "optimizer-moment", "after-the-step"])
def test_non_finite_weights_or_moments_never_reach_a_checkpoint(tmp_path, poison, match):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _module(lr=1e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(tmp_path, max_steps=8, callbacks=[poison(), ckpt], limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=match + r".*the newest checkpoint, .*epoch=0-step=2.ckpt \(step 2\)"):
        trainer.fit(module, _data(module))
    saved = sorted((tmp_path / "ckpt").iterdir())
    assert [p.name for p in saved] == ["epoch=0-step=2.ckpt"]
    assert _all_finite(saved[0])


def test_seq_length_beyond_positions_fails_before_loading():
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo")  # 256 positions
    with pytest.raises(ValueError, match="seq_length=512 exceeds the model's 256 positions"):
        SFTModule(lm, seq_length=512)


@pytest.mark.slow
def test_ddp_two_process_cpu_fit(tmp_path):
    cmd = [sys.executable, "train.py", "fit", "-c", "configs/sft/demo.yaml",
           f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2",
           "--trainer.enable_progress_bar=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = list(tmp_path.glob("lightning_logs/version_*"))
    assert len(logs) == 1 and (logs[0] / "model" / "config.json").is_file()  # the demo fine-tunes in full
    assert "distributed_backend=gloo" in out.stderr + out.stdout
