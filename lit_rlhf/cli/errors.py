"""The one line a user's mistake becomes, from LightningCLI's parser dumps (the small argparse
commands use :class:`lit_rlhf.recipes.OneLineParser`)."""

from __future__ import annotations

import re

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback

from lit_rlhf.callbacks import NonFiniteLossError

# What a user's mistake raises (a diverged run too: NonFiniteLossError). Anything else is a
# bug and keeps its traceback; so does a ValueError or OSError once the run has started (see
# RunStarted). The others say "your config" or "your run diverged" whenever they are raised.
ONE_LINE_ANY_TIME = (ArgumentError, MisconfigurationException, NonFiniteLossError)
USER_ERRORS = (*ONE_LINE_ANY_TIME, ValueError, OSError)


class RunStarted(Callback):
    """Notes when the trainer's loop starts: the sanity check, the first training batch or the
    first validation batch (after every ``setup``, ``configure_model`` and ``on_fit_start``,
    where weights load and configs are checked against the data).

    Before that, a :data:`USER_ERRORS` exception is a mistake in the config or its inputs and
    ends in one ``error:`` line; after it, a ``ValueError`` or ``OSError`` comes from the code
    that trains (a module's ``training_step``, a reward function, a full disk at a checkpoint)
    and keeps its traceback, which is what finding the cause needs. :data:`ONE_LINE_ANY_TIME`
    stay one line: Lightning's word for a bad config (``LearningRateMonitor`` without a logger
    is found at the first batch) and a diverged run's :class:`NonFiniteLossError`.
    """

    def __init__(self) -> None:
        self.started = False

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self.started = True

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = True

    def on_validation_start(self, trainer, pl_module) -> None:
        self.started = True

    def is_one_line(self, err: BaseException) -> bool:
        """True when ``err`` (one of :data:`USER_ERRORS`) is reported as one line."""
        return not self.started or isinstance(err, ONE_LINE_ANY_TIME)

# Lines of jsonargparse's error dump that describe the search, not the problem.
_PARSER_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"Expected a <class 'NoneType'>|Problem with given class_path|tip:|Validation failed: )"
)
_PARSER_KEY = re.compile(r'^(- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)'")


def _is_dataclass_path(path: str) -> bool:
    import dataclasses
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return dataclasses.is_dataclass(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return False


def parser_error_cause(message: str) -> str:
    """The one line of a jsonargparse error that says what is wrong, with the config key.

    jsonargparse reports a bad value deep in a config as a nested dump: every Union member it
    tried (``Expected a <class 'NoneType'>``), the class path, and the whole ``Namespace`` it
    was given. The cause is the first line that is none of those; the ``Parser key`` lines
    above it give the field, e.g. ``model.init_args.lm.quantization: Expected a
    typing.Literal['none', '8bit', '4bit-nf4', '4bit-fp4']. Got value: 3bit``.
    """
    field, under_class = "", False
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        if chosen := _CLASS_PATH.search(line):
            under_class = not _is_dataclass_path(chosen.group(1))
        if match := _PARSER_KEY.match(line):
            # A key below a chosen class is one of its init_args; below a dataclass, a field.
            sep = ".init_args." if under_class else "."
            field = f"{field}{sep}{match.group(2)}" if field else match.group(2)
            under_class = False
            line = match.group(3).strip()
            if not line:
                continue
        if _PARSER_NOISE.match(line):
            continue
        line = line.removeprefix("- ")
        if line.startswith("Expected a ") and "Got value" not in line:
            line = _union_mismatch(message) or line
        return f"{field}: {line}" if field and not line.startswith(field) else line
    return message.strip().splitlines()[0] if message.strip() else "invalid arguments"


def _union_mismatch(message: str) -> str | None:
    """``'17-true' is none of: int, Literal[...]`` from a Union's error dump, or None."""
    given = re.findall(r"^\s*Given value: (.*)$", message, re.M)
    if not given or given[-1].startswith("Namespace("):
        return None
    expected = [re.sub(r"<class '(\w+)'>", r"\1", m).replace("typing.", "")
                for m in re.findall(r"^\s*- Expected a (.*)$", message, re.M) if "NoneType" not in m]
    return f"{given[-1]!r} is none of: {'; '.join(expected)}" if expected else None


def error_line(err: BaseException) -> str:
    """The one line the user sees for ``err``."""
    return parser_error_cause(str(err)) if str(err).strip() else type(err).__name__
