"""What every stage's LightningModule shares: loading, trainable-only checkpoints, export."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_rlhf.callbacks import NonFiniteLossError, newest_checkpoint
from lit_rlhf.models import (
    ModelConfig,
    attention_for,
    compute_dtype_for,
    load_model,
    load_tokenizer,
    remove_stale_temporaries,
    save_pretrained_atomic,
    trainable_parameters,
)
from lit_rlhf.models.adapters import base_identity
from lit_rlhf.models.sharding import clip_grad_norm, full_state_dict, is_sharded, shard_roots
from lit_rlhf.optim import OptimConfig, build_optimizer
from lit_rlhf.strategies import FSDP2Strategy, sharded_checkpoint_path


def as_config(cls, value):
    """``value`` as dataclass ``cls``: checkpoints store configs as plain dicts."""
    return cls(**value) if isinstance(value, dict) else value


def rng_state() -> dict:
    """The global RNGs that training draws from (dropout masks): torch CPU, CUDA, ``random``.

    Plain tensors and tuples of ints, so checkpoints still load with ``weights_only=True``
    (numpy's state is an array, and nothing here draws from numpy).
    """
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_ranks(obj) -> list:
    """``obj`` of every rank, in rank order; a collective, so every rank must call it.

    Lightning writes rank 0's checkpoint only: whatever differs per rank (RNG states) has
    to be gathered into it, or the other ranks resume from rank 0's.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def non_finite(named_tensors) -> list[str]:
    """Names of the tensors that hold a NaN or inf; one host sync per device.

    A NaN or inf anywhere makes a tensor's sum non-finite, and one summing pass reads each
    element once without the per-element boolean tensor of ``isfinite``: a tenth of the time
    on the weights and Adam moments of every step. Half-precision tensors sum in float32, so
    only finite values beyond ~3e38 in total (a model already broken) would be reported too.

    The tensors may live on several devices: on a GPU, unfused AdamW keeps each parameter's
    ``step`` on the CPU beside moments on the GPU. The sums are stacked per device, never
    moved to one device first. ``meta`` tensors hold no values and are skipped.
    """
    from torch.distributed.tensor import DTensor

    named_tensors = list(named_tensors)
    groups: dict[tuple, list] = {}
    for name, t in named_tensors:
        if not (torch.is_tensor(t) and t.is_floating_point() and t.device.type != "meta"):
            continue
        # A sharded tensor (FSDP2) is summed as this rank's shard, then over the ranks.
        mesh = t.device_mesh if isinstance(t, DTensor) else None
        local = t.to_local() if mesh is not None else t
        groups.setdefault((local.device, mesh), []).append((name, local))
    bad = set()
    for (_, mesh), named in groups.items():
        sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                            for _, t in named])
        if mesh is not None:  # every rank holds the same tensors in the same order
            sums = sums.to(mesh.device_type)
            dist.all_reduce(sums, group=mesh.get_group())
        ok = torch.isfinite(sums).tolist()  # the one host sync for this device
        bad.update(name for (name, _), good in zip(named, ok) if not good)
    # In the order given, so the first name reported is the first bad tensor.
    return [name for name, _ in named_tensors if name in bad] if bad else []


# What a checkpoint's weights must match to be resumed: the module and the model's shape.
_MODEL_IDENTITY = ("name_or_path", "arch")
_ADAPTER_IDENTITY = ("r", "target_modules", "modules_to_save")


def check_checkpoint(path: str, class_path: str, lm: dict | None) -> None:
    """Refuse a ``ckpt_path`` that is missing, not a Lightning checkpoint, or not of this run.

    ``class_path`` and ``lm`` are the configured module class and its ``ModelConfig`` as a
    dict. Reads the checkpoint memory-mapped (no copy of its tensors), before any weights load.
    """
    where = f"ckpt_path {path}"
    path = str(sharded_checkpoint_path(path))  # a save killed mid-swap leaves the old one aside
    sharded = Path(path).is_dir() and (Path(path) / "meta.pt").is_file()  # fsdp2's: one file per rank
    if not (Path(path).is_file() or sharded):
        raise FileNotFoundError(f"{where}: no such file (give the .ckpt of an earlier run, e.g. .../checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(Path(path) / "meta.pt" if sharded else path, map_location="cpu", weights_only=True,
                          mmap=True)
    except Exception as err:  # pickle, zip and safety errors all mean the same to the user
        raise ValueError(f"{where}: not a Lightning checkpoint ({str(err).splitlines()[0][:120]})") from None
    # A sharded checkpoint keeps its weights in the shards, beside meta.pt.
    if not isinstance(ckpt, dict) or ("state_dict" not in ckpt and not sharded) or "loops" not in ckpt:
        raise ValueError(f"{where}: not a Lightning training checkpoint (no state_dict/loops: "
                         "weights alone, e.g. an export, cannot be resumed)")
    hparams = ckpt.get("hyper_parameters") or {}
    saved_class = hparams.get("_class_path")
    if saved_class and saved_class.rsplit(".", 1)[-1] != class_path.rsplit(".", 1)[-1]:
        raise ValueError(f"{where}: saved by {saved_class}, but this run configures {class_path} "
                         "(resume a checkpoint of the same stage)")
    saved_lm = hparams.get("lm")
    if not (isinstance(saved_lm, dict) and isinstance(lm, dict)):
        return
    for key in _MODEL_IDENTITY:
        if saved_lm.get(key) != lm.get(key):
            raise ValueError(f"{where}: saved from model.init_args.lm.{key}={saved_lm.get(key)!r}, this run has "
                             f"{lm.get(key)!r} (resume with the model it was trained from)")
    saved_lora, lora = saved_lm.get("lora"), lm.get("lora")
    if (saved_lora is None) != (lora is None):
        kind = lambda cfg: "full fine-tuning" if cfg is None else "LoRA"  # noqa: E731
        raise ValueError(f"{where}: saved from {kind(saved_lora)}, this run configures {kind(lora)}")
    for key in _ADAPTER_IDENTITY if lora is not None else ():
        if saved_lora.get(key) != lora.get(key):
            raise ValueError(f"{where}: saved with model.init_args.lm.lora.{key}={saved_lora.get(key)!r}, this run has "
                             f"{lora.get(key)!r} (the adapter's shape must match)")


class HFModule(L.LightningModule):
    """A LightningModule around one transformers model built from a :class:`ModelConfig`.

    The tokenizer loads at construction (cheap, and the datamodule needs it); the weights
    load in :meth:`configure_model`, once the Trainer knows each rank's device, because
    quantized weights cannot be moved after loading.
    """

    task = "causal_lm"
    new_head = False  # may the task head be missing from name_or_path (see load_model)
    dropout = True  # False: the model's dropout is zeroed (methods that compare two forwards)

    def __init__(self, lm: ModelConfig, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.lm_config = as_config(ModelConfig, lm)
        self.optim_config = as_config(OptimConfig, optim) or OptimConfig()
        lm = self.lm_config
        self.tokenizer = load_tokenizer(lm.tokenizer, trust_remote_code=lm.trust_remote_code,
                                        chat_template=lm.chat_template)
        # The model's config.json only (no weights): checks against it fail here, not at load.
        self.architecture = lm.architecture(self.tokenizer)
        attention_for(lm, self.architecture, self.task)  # an implementation the class refuses
        self.model = None
        # With adapters, checkpoints hold only trainable weights (see on_save_checkpoint).
        self.strict_loading = lm.lora is None
        self._resume_rng: dict | None = None  # this rank's RNG state from the checkpoint

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = load_model(self.lm_config, self.tokenizer, task=self.task, device=self.load_device,
                                new_head=self.new_head, dropout=self.dropout, compute_dtype=self.compute_dtype)
        trainable, total = trainable_parameters(self.model)
        rank_zero_info(f"{type(self).__name__}: {trainable:,} trainable of {total:,} parameters, "
                       f"attention {self.model.config._attn_implementation}")
        self.prepare_model()
        self.shard()

    def prepare_model(self) -> None:
        """What a stage does to the loaded model before it is sharded (a reference copy)."""

    # ------------------------------------------------------------------ sharding (FSDP2)

    @property
    def sharding(self) -> FSDP2Strategy | None:
        """The ``fsdp2`` strategy when this run shards its models, else None."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, FSDP2Strategy) else None

    @property
    def load_device(self) -> torch.device | None:
        """Where weights load: each rank's device. Sharded next: ``meta`` for a pretrained model
        in safetensors files (each rank reads only its shards, after ``fully_shard``: see
        :meth:`shard`); else the CPU (a random init is built whole there, then sharded)."""
        if self._trainer is None:
            return None
        if self.sharding is None:
            return self.trainer.strategy.root_device
        return torch.device("meta") if self.shard_source is not None else torch.device("cpu")

    @property
    def shard_source(self) -> dict | None:
        """The safetensors tensors of the pretrained model (``lm.name_or_path``) by name, read from
        their headers; None without such files (a random init, ``.bin`` weights)."""
        if not hasattr(self, "_shard_source"):
            from lit_rlhf.models.shards import checkpoint_files
            from lit_rlhf.models.sources import resolve_path

            name = self.lm_config.name_or_path
            self._shard_source = (checkpoint_files(resolve_path(name)) or None) if name is not None else None
        return self._shard_source

    @property
    def compute_device(self) -> torch.device:
        """Where this rank computes: its accelerator under every strategy (the CPU without a
        trainer), whatever :attr:`load_device` the weights came through. Random generators are
        made here, beside the tensors they draw for (a CPU generator cannot draw CUDA tensors)."""
        return self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    def fsdp_roots(self) -> list[nn.Module | None]:
        """The modules whose forward this stage calls: under ``fsdp2`` each is sharded as a root
        (see :func:`~lit_rlhf.models.sharding.shard_roots`); None entries are skipped."""
        return [self.model]

    def float32_heads(self) -> list[nn.Module]:
        """Modules kept float32 whatever the precision (a value head)."""
        return []

    def shard(self) -> None:
        """Shard the loaded models over the ``fsdp2`` mesh; a no-op under any other strategy.
        Under ``bf16-mixed`` the gathered parameters are bf16 and gradients reduce in float32."""
        if (strategy := self.sharding) is None:
            return
        bf16 = str(self.trainer.precision) == "bf16-mixed"
        roots = [r for r in self.fsdp_roots() if r is not None]
        shard_roots(roots, strategy.mesh, param_dtype=torch.bfloat16 if bf16 else None,
                    float32_heads=self.float32_heads(), cpu_offload=strategy.cpu_offload)
        if self.load_device == torch.device("meta"):  # built empty: each rank reads its own rows
            from lit_rlhf.models.shards import load_shards

            load_shards(self, roots, self.shard_source)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of a quantized base's matmuls: autocast's under the trainer's precision."""
        precision = self.trainer.precision if self._trainer is not None else None
        return compute_dtype_for(precision, self.lm_config.torch_dtype)

    def configure_optimizers(self):
        return build_optimizer(
            self.parameters(), self.optim_config, int(self.trainer.estimated_stepping_batches),
            allow_fused=self._allow_fused_optimizer(),
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``trainer.gradient_clip_val`` by norm under ``fsdp2`` goes through
        :func:`~lit_rlhf.models.sharding.clip_grad_norm`, which also clips CPU-offloaded shards
        under NCCL; everything else through Lightning."""
        if self.sharding is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _allow_fused_optimizer(self) -> bool:
        # Lightning's mixed-precision plugin raises when asked to clip the gradients of a
        # fused optimizer (it may unscale them itself), so clipping there means unfused.
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        return not (mixed and self.trainer.gradient_clip_val)

    # ------------------------------------------------------------------ divergence guard

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Lightning counts the step as done (global_step + 1) only after this hook returns.
        self.check_weights_finite(self.global_step + 1)

    def check_weights_finite(self, step: int) -> None:
        """Stop the run the moment an optimizer step leaves a NaN/inf weight or moment.

        The loss can still be finite in the step that breaks the weights (a huge update, an
        inf gradient): checking only the loss would let the next checkpoint save them.
        Trainable tensors only (the frozen base cannot change); one host sync per step.
        """
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        names = {id(p): n for n, p in named}
        for optimizer in self.trainer.optimizers if self._trainer is not None else ():
            for param, state in optimizer.state.items():
                named += [(f"{names.get(id(param), 'param')}:{k}", v) for k, v in state.items()]
        if bad := non_finite(named):
            self._diverged(f"optimizer step {step} made {bad[0]} non-finite"
                           + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))

    def check_finite(self, name: str, value: torch.Tensor) -> None:
        """Stop the run on a NaN/inf loss before it reaches the weights.

        Raising (rather than ``trainer.should_stop``) matters: a graceful stop would still run
        validation and save a checkpoint of the broken model. One host sync per call.
        """
        if not torch.isfinite(value).all():
            first = value.detach().float().flatten()[0].item()
            self._diverged(f"{name} is {first} at step {self.global_step}")

    def _diverged(self, what: str) -> None:
        newest = newest_checkpoint(self.trainer) if self._trainer is not None else None
        kept = (f"the newest checkpoint, {newest[0]} (step {newest[1]}), is finite" if newest
                else "no checkpoint was written")
        raise NonFiniteLossError(f"{what}: stopping; {kept} (lower the learning rate, clip gradients "
                                 "with trainer.gradient_clip_val, or check the data)")

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Last line of defence: a checkpoint is never written with non-finite weights or
        # optimizer state (whatever broke them after the step's check).
        tensors = list(checkpoint["state_dict"].items())
        for i, opt in enumerate(checkpoint.get("optimizer_states", [])):
            tensors += [(f"optimizer {i} state {k}:{name}", v)
                        for k, moments in opt.get("state", {}).items() for name, v in moments.items()]
        if bad := non_finite(tensors):
            self._diverged(f"refusing to save a checkpoint at step {self.global_step}: {bad[0]} is non-finite")
        # Every rank's RNG (dropout masks), so a resumed run draws what the uninterrupted one would.
        checkpoint["rng_states"] = gather_ranks(rng_state())
        # Plain types only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["hyper_parameters"] = {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in checkpoint.get("hyper_parameters", {}).items()
        }

    def checkpoint_keys(self) -> set[str]:
        """The state-dict entries a checkpoint holds: with adapters, the trainable ones only
        (a LoRA checkpoint of a 20B base should be megabytes, not the frozen 20B weights)."""
        if self.lm_config.lora is not None:
            return {name for name, p in self.named_parameters() if p.requires_grad}
        return set(self.state_dict())

    def check_checkpoint_keys(self, got: set[str]) -> None:
        """Refuse weights that do not fit: non-strict loading (adapters) would skip them silently."""
        expected = self.checkpoint_keys()
        if expected and got != expected:
            missing, unexpected = sorted(expected - got), sorted(got - expected)
            detail = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                               (("missing", missing), ("unexpected", unexpected)) if keys)
            raise ValueError(f"checkpoint does not fit this model: {detail} (resume with the "
                             "configuration it was saved from)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:  # a sharded checkpoint's keys are checked by the strategy, before it loads
            self.check_checkpoint_keys(set(checkpoint["state_dict"]))
        states = checkpoint.get("rng_states") if self._trainer is not None else None
        if states and len(states) == self.trainer.world_size:
            self._resume_rng = states[self.global_rank]
        elif states:
            rank_zero_warn(f"the checkpoint was written by {len(states)} process(es), this run has "
                           f"{self.trainer.world_size}: dropout masks restart from the seed")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored here, not at load: Lightning draws from the RNG between loading the
        # checkpoint and the first step (sanity checks, dataloader set-up).
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    def on_fit_start(self) -> None:
        # A run killed while exporting leaves hidden temporary folders in its log dir: the
        # next run under the same root removes them (see remove_stale_temporaries).
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero and log_dir is not None:
            logs = Path(log_dir).parent
            for run_dir in [logs, *(logs.iterdir() if logs.is_dir() else ())]:
                for path in remove_stale_temporaries(run_dir) if run_dir.is_dir() else ():
                    rank_zero_info(f"removed {path}, left by a run that was killed while saving")

    @property
    def hf_model(self) -> nn.Module:
        """The transformers (or peft) model that is saved at the end of fit."""
        return self.model

    @property
    def export_dir(self) -> Path:
        """``<log dir>/adapter`` for LoRA runs, ``<log dir>/model`` for full fine-tuning."""
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return root / ("adapter" if self.lm_config.lora is not None else "model")

    def export_meta(self) -> dict:
        """What ``lit_rlhf.json`` beside the saved model records: for an adapter, the base it was
        trained on (checked when the adapter is used on another model, e.g. AdapterReward)."""
        return {"base": base_identity(self.lm_config)} if self.lm_config.lora is not None else {}

    def export_state_dict(self, model: nn.Module) -> dict | None:
        """``model``'s whole state dict for ``save_pretrained`` when its weights are sharded
        (rank 0; a collective: every rank must call it), else None (it saves its own)."""
        return full_state_dict(model) if is_sharded(model) else None

    def on_train_end(self) -> None:
        path = self.export_dir  # trainer.log_dir is a collective under DDP: every rank asks
        state = self.export_state_dict(self.hf_model)
        if self.trainer.is_global_zero:
            # peft writes the adapter in its standard format (PeftModel.from_pretrained loads it);
            # only the model's own ("default"), not a reward adapter loaded beside it.
            save_pretrained_atomic(self.hf_model, path, self.tokenizer,
                                   adapters=["default"] if self.lm_config.lora is not None else None,
                                   state_dict=state, **self.export_meta())
            rank_zero_info(f"saved {path}")
