"""Named model sources: registered names resolve lazily, anything else passes through."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lit_rlhf.models import ModelConfig, load_model, load_tokenizer, sources


@pytest.fixture
def registry(monkeypatch):
    """A private registry, so a test's names never leak into other tests."""
    sources._load_entry_points()  # before the copy: the demo's names stay registered after the test
    monkeypatch.setattr(sources, "_PATHS", dict(sources._PATHS))
    monkeypatch.setattr(sources, "_ARCHS", dict(sources._ARCHS))
    return sources


def test_registered_path_resolves_lazily_and_others_pass_through(registry, tmp_path):
    calls = []
    registry.register_path("my-model", lambda: calls.append(1) or tmp_path)
    assert calls == []  # nothing built at registration
    assert registry.resolve_path("my-model") == str(tmp_path)
    assert calls == [1]
    assert registry.resolve_path("gpt2") == "gpt2"
    assert registry.resolve_path(str(tmp_path / "x")) == str(tmp_path / "x")
    assert "my-model" in registry.registered_names()


def test_registered_arch_builds_a_model_and_returns_a_copy(registry, tokenizer):
    fields = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}
    registry.register_arch("tiny-gpt2", lambda: fields)
    copy = registry.registered_arch("tiny-gpt2")
    copy["n_layer"] = 5
    assert registry.registered_arch("tiny-gpt2")["n_layer"] == 1
    model = load_model(ModelConfig(arch="tiny-gpt2", tokenizer="demo"), tokenizer)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 1
    assert registry.registered_arch("no-such-arch") is None


def test_unknown_arch_name_is_named(registry):
    with pytest.raises(FileNotFoundError, match="no-such-arch"):
        ModelConfig(arch="no-such-arch", tokenizer="demo").architecture()


def test_a_registered_tokenizer_directory_loads(registry, demo):
    registry.register_path("my-tokenizer", lambda: demo.tokenizer_dir)
    assert load_tokenizer("my-tokenizer").eos_token_id is not None


def test_demo_names_come_from_the_entry_point_without_importing_the_demo_models():
    # A fresh interpreter: nothing registered by hand. The loader finds the demo's names
    # through the package's `lit_rlhf.sources` entry point, which imports lit_rlhf.demo.models
    # only when a name is first looked up.
    code = (
        "import sys\n"
        "from lit_rlhf.models import sources\n"
        "assert 'lit_rlhf.demo.models' not in sys.modules\n"
        "print(sources.registered_arch('demo-tiny')['model_type'])\n"
        "assert 'lit_rlhf.demo.models' in sys.modules\n"
        "print(sorted(n for n in sources.registered_names() if n.startswith('demo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["llama", "['demo', 'demo-rm', 'demo-sft', 'demo-tiny']"]
