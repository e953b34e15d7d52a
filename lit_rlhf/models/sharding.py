"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for lit_rlhf's models: what is sharded, and
the few places where every rank must act together.

A stage names its **roots**: the modules whose ``forward`` it calls (the SFT model, the PPO
policy with its value head, a frozen reference copy). Each root is sharded bottom-up: every
transformer block (the model class's ``_no_split_modules``) becomes its own unit, so only one
block's full weights exist at a time; float32 heads (value head, reward score head) get a unit
that keeps them float32 under a bf16 policy; the root's own unit holds the rest (embeddings,
final norm, a tied LM head). FSDP2 requires the first forward of a tree to run through its
root; a stage that later calls a root's submodules directly, outside the root's forward (a
reward adapter on the policy's trunk), gathers the root's own parameters for it
(:func:`root_gathered`).

Under sharding every rank must take part in every collective: a parameter all-gather inside
a forward, a full state dict, a save. Code that runs on rank 0 alone must never touch the
sharded weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def is_sharded(module: nn.Module | None) -> bool:
    """True when ``module`` or a submodule was sharded with ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return module is not None and any(isinstance(m, FSDPModule) for m in module.modules())


def block_classes(root: nn.Module) -> set[str]:
    """Names of the transformer block classes inside ``root``: every transformers model's
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ...)."""
    names: set[str] = set()
    for module in root.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_roots(
    roots: Iterable[nn.Module],
    mesh,
    *,
    param_dtype: torch.dtype | None = None,
    float32_heads: Iterable[nn.Module] = (),
    cpu_offload: bool = False,
) -> None:
    """Shard each root in place over ``mesh`` (a 1-D data-parallel DeviceMesh).

    Args:
        roots: the modules whose forward the stage calls; disjoint.
        param_dtype: the dtype parameters are gathered in for compute (bf16 under ``bf16-mixed``:
            FSDP2's mixed precision, gradients reduced in float32); None: their own dtype.
        float32_heads: modules inside the roots kept in float32 whatever ``param_dtype``.
        cpu_offload: keep the sharded parameters, gradients and optimizer states in CPU memory;
            each unit is copied to the device for its forward and backward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {"mesh": mesh}
    if cpu_offload:
        # Pinned host memory speeds up the copies to a GPU; there is none to pin for on a CPU mesh.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    full = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    heads = {id(h) for h in float32_heads}
    for root in roots:
        blocks = block_classes(root)
        for module in root.modules():
            if module is root:
                continue
            if id(module) in heads:
                fully_shard(module, mp_policy=full, **options)
            elif type(module).__name__ in blocks:
                fully_shard(module, **options, **({"mp_policy": policy} if policy else {}))
        fully_shard(root, **options, **({"mp_policy": policy} if policy else {}))


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in ``module`` (itself included), outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(modules: Iterable[nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Inside: each sharded unit of ``modules`` is all-gathered once, at its first forward, and
    kept whole until the end (sampling: one gather per rollout instead of one per token).
    Costs the memory of the whole unsharded models. A no-op when nothing is sharded."""
    units = [u for m in modules if m is not None for u in fsdp_modules(m)] if enabled else []
    # A root unit keeps its parameters after forward anyway (FSDP2's rule for roots): restored
    # to that; the blocks to resharding after each forward.
    inner = {id(sub) for u in units for sub in fsdp_modules(u) if sub is not u}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(id(unit) in inner, recurse=False)


@contextlib.contextmanager
def root_gathered(root: nn.Module | None) -> Iterator[None]:
    """Inside: the root unit's own parameters (embeddings, norm, tied head) are gathered, for a
    no-grad call of its submodules that bypasses the root's forward (a reward adapter run on
    the policy's trunk). Blocks gather themselves. A no-op when ``root`` is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the
    norm before clipping (float32, on the mesh's device). ``torch.nn.utils.clip_grad_norm_``
    for FSDP2 gradients wherever their shards live.

    With ``cpu_offload`` the sharded gradients are CPU tensors on a mesh whose process group is
    the accelerator's (NCCL): torch's version all-reduces the CPU norms through that group,
    which NCCL cannot do. Here each rank sums the squares of its own shards where they are,
    and only that one scalar crosses to the mesh's device for the one all-reduce. Gradients of
    several meshes or of a mesh of more than one dimension go to torch's version.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    meshes = {id(g.device_mesh): g.device_mesh for g in sharded}
    if len(meshes) != 1 or any(g.device_mesh.ndim != 1 or not isinstance(g.placements[0], Shard) for g in sharded):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    mesh = next(iter(meshes.values()))
    device = torch.device(mesh.device_type)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]

    def squares(tensors: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the squares of ``tensors`` (on any devices), float32 on ``device``."""
        total = torch.zeros((), dtype=torch.float32, device=device)
        for where in {t.device for t in tensors}:
            on = [t for t in tensors if t.device == where]
            total += torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in on]).square().sum().to(device)
        return total

    # Each shard is counted on one rank (summed over the ranks); an unsharded gradient is the same
    # on every rank (counted once).
    total = squares([t for g, t in zip(grads, local) if isinstance(g, DTensor)])
    dist.all_reduce(total, group=mesh.get_group())
    norm = (total + squares([g for g in grads if not isinstance(g, DTensor)])).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's rule: scale only when above max_norm
    for where in {t.device for t in local}:
        scale = coef.to(where)
        for t in local:
            if t.device == where:
                t.mul_(scale)
    return norm


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of ``module`` on rank 0 (in CPU memory), ``{}`` on the
    other ranks. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
