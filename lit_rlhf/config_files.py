"""Config files composed from a base and overlays: ``config: base.yaml`` inside a recipe.

Shared by the CLI (which expands the includes before LightningCLI parses) and the pipeline
(which hashes every file a stage's config builds on).
"""

from __future__ import annotations

from pathlib import Path


def config_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """The config files ``path`` builds on (its ``config:`` key, relative to it), then itself."""
    import yaml

    path = path.resolve()
    if path in seen:
        raise ValueError(f"config include cycle: {' -> '.join(map(str, (*seen, path)))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    base = (yaml.safe_load(path.read_text()) or {}).get("config")
    bases = [base] if isinstance(base, str) else list(base or [])
    files = [f for b in bases for f in config_chain(path.parent / b, (*seen, path))]
    return [*files, str(path)]


def expand_config_includes(args: list[str]) -> list[str]:
    """``-c recipe.yaml`` whose file says ``config: base.yaml`` -> ``-c base.yaml -c recipe.yaml``.

    Recipes are a base plus a small overlay. jsonargparse honours a nested ``config:`` key
    only outside subcommands, so the CLI expands it here, before parsing.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        # Not a file: an inline YAML string, or a typo that jsonargparse reports.
        files = config_chain(Path(value)) if Path(value).is_file() else [value]
        for path in files:
            out += ["--config", path]
    return out
