"""Shared fixtures: everything offline, tiny and CPU-only."""

from __future__ import annotations

import os

import pytest

# Keep the demo cache (corpus + tokenizer) out of the user's home and shared by the session;
# subprocesses (DDP, CLI) inherit it.
os.environ.setdefault("LIT_RLHF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "lit_rlhf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Lightning adds a log handler on sys.stderr when first imported. Imported here, that is the
# session's stream; imported first inside a test that captures output (capsys), it would be
# that test's stream, closed afterwards, and every later in-process log line ("Seed set to 0")
# would print a logging traceback.
import lightning.pytorch  # noqa: E402, F401

# The demo's names (demo, demo-tiny, ...) come through the package's entry point once installed;
# registered here too, so the tests also run from a source tree that is not (the GPU machine).
from lit_rlhf.demo.models import register  # noqa: E402

register()

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def demo():
    from lit_rlhf.demo import prepare_demo

    return prepare_demo()


@pytest.fixture(scope="session")
def tokenizer(demo):
    from lit_rlhf.models import load_tokenizer

    return load_tokenizer(str(demo.tokenizer_dir))


@pytest.fixture(scope="session")
def cli():
    """Runs ``train.py`` command lines, each in its own (forked) process; see tests/cli_runner.py."""
    from tests.cli_runner import CLIRunner

    with CLIRunner() as runner:
        yield runner


def pytest_collection_finish(session):
    """`-m gpu` on a machine without CUDA fails in one line: a silent skip would hide that nothing ran."""
    import torch

    wants_gpu = any(item.get_closest_marker("gpu") for item in session.items)
    on_cpu = os.environ.get("LIT_RLHF_GPU_TEST_DEVICE", "cuda") == "cpu"  # the GPU tests' own dry run
    if wants_gpu and not on_cpu and not torch.cuda.is_available():
        pytest.exit("the gpu tests need a CUDA GPU and none is visible on this machine "
                    "(run them where one is: bash scripts/gpu_check.sh)", returncode=1)
