"""The LightningCLI that every ``fit`` runs, and a check of a command line without training
(used by the pipeline before its first stage).

The entry point that dispatches to it is :mod:`lit_rlhf.cli`; the one line a user's mistake
becomes is :mod:`lit_rlhf.cli.errors`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.cli.arguments import expand_config_includes
from lit_rlhf.recipes import default_precision, strategy_problem


def nearest_key(message: str, parser, args) -> str | None:
    """For ``unrecognized arguments: --trainer.max_stepz=7``, the valid key nearest to the first
    unknown one (``trainer.max_steps``), among the subcommand's own keys and the init arguments
    of the configured model and datamodule classes."""
    match = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if match is None:
        return None
    argv = [str(a) for a in (args or sys.argv[1:])]
    command = next((a for a in argv if not a.startswith("-")), "fit")
    sub = getattr(parser, "_subcommands_action", None)
    sub = sub._name_parser_map.get(command, parser) if sub is not None else parser
    keys = [o[2:] for action in sub._actions for o in action.option_strings if o.startswith("--")]
    for section, class_path in _configured_classes(argv).items():
        keys += [f"{section}.init_args.{k}" for k in _init_keys(class_path)]
    return _nearest(match.group(1), keys)


def unknown_init_key(argv: list[str]) -> str | None:
    """``unrecognized arguments: --KEY (did you mean --NEAREST?)`` for the first ``--model.init_args.*``
    or ``--data.init_args.*`` key that is no argument of the configured class (nor a field of a
    dataclass argument); None when every such key exists."""
    classes = _configured_classes(argv)
    for arg in argv:
        match = re.match(r"--(model|data)\.init_args\.([\w.]+)(=|$)", arg)
        if match is None or match.group(1) not in classes:
            continue
        section, key = match.group(1), match.group(2)
        known = _init_keys(classes[section])
        if not known or _is_known(key, known):
            continue
        close = _nearest(key, known)
        return f"unrecognized arguments: {arg}" + (f" (did you mean --{section}.init_args.{close}?)" if close else "")
    return None


def _is_known(key: str, known: list[str]) -> bool:
    """``key`` is a known argument or dataclass field, or lies below an argument whose fields are
    not listed (a class's own ``init_args``: not checked here)."""
    opaque = [k for k in known if not any(other.startswith(k + ".") for other in known)]
    return key in known or any(key.startswith(k + ".") for k in opaque)


def _nearest(key: str, keys: list[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _configured_classes(argv: list[str]) -> dict[str, str]:
    """``{"model": class path, "data": class path}`` as the command line's configs give them."""
    import yaml

    found = {}
    for i, arg in enumerate(argv):
        text = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        try:
            config = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            config = None
        for section in ("model", "data"):
            value = config.get(section) if isinstance(config, dict) else None
            if isinstance(value, dict) and isinstance(value.get("class_path"), str):
                found[section] = value["class_path"]
            if arg.startswith(f"--{section}=") and "." in arg:
                found[section] = arg.split("=", 1)[1]
    return found


def _init_keys(class_path: str) -> list[str]:
    """The init arguments of ``class_path`` and, for dataclass arguments, their fields (dotted,
    up to three levels: ``lm``, ``lm.lora``, ``lm.lora.r``); [] for a class that cannot load."""
    import importlib
    import inspect
    import typing

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        return []

    def fields(prefix: str, hint, depth: int) -> list[str]:
        out = []
        for kind in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(kind) and depth < 3:
                sub = typing.get_type_hints(kind)
                for f in dataclasses.fields(kind):
                    out += [f"{prefix}.{f.name}", *fields(f"{prefix}.{f.name}", sub.get(f.name), depth + 1)]
        return out

    keys = []
    for param in inspect.signature(cls.__init__).parameters:
        if param not in ("self", "tokenizer", "args", "kwargs"):
            keys += [param, *fields(param, hints.get(param), 1)]
    return keys


def add_progress_bar(trainer) -> None:
    """lit_rlhf's progress bar (``Rollouts``, no ``v_num``), unless the config names one or
    switches it off."""
    import importlib.util

    from jsonargparse import Namespace

    callbacks = list(trainer.get("callbacks") or [])
    named = [str(c.get("class_path", "")) if hasattr(c, "get") else type(c).__name__ for c in callbacks]
    if trainer.get("enable_progress_bar") is False or any("ProgressBar" in n for n in named):
        return
    if importlib.util.find_spec("rich") is None:
        return  # Lightning's plain bar
    trainer.callbacks = [*callbacks, Namespace(class_path="lit_rlhf.callbacks.ProgressBar", init_args=Namespace())]


def fit_short_run(trainer) -> list[str]:
    """Trial runs stay what the user asked for: a ``val_check_interval`` beyond
    ``limit_train_batches`` (Lightning refuses it once the weights are loaded) or ``max_steps``
    (the run would never validate) becomes the run's length, and so does a ``log_every_n_steps``
    beyond the run's length (nothing would be logged). Changes ``trainer`` in place; returns one
    line per change."""
    def count(value) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    notes = []
    limit, steps = count(trainer.get("limit_train_batches")), count(trainer.get("max_steps"))
    interval = count(trainer.get("val_check_interval"))
    if limit is not None and interval is not None and interval > limit:
        trainer.val_check_interval = limit
        notes.append(f"trainer.val_check_interval={interval} is beyond trainer.limit_train_batches={limit}: "
                     f"validating after batch {limit}")
    elif steps is not None and interval is not None and interval > steps:
        # (one batch per step without gradient accumulation: the run would never validate)
        trainer.val_check_interval = steps
        notes.append(f"trainer.val_check_interval={interval} is beyond trainer.max_steps={steps}: "
                     f"validating after step {steps}")
    one_epoch = trainer.get("max_epochs") == 1
    lengths = [n for n in (steps, limit if one_epoch else None) if n is not None]
    every = trainer.get("log_every_n_steps") or 50  # Lightning's default
    if lengths and every > min(lengths):
        trainer.log_every_n_steps = min(lengths)
        notes.append(f"trainer.log_every_n_steps={every} is beyond the run's {min(lengths)} steps: logging every "
                     f"{min(lengths)}")
    return notes


def machine_has_bf16_gpu() -> bool:
    """This machine has a CUDA GPU that computes in bf16 (for the default precision)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class LitRLHFCLI(LightningCLI):
    """LightningCLI with the data <-> model links every stage needs."""

    # data init arg -> module init arg, copied before instantiation so the module can check
    # them at construction, before any weights load.
    DATA_TO_MODEL = {"seq_length": "seq_length", "batch_size": "rollout_batch_size"}

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Only what the modules can run (they have no test_step or predict_step).
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model_args, data_args = config.model.init_args, config.data.init_args
        accelerator = config.get("trainer", {}).get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator!r}: no CUDA GPU is visible on this machine "
                             "(use trainer.accelerator=cpu or auto, or check CUDA_VISIBLE_DEVICES)")
        if config.trainer.get("precision") is None:
            # Decided after the accelerator: `accelerator: cpu` on a GPU machine stays 32-true.
            config.trainer.precision = default_precision(accelerator, machine_has_bf16_gpu())
        lm = model_args.get("lm") if hasattr(model_args, "get") else None
        quantization = lm.get("quantization") if hasattr(lm, "get") else getattr(lm, "quantization", None)
        if (problem := strategy_problem(config.trainer.get("strategy"), quantization,
                                        config.trainer.precision)) is not None:
            raise ValueError(problem)
        for source, target in self.DATA_TO_MODEL.items():
            if target in model_args and source in data_args and model_args[target] is None:
                model_args[target] = data_args[source]
        add_progress_bar(config.trainer)
        for note in fit_short_run(config.trainer):
            if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
                print(f"[lit_rlhf] {note}", file=sys.stderr)

    def parse_arguments(self, parser, args) -> None:
        # jsonargparse silently drops a misspelled field of a dataclass argument (one under
        # --model.init_args.lm, say): every dotted model/data key is checked first.
        if (problem := unknown_init_key([str(a) for a in (args or sys.argv[1:])])) is not None:
            raise ArgumentError(None, problem)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            hint = nearest_key(str(err), parser, args)
            if hint is None:
                raise
            raise ArgumentError(None, f"{err} (did you mean --{hint}?)") from None

    def _parse_ckpt_path(self) -> None:
        # Lightning would apply the checkpoint's hyper-parameters over the config, class path
        # included: an RM checkpoint turned an SFT command into a RewardModule run. Here the
        # configured run is what runs, and the checkpoint must be one of its own.
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        path = config.get("ckpt_path")
        path = None if path is None else str(path)
        if path is None or path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
            return  # Lightning's own names, resolved by the Trainer
        from lit_rlhf.modules.base import check_checkpoint

        model = config.model
        lm = model.init_args.get("lm") if model.get("init_args") is not None else None
        lm = lm.as_dict() if hasattr(lm, "as_dict") else lm
        if lm is not None and not isinstance(lm, dict):
            lm = dataclasses.asdict(lm) if dataclasses.is_dataclass(lm) else None
        check_checkpoint(path, model.class_path, lm)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The datamodule tokenizes with the model's tokenizer (one source of truth).
        if getattr(self.datamodule, "tokenizer", "absent") is None:
            self.datamodule.tokenizer = self.model.tokenizer


def cli_kwargs(args: list[str] | None, **overrides) -> dict:
    return dict(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # Re-running into the same log dir must not crash on an existing config.yaml.
        save_config_kwargs={"overwrite": True},
        # Parser errors are raised, not printed with the usage: main reports their cause.
        # No prefix matching (`--trainer.max_step` silently meant max_steps): an unknown key is an
        # error, with the nearest valid key (see LitRLHFCLI.parse_arguments).
        parser_kwargs={"exit_on_error": False, "allow_abbrev": False,
                       **{name: {"exit_on_error": False, "allow_abbrev": False} for name in ("fit", "validate")}},
        args=args,
        **overrides,
    )


def check_fit_config(args: list[str]) -> None:
    """Parse a ``fit`` command line (without ``fit``) and build its module, datamodule and
    trainer (tokenizer and model config only, no weights), without training. Raises what
    :func:`lit_rlhf.cli.main` reports. The pipeline checks every stage with it before the
    first one trains."""
    argv, sys.argv[1:] = sys.argv[1:], []  # LightningCLI warns when given `args` beside sys.argv
    try:
        LitRLHFCLI(**cli_kwargs(expand_config_includes(list(args)), run=False, save_config_callback=None))
    finally:
        sys.argv[1:] = argv
