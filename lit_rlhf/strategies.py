"""``fsdp2``: Lightning's FSDP2 strategy as lit_rlhf's modules use it, registered under that name.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` applies whatever
parallelism the LightningModule's ``configure_model`` builds on its device mesh; its defaults
make the data-parallel size the number of nodes and the tensor-parallel size the number of
processes per node. Fully sharded data parallelism is data-parallel size = world size and
tensor-parallel size 1 (every rank sees different data): that is what ``fsdp2`` sets up, plus
the options lit_rlhf's modules read when they shard themselves (see
:func:`lit_rlhf.models.sharding.shard_roots`).

    trainer:
      strategy: fsdp2                     # or, with options:
      strategy:
        class_path: lit_rlhf.strategies.FSDP2Strategy
        init_args: {cpu_offload: true, gather_for_sampling: false}
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: parameters, gradients and optimizer states sharded, each rank
    on its own data. The LightningModule shards itself in ``configure_model`` (lit_rlhf's modules
    do, over :attr:`mesh`)."""

    strategy_name = "fsdp2"

    def __init__(self, cpu_offload: bool = False, gather_for_sampling: bool = True,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        """
        Args:
            cpu_offload: keep the sharded parameters, gradients and optimizer states in CPU
                memory (the optimizer steps on the CPU): the largest models per GPU, slowest steps.
            gather_for_sampling: online methods gather the whole policy once per rollout for
                sampling (needs the memory of the unsharded policy) instead of every block at
                every generated token.
            save_distributed_checkpoint: each rank writes its own shard (a checkpoint is a
                folder); False gathers everything into one file on rank 0 (needs its memory).
            process_group_backend: ``nccl``, ``gloo``, ...; None: the device's default.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self.cpu_offload = cpu_offload
        self.gather_for_sampling = gather_for_sampling

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size

    def model_to_device(self) -> None:
        """Lightning moves the whole module to the GPU after ``configure_model``; offloaded
        shards must stay in CPU memory, so only what FSDP2 does not manage moves (metrics)."""
        if not self.cpu_offload:
            return super().model_to_device()
        from lightning.fabric.utilities.device_dtype_mixin import _update_properties

        from lit_rlhf.models.sharding import is_sharded

        for child in self.model.children():
            if not is_sharded(child):
                child.to(self.root_device)
        # The module still computes on the device (each unit is copied there for its forward):
        # `module.device`, where inputs and metric values go, says so as `.to()` would have.
        _update_properties(self.model, device=self.root_device)

    @property
    def mesh(self):
        """The 1-D data-parallel mesh that the modules shard over."""
        return self.device_mesh["data_parallel"]

    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options=None) -> None:
        """Written into a hidden sibling folder, then swapped in (:func:`replace_checkpoint`): a
        run killed at any moment leaves a whole checkpoint, the new one or the one it replaced."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0 and partial.exists():
            _remove(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.global_rank == 0:
            replace_checkpoint(partial, path)
        self.barrier()


    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict:
        """A sharded checkpoint holds what the module checkpoints (with adapters: the trainable
        weights only); those are checked against the module, then loaded into the shards."""
        path = sharded_checkpoint_path(self.broadcast(str(checkpoint_path)))
        if not (path / ".metadata").is_file():
            return super().load_checkpoint(path, weights_only)
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = sharded_checkpoint_keys(path)
        module = self.lightning_module
        if hasattr(module, "check_checkpoint_keys"):
            module.check_checkpoint_keys(saved)
        weights = {k: v for k, v in get_model_state_dict(self.model).items() if k in saved}
        dcp.load({"state_dict": weights}, checkpoint_id=path)
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / "meta.pt", weights_only=weights_only)


def _previous(path: Path) -> Path:
    """Where :func:`replace_checkpoint` keeps the checkpoint it is replacing."""
    return path.with_name(f".{path.name}.previous")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_checkpoint(new: Path, path: Path) -> None:
    """Put the finished checkpoint ``new`` (a folder beside ``path``) under ``path``, one atomic
    rename at a time, so that a kill between any two steps leaves a whole checkpoint: ``path``
    itself, or, between the two renames, the old one kept aside, which
    :func:`sharded_checkpoint_path` finds. ``rmtree`` is not atomic: only copies that are
    no longer needed are removed."""
    previous = _previous(path)
    if path.exists():
        if previous.exists():  # a kill after an earlier swap: path is the newer, whole one
            _remove(previous)
        path.rename(previous)
    # Without path, a previous copy (a kill between the renames of an earlier save) is the
    # last whole checkpoint until `new` is in: it stays until then.
    new.rename(path)
    if previous.exists():
        _remove(previous)


def sharded_checkpoint_path(path: _PATH) -> Path:
    """``path``, or where a run was killed while :func:`replace_checkpoint` swapped a new
    checkpoint in (between its two renames), the whole one it was replacing."""
    path = Path(path)
    if not path.exists() and (_previous(path) / ".metadata").is_file():
        return _previous(path)
    return path


def sharded_checkpoint_keys(path: Path) -> set[str]:
    """The weight names a sharded (distributed) checkpoint folder holds, read from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    names = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {name[len("state_dict."):] for name in names if name.startswith("state_dict.")}


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 over every process (lit_rlhf)")
