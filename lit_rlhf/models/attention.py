"""Causal attention over sequences laid end to end in one row, one SDPA call per sequence.

A packed reward-model batch (:func:`~lit_rlhf.data.pack_pairs`) is a single row holding
all 2B sequences back to back, with no padding. Given such a row, transformers' SDPA path
would keep attention inside each sequence with a (1, 1, T, T) block-diagonal mask over
all T tokens, and SDPA computes every entry of it: T² work. :func:`segment_sdpa` instead
splits queries, keys and values at the sequence boundaries and runs causal SDPA on each
piece, which costs the sum of the squared lengths and needs no mask.

It is registered with transformers under :data:`SEGMENT_SDPA`. A model switched to it by
:func:`use_segment_attention` behaves exactly like ``sdpa`` on every call, except the calls
that pass ``segment_lengths=[L1, L2, ...]`` (which transformers hands on to every attention
layer, and again when gradient checkpointing recomputes a layer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_SDPA = "lit_rlhf_segment_sdpa"


@dataclass
class SegmentPrefix:
    """Keys and values that the segments of a packed row continue: segment i attends first to
    the last ``lengths[i]`` positions of row ``rows[i]`` of ``cache`` (a left-padded prompt run
    once for all the responses that share it), then causally to its own tokens."""

    cache: object
    """A transformers cache whose layers hold ``keys``/``values`` (U, H_kv, Tq, D)."""
    rows: torch.Tensor
    """(S,) the cache row of each segment."""
    lengths: list[int]
    """Each segment's prefix length (its prompt's real tokens)."""


def segment_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_lengths: list[int] | None = None,
    segment_prefix: SegmentPrefix | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (B, T, H, D) and no weights.

    Args:
        query: (B, H, T, D); key, value: (B, H_kv, T, D), H a multiple of H_kv.
        attention_mask: used only without ``segment_lengths`` (plain SDPA). With them, the
            row must hold nothing but the segments, so causal attention inside each is the
            whole mask.
        segment_lengths: lengths of the sequences in the (single) row, summing to T.
        segment_prefix: cached keys and values each segment continues (see :class:`SegmentPrefix`).
    """
    if segment_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.size(0) != 1 or sum(segment_lengths) != query.size(2):
        raise ValueError(
            f"segment attention needs one row holding exactly the segments; got {query.size(0)} rows of "
            f"{query.size(2)} tokens for segment lengths summing to {sum(segment_lengths)}"
        )
    gqa = key.size(1) != query.size(1)
    dtype = query.dtype
    # CPU SDPA in bf16/fp16 compiles and keeps kernels for every new sequence length
    # (measured: about 8 MB of memory per length), and every packed batch brings new
    # lengths. In float32 it keeps nothing and runs about as fast; autocast is off here,
    # or it would cast the inputs straight back.
    upcast = query.device.type == "cpu" and (dtype != torch.float32 or torch.is_autocast_enabled("cpu"))
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        pieces = zip(query.split(segment_lengths, 2), key.split(segment_lengths, 2), value.split(segment_lengths, 2))
        # split's backward is one cat, where slicing would write a zero-filled full-size
        # gradient per segment.
        if segment_prefix is None:
            out = torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                            scale=scaling, enable_gqa=gqa)
                             for q, k, v in pieces], dim=2)
        else:
            out = _prefixed_segments(module, pieces, segment_prefix, dtype if upcast else None, dropout, scaling, gqa)
    return out.transpose(1, 2).to(dtype).contiguous(), None


def _prefixed_segments(module, pieces, prefix: SegmentPrefix, upcast_from, dropout, scaling, gqa) -> torch.Tensor:
    """(1, H, T, D): each segment's attention over its prefix's cached keys and values, then
    causally over its own; ``pieces`` are the segments' (q, k, v)."""
    layer = prefix.cache.layers[module.layer_idx]
    keys, values = layer.keys, layer.values
    if upcast_from is not None:
        keys, values = keys.float(), values.float()
    # One gather of the segments' prompt rows, then unbind: its backward is one stack, where
    # indexing the cache per segment would write a zero-filled cache-size gradient each time.
    rows_k, rows_v = keys.index_select(0, prefix.rows).unbind(0), values.index_select(0, prefix.rows).unbind(0)
    out = []
    for (q, k, v), pk, pv, n in zip(pieces, rows_k, rows_v, prefix.lengths):
        length = q.size(2)
        k, v = torch.cat([pk[None, :, pk.size(1) - n:], k], 2), torch.cat([pv[None, :, pv.size(1) - n:], v], 2)
        # Query j sits at prefix position n + j: it sees the whole prefix and its segment up to itself.
        allowed = torch.arange(n + length, device=q.device)[None] <= torch.arange(n, n + length, device=q.device)[:, None]
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                                  enable_gqa=gqa))
    return torch.cat(out, dim=2)


AttentionInterface.register(SEGMENT_SDPA, segment_sdpa)
# Masks are built as for sdpa; a call with segment_lengths passes an all-ones 2D mask,
# for which sdpa builds none.
AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)


def has_local_attention(config) -> bool:
    """True when some layers attend through a sliding window, which segment attention ignores."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any(kind != "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is not None


def use_segment_attention(model: nn.Module) -> bool:
    """Switch a transformers model from ``sdpa`` to :data:`SEGMENT_SDPA`; True if it now uses it.

    Left as they are: other implementations (eager, flash attention), models with
    sliding-window layers, and models that transformers cannot switch (those without its
    attention interface). The choice is not written to ``config.json`` by
    ``save_pretrained``: exports load with the default.
    """
    if model.config._attn_implementation == "sdpa" and not has_local_attention(model.config):
        try:
            model.set_attn_implementation(SEGMENT_SDPA)
        except (ValueError, NotImplementedError):
            pass  # stays on sdpa
    return model.config._attn_implementation == SEGMENT_SDPA


# ------------------------------------------------------------------------------ packed SFT chunks


def packed_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T) restarting position ids -> (B, 1, T, T) block-diagonal causal mask.

    A new document starts wherever the position does not increase by exactly 1 (the same
    rule as transformers' packed-sequence detection). Token ``i`` may attend to token ``j``
    when both lie in the same document and ``j <= i``. With ``dtype=None`` the mask is bool
    (True: attend), the form ``sdpa`` takes in any compute dtype; with a float ``dtype`` it is
    additive (0 or the most negative value), the form ``eager`` attention adds to its scores.
    transformers passes a 4D mask through unchanged, so isolation holds whether or not a
    model's own code reads packed ``position_ids`` (OPT's and BLOOM's do not).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    document = starts.long().cumsum(-1)  # (B, T) document index of every token
    length = position_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = ((document[:, :, None] == document[:, None, :]) & causal)[:, None]
    if dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def is_flash_attention(implementation: str | None) -> bool:
    """True for every flash-attention implementation, named by its family as transformers
    does: ``flash_attention_2``/``_3``/``_4`` and hub kernels such as
    ``kernels-community/flash-attn2``, which transformers may switch to when the
    ``flash_attn`` package is missing (a prefix test would miss those)."""
    return implementation is not None and "flash" in implementation


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """The sequence boundaries of flash attention's variable-length kernel, from (B, T)
    restarting ``position_ids``: every row is cut into its documents and the rows are laid
    end to end (the kernel sees B*T tokens).

    transformers finds packed sequences from position ids only when the batch is one row;
    with B > 1 and no boundaries its flash path attends across documents. Passed as
    ``cu_seq_lens_q``/``_k`` (int32, (S + 1,)) and ``max_length_q``/``_k`` (a Python int).
    """
    batch, length = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1  # the rule of packed_causal_mask
    starts[::length] = True  # a row never continues the previous row's document
    cu = torch.cat([starts.nonzero()[:, 0], flat.new_tensor([batch * length])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def keeps_packed_sequences_apart(implementation: str | None) -> bool:
    """True when ``implementation`` attends inside each sequence of a packed row by itself:
    segment attention (:data:`SEGMENT_SDPA`, one causal SDPA per sequence) or flash attention's
    variable-length kernel. Anything else (``eager``, and ``sdpa`` on a model with sliding-window
    layers or one transformers cannot switch) would need a block mask over the whole row,
    quadratic in the row's length, through which a sliding window does not apply: the reward
    model's and DPO's packed passes give such models their sequences as right-padded rows."""
    return implementation == SEGMENT_SDPA or is_flash_attention(implementation)


def packed_attention_kwargs(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The keyword arguments that keep packed documents apart under ``attn_implementation``.

    Flash attention: no mask, the documents' boundaries for its variable-length kernel (see
    :func:`flash_varlen_kwargs`). ``eager``: an additive mask in ``dtype``. Everything else
    (``sdpa``): a bool block-diagonal mask.
    """
    if is_flash_attention(attn_implementation):
        return flash_varlen_kwargs(position_ids)
    if attn_implementation == "eager":
        return {"attention_mask": packed_causal_mask(position_ids, dtype)}
    return {"attention_mask": packed_causal_mask(position_ids)}


# model_type -> why its documents cannot be isolated inside a packed chunk.
_UNPACKABLE = {
    "bloom": "BLOOM takes its ALiBi positions from the attention mask, so a block mask breaks them",
    "mpt": "MPT takes its ALiBi positions from the attention mask, so a block mask breaks them",
}


def packing_problem(config, seq_length: int | None) -> str | None:
    """Why packed chunks of ``seq_length`` tokens cannot keep documents apart on this model, or None."""
    model_type = getattr(config, "model_type", "")
    if model_type in _UNPACKABLE:
        return _UNPACKABLE[model_type]
    if getattr(config, "alibi", False):  # e.g. Falcon with alibi=True
        return f"{model_type} with alibi=True takes its positions from the attention mask"
    window = getattr(config, "sliding_window", None)
    if has_local_attention(config) and window is not None and seq_length is not None and seq_length > window:
        return (f"its sliding-window layers (window {window}) would see a full block mask at seq_length "
                f"{seq_length}; use seq_length <= {window}")
    return None
