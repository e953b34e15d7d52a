"""Every YAML under configs/ parses through the real CLI; bad input ends in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_rlhf.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "base.yaml")


def test_there_are_recipes():
    assert {p.parent.name for p in RECIPES} >= {"sft", "rm", "ppo"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} should start with a comment giving its launch command"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(path), "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].startswith("lit_rlhf.modules.")
    assert config["data"]["class_path"].startswith("lit_rlhf.data.")
    lm = config["model"]["init_args"]["lm"]
    assert (lm["name_or_path"] is None) != (lm["arch"] is None)
    assert lm["trust_remote_code"] is False


def test_classic_recipe_values():
    neox = ROOT / "configs/sft/gpt-neox-20b-imdb.yaml"
    lora = yaml.safe_load(neox.read_text())["model"]["init_args"]["lm"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (16, 32, 0.05)
    llama = yaml.safe_load((ROOT / "configs/sft/llama-7b-stack-exchange.yaml").read_text())
    assert llama["data"]["init_args"]["seq_length"] == 1024
    assert llama["model"]["init_args"]["lm"]["quantization"] == "8bit"


def _run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bad_input_is_one_line_before_any_model_loads(tmp_path):
    out = _run("fit", "-c", "configs/sft/demo.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--data.init_args.path=/no/such/file.jsonl")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: data file not found: /no/such/file.jsonl"
    assert "Traceback" not in out.stderr


def test_seq_length_beyond_positions_via_cli(tmp_path):
    out = _run("fit", "-c", "configs/sft/demo.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--data.init_args.seq_length=4096")
    assert out.returncode == 2
    assert "seq_length=4096 exceeds the model's 512 positions" in out.stderr
