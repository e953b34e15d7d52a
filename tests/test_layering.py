"""The package's architecture, checked: no import cycles, lower layers never import higher ones,
and the rules that keep the package readable.

Every ``import`` statement counts, also those inside functions (a lazy import is still a
dependency). Layers, lowest first; a module may import its own layer and the ones below:

0. foundation: ``objectives`` (pure tensor math);
1. parts: ``models``, ``data``, ``optim``, ``metrics``, ``callbacks``, ``strategies``, ``recipes``
   (config composition and the shipped recipes, which every command reads configs with);
2. services: ``rewards``, ``export``, ``envs``;
3. methods: ``modules``;
4. application: ``cli``, ``pipeline``, ``estimate``, ``python -m`` entry points, and the ``demo``,
   a plug-in that registers its names (models, datasets) with the layers below.

Within the application layer the CLI sits on top: only the CLI itself and the pipeline (which
checks each stage's config with the CLI's own parser before it launches ``lit-rlhf fit``) import
``lit_rlhf.cli``; estimate, the demo and ``python -m`` entry points use what lies below it.
Only the demo itself, the CLI and the pipeline import the demo; at most 8 modules sit directly
in ``lit_rlhf/``; no function in ``lit_rlhf/modules/`` is longer than 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "lit_rlhf"

LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["lit_rlhf", "lit_rlhf.objectives"]),
    ("parts", ["lit_rlhf.models", "lit_rlhf.data", "lit_rlhf.optim", "lit_rlhf.metrics", "lit_rlhf.callbacks",
               "lit_rlhf.strategies", "lit_rlhf.recipes"]),
    ("services", ["lit_rlhf.rewards", "lit_rlhf.export", "lit_rlhf.envs"]),
    ("methods", ["lit_rlhf.modules", "lit_rlhf.engines"]),  # an engine returns a modules.rollout.Rollout
    # Entry points and plug-ins: the CLI, the pipeline, the estimator, `python -m` mains, and the
    # demo, which registers its names (models, datasets) with the layers below.
    ("application", ["lit_rlhf.cli", "lit_rlhf.pipeline", "lit_rlhf.estimate", "lit_rlhf.demo",
                     "lit_rlhf.export.__main__"]),
]

# Beyond the layer order, (importers, imported, the only importers allowed): only the demo itself,
# the CLI and the pipeline import the demo, so the library (models, data, rewards, modules,
# estimate) knows nothing of it; and nothing but the CLI and the pipeline imports the CLI, so
# estimate, the demo and the export command never run back up to the top of the house.
DEMO_IMPORTERS = ("lit_rlhf.demo", "lit_rlhf.cli", "lit_rlhf.pipeline")
CLI_IMPORTERS = ("lit_rlhf.cli", "lit_rlhf.pipeline")
FORBIDDEN = [("lit_rlhf", "lit_rlhf.demo", DEMO_IMPORTERS), ("lit_rlhf", "lit_rlhf.cli", CLI_IMPORTERS)]
# At most this many modules directly in lit_rlhf/ (the rest lives in folders that say what they hold).
MAX_ROOT_MODULES = 8
# No function in lit_rlhf/modules/ longer than this: the LightningModules orchestrate, helpers compute.
MAX_MODULES_FUNCTION_LINES = 60
# The math is pure: tensors in, tensors out.
PURE = {"lit_rlhf.objectives": {"torch", "math", "typing", "__future__", "lit_rlhf.objectives"},
        # The memory formulas are arithmetic on shapes: not even torch.
        "lit_rlhf.estimate.memory": {"math", "re", "dataclasses", "typing", "__future__"}}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(package modules imported by ``name``, top-level names of everything it imports)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    inside, everything = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from pkg import sub` depends on the submodule where one exists, else on pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            everything.add(target)
            # The nearest enclosing module of the package (`import lit_rlhf.models.x` names it).
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                inside.add(target)
    return inside, everything


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return level


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(root: Path = PACKAGE_ROOT, package: str = "lit_rlhf"):
    modules = module_files(root, package)
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(name, path, modules)
    return graph, external


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# ------------------------------------------------------------------------------ the checks


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 30, "the walk found too few modules: is PACKAGE_ROOT right?"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layer order or a :data:`FORBIDDEN` rule, one line each."""
    wrong = [
        f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
        for src, targets in graph.items() for dst in targets if layer_of(dst) > layer_of(src)
    ]
    wrong += [f"{src} imports {dst} (only {', '.join(allowed)} may)"
              for src, targets in sorted(graph.items()) for dst in sorted(targets)
              for a, b, allowed in FORBIDDEN if _under(src, a) and _under(dst, b)
              and not any(_under(src, ok) for ok in allowed)]
    return wrong


def test_lower_layers_never_import_higher_ones():
    graph, _ = import_graph()
    wrong = upward_imports(graph)
    assert not wrong, "\n".join(wrong)


def test_the_package_root_holds_few_modules():
    modules = sorted(p.name for p in PACKAGE_ROOT.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_ROOT_MODULES, f"{len(modules)} modules in lit_rlhf/: {modules}"


def function_lengths(path: Path) -> dict[str, int]:
    """``Class.method`` or ``function`` -> its length in lines (decorators and docstring included)."""
    out = {}
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                owner = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out[f"{path.stem}:{owner}{child.name}"] = child.end_lineno - first + 1
    return out


def test_no_function_in_the_modules_is_longer_than_the_limit():
    lengths = {}
    for path in sorted((PACKAGE_ROOT / "modules").rglob("*.py")):
        lengths.update(function_lengths(path))
    long = {name: n for name, n in lengths.items() if n > MAX_MODULES_FUNCTION_LINES}
    assert not long, f"longer than {MAX_MODULES_FUNCTION_LINES} lines: {long}"


def test_objectives_import_nothing_but_torch_and_each_other():
    _, external = import_graph()
    for prefix, allowed in PURE.items():
        for module, names in external.items():
            if _under(module, prefix):
                bad = {n for n in names if not any(_under(n, a) for a in allowed)}
                assert not bad, f"{module} imports {sorted(bad)}"


# ------------------------------------------------------------------------------ the checker itself


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    root = _package(tmp_path, {
        "a.py": "import pkg.b\n",
        "b.py": "def f():\n    from pkg import c\n",
        "c.py": "from . import a\n",
        "d.py": "import pkg.a\n",
    })
    graph, _ = import_graph(root, "pkg")
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_checker_resolves_package_and_submodule_imports(tmp_path):
    root = _package(tmp_path, {
        "sub/__init__.py": "from pkg.sub.x import X\n",
        "sub/x.py": "X = 1\n",
        "y.py": "from pkg.sub import X\nfrom pkg.sub import x\nimport torch\n",
    })
    graph, external = import_graph(root, "pkg")
    assert graph["pkg.y"] == {"pkg.sub", "pkg.sub.x"}
    assert graph["pkg.sub"] == {"pkg.sub.x"}
    assert "torch" in external["pkg.y"]
    assert find_cycle(graph) is None


def test_checker_refuses_the_cli_below_the_cli():
    # estimate, the demo and the export command are in the CLI's own layer: only the rule can
    # refuse their imports of it (the import that issue 41 found in each of them).
    graph = {"lit_rlhf.estimate.config": {"lit_rlhf.cli.config_files"},
             "lit_rlhf.demo.models": {"lit_rlhf.cli"},
             "lit_rlhf.export.__main__": {"lit_rlhf.cli.export"},
             "lit_rlhf.pipeline": {"lit_rlhf.cli.lightning"},
             "lit_rlhf.cli.lightning": {"lit_rlhf.cli.arguments", "lit_rlhf.recipes"}}
    assert [line.split(" (")[0] for line in upward_imports(graph)] == [
        "lit_rlhf.demo.models imports lit_rlhf.cli",
        "lit_rlhf.estimate.config imports lit_rlhf.cli.config_files",
        "lit_rlhf.export.__main__ imports lit_rlhf.cli.export"]


@pytest.mark.parametrize("module, layer", [
    ("lit_rlhf.objectives.kl", "foundation"), ("lit_rlhf.demo.judge", "application"),
    ("lit_rlhf.export.__main__", "application"), ("lit_rlhf.export", "services"), ("lit_rlhf.models.loading", "parts"),
    ("lit_rlhf.modules.online", "methods"), ("lit_rlhf.recipes", "parts"),
])
def test_layers_assign_by_longest_prefix(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
