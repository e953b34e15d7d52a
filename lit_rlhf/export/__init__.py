"""Export: merge LoRA adapters into their base and save a plain transformers model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lit_rlhf.models import (
    DType,
    ModelConfig,
    Task,
    from_pretrained_checked,
    load_model,
    save_pretrained_atomic,
)
from lit_rlhf.models.loading import auto_class


# safetensors' dtype names (the header's) of the dtypes an export is written in.
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def written_model_check(model, task: Task):
    """A check of a written model folder, run before the folder is renamed into place, that
    reads no weight whole (an export of a large model would otherwise load it a second time).

    transformers builds the model class of ``task`` from the written ``config.json`` on the meta
    device (no memory); every weight that class has must be in the safetensors headers (a tied
    weight once) with its shape, and nothing else; every tensor must have the dtype of
    ``model``'s, and its first row, read from the file, must equal ``model``'s (the names point
    at the right data). safetensors refuses a file whose size disagrees with its header.
    """
    def check(folder: Path) -> None:
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig

        folder = Path(folder)
        with torch.device("meta"):
            built = auto_class(task).from_config(AutoConfig.from_pretrained(folder))
        tied: dict[int, list[str]] = {}  # one entry per parameter, all the names it goes by
        for name, param in built.named_parameters(remove_duplicate=False):
            tied.setdefault(id(param), []).append(name)
        shapes = {name: tuple(t.shape) for name, t in built.state_dict().items()}
        saved = model.state_dict()
        written: set[str] = set()
        for file in sorted(folder.glob("*.safetensors")):
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors' SafetensorError has no common base with OSError
                raise ValueError(f"{file}: unreadable safetensors file: {err}") from err
            with handle as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                    if name not in shapes or shape != shapes[name]:
                        raise ValueError(f"{file}: {name} {list(shape)} is no weight of the {type(built).__name__} "
                                         f"that config.json describes (expected {list(shapes.get(name, ()))})")
                    want = saved.get(name)
                    if want is not None and _SAFETENSORS_DTYPES.get(str(want.dtype).removeprefix("torch.")) != dtype:
                        raise ValueError(f"{file}: {name} is {dtype}, the model's is {want.dtype}")
                    if want is not None and shape and not torch.equal(piece[:1], want[:1].detach().cpu()):
                        raise ValueError(f"{file}: {name} holds other values than the model's")
                    written.add(name)
        missing = [names[0] for names in tied.values() if not written.intersection(names)]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} weight(s) of the model are not in its safetensors files, "
                             f"e.g. {missing[0]}")

    return check


def merge_adapter(
    lm: ModelConfig,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer,
    task: Task = "causal_lm",
    dtype: DType = "float32",
    **meta,
) -> Path:
    """Load the base unquantized in ``dtype``, apply the adapter, merge, save atomically.

    A quantized training base is reloaded in full precision for the merge: merging into
    8-/4-bit weights would round the update away (the usual QLoRA practice). The result loads
    with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` alone; ``meta``
    goes to ``lit_rlhf.json`` beside it.
    """
    from peft import PeftModel

    base_cfg = dataclasses.replace(lm, quantization="none", lora=None, dtype=dtype, gradient_checkpointing=False)
    # A reward model's score head comes with its adapter (modules_to_save), not the base.
    base = load_model(base_cfg, tokenizer, task=task, new_head=task == "seq_cls")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except Exception as err:  # safetensors' SafetensorError has no common base with OSError
        if not isinstance(err, (OSError, ValueError, RuntimeError)) and type(err).__name__ != "SafetensorError":
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{adapter_dir}: cannot read the adapter (truncated or corrupt?): {first}") from err
    model.config.use_cache = True  # the exported model is for inference and generation
    return save_pretrained_atomic(model, out_dir, tokenizer, check=written_model_check(model, task), **meta)


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: DType | None = None) -> Path:
    """Export a finished run (``lightning_logs/version_N``) as a plain HF model.

    Reads the run's ``config.yaml`` to know the base model and the task; merges
    ``adapter/`` into the base (LoRA runs) or reads ``model/`` (full fine-tuning; ``export/``
    for a reward model), in ``dtype`` (default: the run's ``lm.dtype``). Every weight file read
    is checked (a truncated one is a one-line ``ValueError``), and the written model is checked
    against its safetensors headers (:func:`written_model_check`) before its folder replaces
    ``out_dir``.
    """
    import torch
    import yaml

    from lit_rlhf.models import load_tokenizer

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass a run directory (lightning_logs/version_N)")
    model = yaml.safe_load(config_file.read_text())["model"]
    lm = ModelConfig(**model["init_args"]["lm"])
    task: Task = "seq_cls" if model["class_path"].endswith("RewardModule") else "causal_lm"
    tokenizer = load_tokenizer(lm.tokenizer, trust_remote_code=lm.trust_remote_code, chat_template=lm.chat_template)
    if (run_dir / "adapter").is_dir():
        return merge_adapter(lm, run_dir / "adapter", out_dir, tokenizer=tokenizer, task=task,
                             dtype=dtype or lm.dtype)
    source = run_dir / ("export" if task == "seq_cls" else "model")
    if not source.is_dir():
        raise FileNotFoundError(f"{run_dir}: no adapter/ or {source.name}/ to export (did the run finish?)")
    # Full fine-tuning: read the run's model (every weight file checked), in `dtype`, and write it anew.
    meta_file = source / "lit_rlhf.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    hf_model = from_pretrained_checked(auto_class(task), str(source), dtype=getattr(torch, dtype or lm.dtype))
    hf_model.config.use_cache = True
    return save_pretrained_atomic(hf_model, out_dir, tokenizer, check=written_model_check(hf_model, task), **meta)
