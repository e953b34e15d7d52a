"""More roles on one base: a second LoRA adapter (a reward model) beside the policy's.

A reward model trained as a LoRA adapter with a score head (the RM stage's ``adapter/``
folder) can be loaded onto the policy's own base under a second adapter name: scoring
switches to it, generation and training switch back, and the base weights (8-/4-bit or
not) are held once for policy, reference (adapters disabled), value head and reward model.

* :func:`base_identity` / :func:`check_same_base`: which base an adapter was trained on,
  recorded beside it and compared before any weights load (an adapter fits only its base);
* :func:`add_scoring_adapter`: load the adapter's LoRA weights under a new name, frozen,
  and return its score head;
* :func:`adapter_active`: run a block with one adapter switched on, then restore the
  previous adapter and every parameter's ``requires_grad``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from lit_rlhf.models.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META = "lit_rlhf.json"


def _canonical(name_or_path: str | None) -> str | None:
    """A local directory as its absolute real path (so ``runs/x`` and ``/abs/runs/x`` agree);
    hub ids and registered names as given (resolving a registered name may build the model)."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def base_identity(cfg: ModelConfig) -> dict:
    """What identifies the weights an adapter is trained on (stored in ``lit_rlhf.json``).

    ``name_or_path`` (a local directory as its real path) and ``revision``, or for random-init
    models ``arch`` and ``seed``. Quantization and dtype are not part of it: an adapter trained
    on a bf16 base may serve on the same base in 4-bit (the QLoRA practice).
    """
    if cfg.name_or_path is not None:
        return {"name_or_path": _canonical(cfg.name_or_path), "revision": cfg.revision}
    return {"arch": cfg.arch, "seed": cfg.seed}


def recorded_base(adapter_dir: Path) -> dict | None:
    """The base recorded beside an adapter: lit_rlhf's ``lit_rlhf.json``, else peft's own
    ``base_model_name_or_path`` / ``revision`` fields; None when neither says."""
    meta = adapter_dir / META
    if meta.is_file():
        base = json.loads(meta.read_text()).get("base")
        if base:
            return base
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("base_model_name_or_path"):
        return {"name_or_path": _canonical(config["base_model_name_or_path"]), "revision": config.get("revision")}
    return None


def check_same_base(adapter_dir: Path, cfg: ModelConfig, where: str) -> None:
    """One-line error when the adapter in ``adapter_dir`` was trained on another base than ``cfg``'s.

    ``where`` names the config field in the message. An adapter that records no base passes
    (its weight shapes are still checked when it loads).
    """
    recorded = recorded_base(adapter_dir)
    if recorded is None:
        return
    ours = base_identity(cfg)
    describe = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items() if v is not None) or "?"  # noqa: E731
    if "name_or_path" in recorded and "name_or_path" in ours:
        same = _canonical(recorded["name_or_path"]) == ours["name_or_path"] and (
            recorded.get("revision") == ours["revision"])
    else:
        same = recorded == ours
    if not same:
        raise ValueError(f"{where} {adapter_dir} was trained on the base {describe(recorded)}, but the policy's "
                         f"base is {describe(ours)} (an adapter only fits the weights it was trained on)")


def read_scoring_adapter(adapter_dir: str | Path, where: str) -> dict:
    """Check that ``adapter_dir`` holds a peft LoRA sequence-classification adapter; its config.

    Read-only and cheap (two small files), so a bad path fails at construction.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{where}: no {ADAPTER_CONFIG} in {str(adapter_dir)!r} (give a reward model's "
                                "adapter/ folder, written by the RM stage with a `lora` block)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{where}: {adapter_dir} has no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {config_file} is not valid JSON ({err})") from None
    if config.get("peft_type") != "LORA" or config.get("task_type") != "SEQ_CLS":
        raise ValueError(f"{where}: {adapter_dir} is a {config.get('peft_type')} {config.get('task_type')} adapter; "
                         "a reward adapter is a LoRA SEQ_CLS one (the RM stage's adapter/ folder)")
    return config


def add_scoring_adapter(lm: nn.Module, adapter_dir: str | Path, name: str, config: dict) -> nn.Linear:
    """Load a LoRA sequence-classification adapter onto a causal LM's peft model as ``name``.

    The LoRA weights go into ``lm``'s layers under ``name``, frozen (never trained, never in
    a checkpoint of trainable weights); the score head comes back as a separate frozen
    float32 ``nn.Linear``, to be applied to the trunk's last hidden state. The
    policy's own adapter stays the active one.

    Raises ValueError when the weights do not fit (another architecture or size), or when
    the adapter trains modules in full besides the score head (``modules_to_save`` such as
    the embeddings): those cannot be shared with the policy's base.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir).expanduser()
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    head = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k.rsplit(".", 2)[-2] in ("score", "classifier")}
    lora = {k: v for k, v in state.items() if "lora_" in k}
    other = sorted(set(state) - set(lora) - {k for k in state if k.rsplit(".", 2)[-2] in ("score", "classifier")})
    if other:
        raise ValueError(f"{adapter_dir}: the reward adapter also trains {other[0]} in full (modules_to_save); "
                         "only its LoRA layers and score head can share the policy's base")
    if "weight" not in head:
        raise ValueError(f"{adapter_dir}: the adapter has no score head (was it saved with modules_to_save=score?)")
    fields = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out",
                                     "bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
                                     "layers_pattern") if config.get(k) is not None}
    # A causal-LM adapter of the same shape: the score head lives outside the LM.
    lm.add_adapter(name, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, inference_mode=True, **fields))
    try:
        result = set_peft_model_state_dict(lm, lora, adapter_name=name)
    except RuntimeError as err:  # size mismatches: another width or depth
        lm.delete_adapter(name)
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise ValueError(f"{adapter_dir}: the reward adapter does not fit the policy's base: {first}") from None
    missing = sorted(k for k in result.missing_keys if f".{name}." in k)
    if result.unexpected_keys or missing:
        detail = (f"{len(result.unexpected_keys)} weight(s) with no place, e.g. {result.unexpected_keys[0]}"
                  if result.unexpected_keys else f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
        lm.delete_adapter(name)
        raise ValueError(f"{adapter_dir}: the reward adapter does not fit the policy's base: {detail}")
    for n, p in lm.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)
    weight, bias = head["weight"], head.get("bias")
    hidden = lm.get_base_model().config.get_text_config().hidden_size
    if weight.shape != (1, hidden):
        lm.delete_adapter(name)
        raise ValueError(f"{adapter_dir}: the score head has shape {tuple(weight.shape)}; a one-output reward "
                         f"model on the policy's base needs (1, {hidden})")
    # float32, applied with autocast off (see full_precision_head): a reward is one number.
    score = nn.Linear(hidden, 1, bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        score.weight.copy_(weight)
        if bias is not None:
            score.bias.copy_(bias)
    return score.requires_grad_(False).eval()


@contextlib.contextmanager
def adapter_active(lm: nn.Module, name: str):
    """Run the block with peft adapter ``name`` active; restore the previous one after.

    peft's ``set_adapter`` also sets ``requires_grad`` (the activated adapter trainable, the
    others frozen): every flag is restored on the way out, so the policy's adapter trains as
    before and the reward adapter never does.
    """
    flags = {p: p.requires_grad for p in lm.parameters()}
    previous = lm.active_adapter
    lm.set_adapter(name)
    try:
        yield
    finally:
        lm.set_adapter(previous)
        for p, flag in flags.items():
            p.requires_grad_(flag)
