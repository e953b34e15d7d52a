"""Policy + value on one trunk: a scalar value head beside the LM head (optional); a trunk
whose last block computes only the positions a head reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from lit_rlhf.models.compat import cache_kwargs, output_cache
from lit_rlhf.models.cpu_paths import cpu_path_enabled
from lit_rlhf.objectives.logprobs import EntropyMode, head_logprobs


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in it), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def full_precision_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` in the head's own dtype with autocast off; (..., out) float32.

    Under ``bf16-mixed`` autocast would run a float32 head's matmul in bf16 (a value or a
    reward with 3 significant digits); under ``bf16-true`` Lightning has cast the head to bf16,
    and a float32 input would not match its weight. The input is cast to the weight's dtype.
    """
    device = hidden.device.type
    off = torch.autocast(device, enabled=False) if device in ("cuda", "cpu", "xpu") else contextlib.nullcontext()
    with off:
        return head(hidden.to(head.weight.dtype)).float()


def last_block(trunk: nn.Module) -> nn.Module | None:
    """The last transformer block in ``trunk`` (a transformers model), or None if it has none."""
    from lit_rlhf.models.sharding import block_classes

    names = block_classes(trunk)
    # By the class's ancestry: fully_shard renames a block's class FSDP<Name>.
    blocks = [m for m in trunk.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    return blocks[-1] if blocks else None


def last_block_mlp(trunk: nn.Module) -> nn.Module | None:
    """The ``mlp`` submodule of ``trunk``'s :func:`last_block`, or None when its blocks have
    none (OPT's are plain ``fc1``/``fc2``)."""
    return _mlp(last_block(trunk))


def _mlp(block: nn.Module | None) -> nn.Module | None:
    mlp = getattr(block, "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None


@contextlib.contextmanager
def last_block_rows(trunk: nn.Module, index: torch.Tensor) -> Iterator[None]:
    """A CPU path: inside, the MLP of ``trunk``'s last block computes positions ``index`` only.

    A reward model reads its last hidden state at one token per sequence, yet every block runs
    on every token. In the last block only the attention needs all of them (for their keys and
    values); its MLP, the larger part of the block (two or three hidden x intermediate matmuls
    per token), is needed only where the state is read. The MLP's input is cut to ``index`` and
    its output put back at those positions, zeros elsewhere: the last hidden state is exact at
    ``index`` and wrong at every other position, which the caller must not read. For a reward
    model this saves three quarters of one block's matmuls: a fifth of the blocks' at 4 layers
    (the ``tiny-cpu`` benchmark's), 2% at 32; ``benchmarks/cpu_paths.py`` measures it at a
    realistic shape (``small-cpu``).

    Nothing changes where :func:`~lit_rlhf.models.cpu_paths.cpu_path_enabled` is false for
    ``rm_last_block_rows`` on ``index``'s device (any device but the CPU, or the path switched
    off with ``LIT_RLHF_CPU_PATHS``), when the blocks have no ``mlp`` (:func:`last_block_mlp`),
    and when the block has gradient checkpointing on (its recomputation in the backward would
    run after this context has ended, on every position).

    Args:
        trunk: the transformers model (the hidden states' module: ``model.base_model``).
        index: (S,) positions along the sequence dimension of the (B, T, H) hidden states, the
            same for every row.
    """
    if not cpu_path_enabled("rm_last_block_rows", index.device):
        yield
        return
    block = last_block(trunk)
    mlp = _mlp(block)
    if mlp is None or getattr(block, "gradient_checkpointing", False):
        yield
        return
    length = []  # T, seen by the pre-hook

    def cut(module, args, kwargs):
        hidden = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        length[:] = [hidden.size(1)]

        def rows(x):  # every (B, T, ...) input: Bloom's MLP also takes the residual
            return x.index_select(1, index) if isinstance(x, torch.Tensor) and x.shape[:2] == hidden.shape[:2] else x
        return tuple(rows(a) for a in args), {k: rows(v) for k, v in kwargs.items()}

    def put_back(module, args, kwargs, output):
        def spread(y):  # (B, S, ...) -> (B, T, ...), differentiable in y
            return y.new_zeros(y.size(0), length[0], *y.shape[2:]).index_copy(1, index, y)
        if isinstance(output, tuple):  # e.g. a mixture of experts' (hidden, router logits)
            return (spread(output[0]), *output[1:])
        return spread(output)

    hooks = [mlp.register_forward_pre_hook(cut, with_kwargs=True),
             mlp.register_forward_hook(put_back, with_kwargs=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class PolicyOutput(NamedTuple):
    logits: torch.Tensor | None
    """(B, T', V) next-token logits at the positions asked for (all T by default); None when
    the hidden states were asked for instead."""
    values: torch.Tensor | None
    """(B, T) value estimates in float32, or None when not asked for."""
    cache: object | None
    """The KV cache when ``use_cache``."""
    hidden: torch.Tensor | None = None
    """(B, T', H) last hidden states at those positions, with ``hidden_only`` (no logits)."""


class PolicyWithValueHead(nn.Module):
    """A causal LM (plain or peft) whose last hidden state also feeds a scalar value head.

    One trunk pass gives both logits and values: no second model for the critic. The value
    head starts at zero (weights and bias), so the initial values are 0 and the first
    advantages are the plain returns rather than noise from a random head.
    """

    def __init__(self, lm: nn.Module, value_head: bool = True) -> None:
        """
        Args:
            lm: the causal LM (plain or peft).
            value_head: False for critic-free methods: no head, and ``with_values`` must be
                False in every call.
        """
        super().__init__()
        self.lm = lm
        self.value_head: nn.Linear | None = None
        if value_head:
            hidden = self.base_model.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def base_model(self) -> nn.Module:
        """The transformers model underneath (LoRA layers, if any, are injected in it)."""
        return unwrap_peft(self.lm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        with_values: bool = True,
        logits_slice: slice | torch.Tensor = slice(None),
        hidden_only: bool = False,
        **attention_kwargs,
    ) -> PolicyOutput:
        """(B, T) ids -> logits (B, T', V) for the positions in ``logits_slice`` (a slice, or an
        index tensor of positions), values (B, T). ``attention_kwargs`` go to every attention
        layer (e.g. ``segment_lengths`` for :mod:`~lit_rlhf.models.attention`'s segment attention).

        The LM head is a (hidden x vocab) matmul per position, a large share of a small
        model's compute: callers ask only for the positions they read (the last one while
        sampling, the response positions when scoring actions). ``hidden_only``: return the last
        hidden states at those positions instead of logits, for :meth:`token_logprobs` (scoring
        and update passes, which never hold the whole (tokens x vocabulary) logits).
        """
        if with_values and self.value_head is None:
            raise ValueError("this policy has no value head: call it with with_values=False")
        base = self.base_model
        decoder = base.get_decoder()
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(decoder, cache),
            **attention_kwargs,
        )
        hidden = out.last_hidden_state
        values = full_precision_head(self.value_head, hidden).squeeze(-1) if with_values else None
        if hidden_only:
            return PolicyOutput(None, values, output_cache(out) if use_cache else None, hidden[:, logits_slice])
        # Contiguous: on a strided slice, torch's matmul picks its kernel by whether the weights
        # require grad, so a frozen copy of the policy would round differently from the policy.
        logits = base.get_output_embeddings()(hidden[:, logits_slice].contiguous())
        return PolicyOutput(logits, values, output_cache(out) if use_cache else None)

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                       entropy: EntropyMode = "skip") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, H) last hidden states (from ``hidden_only``), (N,) labels -> (N,) log-probs and
        entropies through the LM head, a chunk of tokens at a time (:func:`head_logprobs`).

        Called right after this policy's forward: a sharded root keeps its own parameters (the
        LM head among them) gathered after its forward until its backward has run.
        """
        head = self.base_model.get_output_embeddings()
        # Contiguous rows: see forward (a strided input rounds by whether the weights need grad).
        return head_logprobs(hidden.contiguous(), head, labels, head.weight.shape[0], temperature, entropy)
