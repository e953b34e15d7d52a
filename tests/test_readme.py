"""The README stays true: its Python example runs, its commands name real files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_python_example_runs(capsys, tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "the README should show how to reuse a module"
    monkeypatch.chdir(tmp_path)  # the example writes under ./runs
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert "PeftModelForCausalLM" in capsys.readouterr().out
    assert list(tmp_path.glob("runs/example/lightning_logs/version_*/adapter/adapter_model.safetensors"))


def test_readme_commands_point_at_existing_files():
    configs = set(re.findall(r"configs/[\w/.-]+\.yaml", README))
    assert configs, "the README should name its configs"
    assert all((ROOT / c).is_file() for c in configs), [c for c in configs if not (ROOT / c).is_file()]
    for script in re.findall(r"bash (scripts/[\w.]+)", README):
        assert (ROOT / script).is_file(), script
    ci = (ROOT / ".ci/run").read_text()
    assert "scripts/test.sh" in ci and "bash scripts/test.sh" in README
