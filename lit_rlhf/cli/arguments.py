"""The ``fit``/``validate`` command line rewritten before LightningCLI parses it: every run of
``-c`` files (with their ``config:`` bases) composed into one inline config by the rule of
:mod:`lit_rlhf.recipes`, and ``--a.b=null`` turned into a config."""

from __future__ import annotations

from lit_rlhf.recipes import compose, config_chain, find_config, names_a_file, nested

NULLS = ("null", "None", "~")


def null_override(arg: str, following: str | None) -> str | None:
    """The dotted key of ``--a.b=null`` / ``--a.b null``, else None."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return None
    key, eq, value = arg[2:].partition("=")
    value = value if eq else following
    if value in NULLS and key and not key.endswith("+") and key.replace(".", "").replace("_", "").isalnum():
        return key
    return None


def expand_config_includes(args: list[str]) -> list[str]:
    """Every run of consecutive ``-c`` files (and their ``config:`` bases) -> one composed config.

    jsonargparse itself honours a nested ``config:`` key only outside subcommands, and merges
    lists of classes position by position; composing here applies :mod:`lit_rlhf.recipes`' rule instead.
    The composed config is handed over inline (as a YAML string), so nothing is written.
    """
    import yaml

    out: list[str] = []
    pending: list[str] = []  # files of the current run of -c arguments

    def flush() -> None:
        if pending:
            out.extend(["--config", yaml.safe_dump(compose(pending), sort_keys=False)])
            pending.clear()

    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        elif (key := null_override(arg, args[i + 1] if i + 1 < len(args) else None)) is not None:
            # `--model.init_args.lm.lora=null`: jsonargparse refuses null for a nested dataclass
            # on the command line (it expects a file) and turns it into the string 'None' for
            # `str | dict | None`; as a config it means None everywhere.
            flush()
            out += ["--config", yaml.safe_dump(nested(key, None))]
            i += 1 if "=" in arg else 2
            continue
        else:
            flush()
            out.append(arg)
            i += 1
            continue
        if "\n" not in value and (value.endswith((".yaml", ".yml", ".json")) or names_a_file(value)):
            pending += config_chain(find_config(value))
        elif ":" not in value:
            raise FileNotFoundError(f"config file not found: {value}")
        else:  # an inline YAML string
            flush()
            out += ["--config", value]
    flush()
    return out
