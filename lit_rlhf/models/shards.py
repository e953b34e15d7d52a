"""Load a pretrained model under FSDP2 without any rank ever holding all of it.

The model is built on the meta device (no memory), buffers, LoRA adapters and new heads on the
CPU; the stage shards it (:func:`~lit_rlhf.models.sharding.shard_roots`); then every rank
reads from the safetensors files only the rows of each weight that it owns (FSDP2 shards along
dim 0), straight into its shard: a 151,936 x 896 embedding is read as this rank's rows, never
whole, and the files are read with plain reads, not memory-mapped (a mapped file's pages count
in the process's resident memory for as long as it is mapped).

    model = load_model(cfg, tokenizer, device="meta")   # weights on meta, adapters on the CPU
    shard_roots([model], mesh)
    load_shards([model], checkpoint_files(source))
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CHUNK_BYTES = 32 * 2**20  # one read's staging buffer: what a weight of another dtype costs on top
# What peft inserts into a wrapped module's parameter names (its adapter is "default").
_PEFT_SEGMENTS = (".base_layer", ".original_module", ".modules_to_save.default")


class Entry:
    """Where one tensor lies in a safetensors file: dtype, shape and byte offset."""

    def __init__(self, file: Path, dtype: str, shape: list[int], start: int) -> None:
        self.file, self.dtype, self.shape, self.start = file, _DTYPES[dtype], tuple(shape), start

    def read_rows(self, first: int, out: torch.Tensor) -> None:
        """Rows ``first : first + len(out)`` (dim 0) into ``out`` (any device and dtype), through
        a staging buffer of at most ``_CHUNK_BYTES``."""
        if out.numel() == 0:
            return
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        per_read = max(1, _CHUNK_BYTES // max(row, 1))
        flat = out.view(out.shape[0], -1) if out.dim() else out.view(1, 1)
        with open(self.file, "rb", buffering=0) as f:
            for a in range(0, flat.shape[0], per_read):
                n = min(per_read, flat.shape[0] - a)
                f.seek(self.start + (first + a) * row)
                staged = torch.empty(n * row, dtype=torch.uint8)
                if f.readinto(staged.numpy()) != n * row:
                    raise ValueError(f"{self.file}: truncated (a tensor ends past the end of the file)")
                flat[a:a + n].copy_(staged.view(self.dtype).view(n, -1))


def checkpoint_files(source: str | Path) -> dict[str, Entry]:
    """Every tensor of the safetensors checkpoint in folder ``source`` (one file or an index),
    by name, read from the files' headers only; ``{}`` when it has no safetensors files."""
    source = Path(source)
    index = source / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({source / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [source / "model.safetensors"] if (source / "model.safetensors").is_file() else []
    entries = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                entries[name] = Entry(file, info["dtype"], info["shape"], 8 + size + info["data_offsets"][0])
    return entries


def checkpoint_key(name: str) -> str | None:
    """The checkpoint's name for parameter ``name`` of a (peft-wrapped) transformers model, or
    None for an adapter's own weights (``lora_A``, ...), which no base checkpoint holds."""
    if ".lora_" in name or name.startswith("lora_"):
        return None
    for segment in _PEFT_SEGMENTS:
        name = name.replace(segment, "")
    return name


def hf_models(root: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside ``root`` (the policy's, a reference copy's)."""
    from transformers import PreTrainedModel

    found, inside = [], set()
    for module in root.modules():
        if isinstance(module, PreTrainedModel) and id(module) not in inside:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def init_adapters(model: nn.Module) -> int:
    """Make the LoRA adapters of a model built on meta real, on the CPU, initialised by peft's own
    rule (B zero, so the model starts as its base); returns how many layers.

    peft puts new adapters on their base layer's device, meta here, where their initial values are
    lost. Re-drawn here, so they are not the draws of an unsharded load with the same seed
    (every rank draws the same under ``seed_everything``)."""
    from peft.tuners.lora import LoraLayer

    layers = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        for sub in module.modules():
            if sub is not base and sub not in set(base.modules()) and any(p.is_meta for p in sub.parameters(recurse=False)):
                sub.to_empty(device="cpu", recurse=False)
        for name in module.lora_A.keys() | module.lora_embedding_A.keys():
            module.reset_lora_parameters(name, True)
        layers += 1
    return layers


def missing_weights(model: nn.Module, entries: dict[str, Entry]) -> list[str]:
    """Names of ``model``'s meta parameters and buffers that the checkpoint does not hold (a tied
    weight counts as held when one of its names is)."""
    held: dict[int, bool] = {}
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if not tensor.is_meta or (key := checkpoint_key(name)) is None:
            continue
        held[id(tensor)] = held.get(id(tensor), False) or key in entries
        names.setdefault(id(tensor), name)
    return [names[i] for i, ok in held.items() if not ok]


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of ``tensor`` that this rank holds (a plain tensor: all of them) and the index of
    the first: FSDP2 shards dim 0 as ``torch.chunk`` does (ceil(n / ranks) rows each, in rank order)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"cannot load a weight sharded as {placements} over a {mesh.ndim}-D mesh")
    local = tensor.to_local()
    rows = tensor.shape[0]
    per_rank = -(-rows // mesh.size())
    first = min(mesh.get_local_rank() * per_rank, rows)
    assert local.shape[0] == max(0, min(per_rank, rows - first)), (tensor.shape, local.shape, first)
    return local, first


@torch.no_grad()
def load_shards(module: nn.Module, roots: Iterable[nn.Module], entries: dict[str, Entry]) -> None:
    """Materialize the sharded ``roots`` of ``module`` (built on meta, then sharded) on their mesh's
    device, and read each rank's rows of every weight that was on meta from the checkpoint
    ``entries``. A root may be a part of a transformers model (a reward model's trunk): the
    checkpoint's names come from the transformers models inside ``module``.

    What was not on meta (adapters, a value head, buffers such as rotary frequencies) keeps its
    values: ``to_empty`` re-allocates everything, so those are copied aside first (small).
    """
    def named() -> list[tuple[str, torch.Tensor]]:
        return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]

    inside = {id(t) for root in roots for t in [*root.parameters(), *root.buffers()]}
    empty, kept = set(), {}
    for name, t in named():
        if id(t) in inside:
            local = _local_rows(t)[0]
            if local.is_meta:
                empty.add(name)
            else:
                kept.setdefault(name, local.clone())
    for root in roots:
        tensors = [*root.parameters(), *root.buffers()]
        device = next((t.device_mesh.device_type for t in tensors if hasattr(t, "device_mesh")), "cpu")
        root.to_empty(device=device)
    # By name again: to_empty may have replaced the parameter objects.
    for name, t in named():
        if name in kept:
            _local_rows(t)[0].copy_(kept[name])
    # Each tensor object once: tied weights share one, which the checkpoint names once or twice.
    targets: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for hf in hf_models(module):
        prefix = next(n for n, m in module.named_modules() if m is hf)
        for name, t in [*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False)]:
            if f"{prefix}.{name}".lstrip(".") in empty and (key := checkpoint_key(name)) is not None:
                targets.setdefault(id(t), (t, []))[1].append(key)
    for tensor, keys in targets.values():
        key = next((k for k in keys if k in entries), None)
        if key is None:
            raise ValueError(f"{keys[0]}: not in the checkpoint (checked before sharding: a bug)")
        entry = entries[key]
        if entry.shape != tuple(tensor.shape):
            raise ValueError(f"{key}: shape {list(entry.shape)} in the checkpoint, {list(tensor.shape)} in the model")
        local, first = _local_rows(tensor)
        entry.read_rows(first, local)
    if missed := empty - {n for n, t in named() if id(t) in targets}:
        raise ValueError(f"{sorted(missed)[0]}: left empty (outside any transformers model)")
