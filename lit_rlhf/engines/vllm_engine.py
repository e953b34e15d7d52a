"""The ``vllm`` rollout engine: a vLLM ``LLM`` in the training process, token in, token out.

The engine is built at the first rollout from the policy's config and tokenizer with dummy
weights (``load_format="dummy"``: nothing read from disk), then every rollout whose policy
weights changed starts with a **sync**: the policy's weights under their checkpoint names, LoRA
merged and quantized bases dequantized (:func:`~lit_rlhf.models.merged.merged_weights`), go
through vLLM's public reload path, ``collective_rpc("reload_weights", ...)``, always all of
them (a partial reload leaves the layers it was not given re-initialized: measured with vllm
0.32), and the prefix cache is reset (its keys and values belong to the old weights). The value
head is never sent.

Requests are one per row: each row has its own length limit (the length draw) and its own seed,
drawn from the run's generator for the global batch (:class:`~lit_rlhf.modules.rollout.Rows`),
so one seed gives the same rollouts on 1 or N devices and after a resume. The log-probs returned
are vLLM's ``processed_logprobs``: those of the distribution sampled from (temperature, top-k,
top-p applied), as the built-in sampler logs them.

In-process side effects of vLLM's CPU worker that this module undoes: it replaces
``torch.set_num_threads`` for the whole process, reseeds the global ``random``/NumPy/torch
generators at start-up, and draws from torch's global generator at every decode step; the
thread setter and the generator states are restored around every engine call.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
import time
from collections.abc import Iterator

import torch

from lit_rlhf.engines import VLLMConfig, require_vllm
from lit_rlhf.models.heads import unwrap_peft
from lit_rlhf.models.merged import merged_weights
from lit_rlhf.modules.rollout import Rollout, Rows


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Inside: vLLM may reseed and draw from the global generators and patch ``torch.set_num_threads``;
    after: all three generators, the thread setter and the thread count are as before."""
    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes in every layer: keys and values of each KV head."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class VLLMEngine:
    """A vLLM engine holding its own copy of the policy; see the module docstring.

    Args:
        config: ``sampling.vllm``.
        tokenizer: the policy's tokenizer (written beside the engine's config: vLLM detokenizes for stop strings).
        seed: the run's seed (vLLM's own; every request also gets its seed from the run's generator).
        dtype: the engine's compute dtype (float32 under ``32-true``, bfloat16 under bf16 precisions).
    """

    def __init__(self, config: VLLMConfig, tokenizer, *, seed: int, dtype: torch.dtype) -> None:
        require_vllm()
        self.config, self.tokenizer, self.seed, self.dtype = config, tokenizer, seed, dtype
        self.llm = None
        self.max_model_len: int | None = None
        self.folder: tempfile.TemporaryDirectory | None = None
        self.syncs = 0
        self.asleep = False

    @property
    def started(self) -> bool:
        return self.llm is not None

    def start(self, lm, max_model_len: int, max_num_seqs: int, device: torch.device) -> None:
        """Build the engine for ``lm`` (a transformers model, peft-wrapped or not) with dummy weights."""
        if self.config.sleep and device.type == "cpu":
            raise ValueError("sampling.vllm.sleep: vLLM has no sleep mode on the CPU; set it to false")
        from vllm import LLM

        base = unwrap_peft(lm)
        config = copy.deepcopy(base.config)
        for key in ("quantization_config", "_pre_quantization_dtype"):  # the engine gets dequantized weights
            if hasattr(config, key):
                delattr(config, key)
        config.architectures = [type(base).__name__]
        config.dtype = self.dtype
        self.folder = tempfile.TemporaryDirectory(prefix="lit_rlhf_vllm_")
        config.save_pretrained(self.folder.name)
        self.tokenizer.save_pretrained(self.folder.name)
        self.max_model_len = max_model_len
        memory = {}
        if self.config.kv_cache_gib is not None:
            memory["kv_cache_memory_bytes"] = int(self.config.kv_cache_gib * 2**30)
        elif device.type == "cpu":  # every row at full length, twice over, at least 64 MiB
            need = 2 * max_num_seqs * max_model_len * kv_bytes_per_token(config, self.dtype)
            memory["kv_cache_memory_bytes"] = max(need, 64 * 2**20)
        else:
            memory["gpu_memory_utilization"] = self.config.gpu_memory_fraction
        # In this process (the engine's worker is not a child process), as the sync needs.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with _process_state_kept():
            self.llm = LLM(
                model=self.folder.name, tokenizer=self.folder.name, load_format="dummy",
                dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype],
                seed=self.seed, max_model_len=max_model_len, max_num_seqs=max(max_num_seqs, 1),
                enforce_eager=self.config.enforce_eager, logprobs_mode="processed_logprobs",
                generation_config="vllm",  # the model folder's sampling defaults never apply
                enable_sleep_mode=self.config.sleep, trust_remote_code=False, **memory,
            )

    def sync(self, lm) -> float:
        """Send ``lm``'s weights (merged, dequantized, in the engine's dtype) to the engine; the seconds it took."""
        start = time.perf_counter()
        self._wake()
        weights = list(merged_weights(lm, self.dtype))
        with _process_state_kept():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
        self.syncs += 1
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Release the engine's memory until it is next used (``sampling.vllm.sleep``)."""
        if self.config.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        """Back from :meth:`sleep` (level 1 keeps the weights): a rollout may need no sync first."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(
        self,
        policy,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        max_new_tokens: torch.Tensor,
        *,
        eos_token_id: int | list[int] | None,
        pad_token_id: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        num_generations: int = 1,
        rows: Rows = Rows(),
        stop=None,
        **unused,
    ) -> Rollout:
        """:func:`~lit_rlhf.modules.rollout.generate`'s arguments and result, sampled by the engine
        (``policy`` is not run: the engine holds its synced copy). ``temperature=0``: greedy.

        Args:
            query_ids, query_mask: (B, Tq) left-padded prompts.
            max_new_tokens: (B * G,) each row's length limit; a row also stops after an id of
                ``eos_token_id`` (kept in the response) or once its text holds one of ``stop``'s strings.
            rows: where the B * G rows sit in the global batch: each row's request seed is its draw.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        device = query_ids.device
        g = num_generations
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids.cpu(), query_mask.cpu())]
        n = len(prompts) * g
        limits = max_new_tokens.tolist()
        if len(limits) != n:
            raise ValueError(f"max_new_tokens {tuple(max_new_tokens.shape)}: expected ({n},)")
        longest = max(len(p) for p in prompts) + max(limits)
        if longest > self.max_model_len:
            raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens + {max(limits)} new ones exceed the "
                             f"engine's {self.max_model_len}: raise sampling.vllm.max_model_len")
        seeds = rows.draw(n, lambda total: torch.randint(0, 2**31 - 1, (total,), generator=generator,
                                                         device=generator.device if generator is not None else None))
        ends = [] if eos_token_id is None else torch.as_tensor(eos_token_id).reshape(-1).tolist()
        strings = list(getattr(stop, "strings", None) or [])
        params = [SamplingParams(
            n=1, temperature=temperature, top_k=top_k if top_k > 0 else 0, top_p=top_p, max_tokens=int(limit),
            seed=int(seed), logprobs=0, ignore_eos=True, stop_token_ids=ends or None, stop=strings or None,
            include_stop_str_in_output=True, detokenize=bool(strings),
        ) for limit, seed in zip(limits, seeds.tolist())]
        requests = [TokensPrompt(prompt_token_ids=prompts[i // g]) for i in range(n)]
        self._wake()
        with _process_state_kept():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        logprobs = [[step[t].logprob for step, t in zip(out.outputs[0].logprobs, ids)]
                    for out, ids in zip(outputs, tokens)]
        width = max(len(t) for t in tokens)
        response = torch.full((n, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=query_mask.dtype)
        sampled = torch.zeros(n, width)
        for i, (ids, lp) in enumerate(zip(tokens, logprobs)):
            response[i, : len(ids)], mask[i, : len(ids)], sampled[i, : len(ids)] = torch.tensor(ids), 1, torch.tensor(lp)
        query_ids, query_mask = (t.repeat_interleave(g, 0) for t in (query_ids, query_mask))
        return Rollout(query_ids, query_mask, response.to(device), mask.to(device), sample_logprobs=sampled.to(device))
