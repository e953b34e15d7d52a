"""CUDA paths (bf16, 8-bit, 4-bit). Off by default; run on a GPU machine with `-m gpu`."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_rlhf.models import LoraSettings, ModelConfig, load_model
from lit_rlhf.objectives.lm import causal_lm_loss
from tests.conftest import TINY_LLAMA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit-nf4"])
def test_cuda_bf16_lora_forward_backward(tokenizer, quantization):
    cfg = ModelConfig(arch=TINY_LLAMA, tokenizer="x", dtype="bfloat16", quantization=quantization,
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model = load_model(cfg, tokenizer, device="cuda")
    model = model.to("cuda") if quantization == "none" else model  # quantized: placed at load
    ids = torch.randint(0, len(tokenizer), (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = causal_lm_loss(model(input_ids=ids).logits, ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_ppo_step_on_cuda_bf16(tmp_path):
    from tests.modules.ppo_helpers import make_data, make_module

    module = make_module(quantization="4bit-nf4", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, limit_train_batches=2,
                        limit_val_batches=0, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(module, make_data(module))
    assert module.rollouts_done == 2
