"""Export: merged models equal the adapter models they came from, with plain transformers."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.export.__main__ import main
from lit_rlhf.data import SFTDataModule
from lit_rlhf.export import export_run
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import SFTModule
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished LoRA SFT run, with the config.yaml the CLI would write, and its module."""
    import yaml

    root = tmp_path_factory.mktemp("run")
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo",
                     lora=LoraSettings(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]))
    module = SFTModule(lm, OptimConfig(lr=1e-2), seq_length=64)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, default_root_dir=root, enable_progress_bar=False,
                        limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, SFTDataModule(path="demo", seq_length=64, batch_size=4, tokenizer=module.tokenizer))
    run_dir = Path(trainer.log_dir)
    config = {"model": {"class_path": "lit_rlhf.modules.SFTModule",
                        "init_args": {"lm": {"arch": TINY_LLAMA, "tokenizer": "demo",
                                             "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                      "modules_to_save": ["lm_head"]}}}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir, module.eval()


def test_merged_logits_equal_the_adapter_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, module = lora_run
    out = export_run(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.randint(0, len(module.tokenizer), (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module.model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_export_in_bfloat16_and_from_the_command_line(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, module = lora_run
    main([str(run_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "bf16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(tmp_path / "bf16")
    ids = tok(["a wonderful film"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # bf16 rounding, not a different model
    # The exported model generates with plain transformers.
    out = merged.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ids.size(1) < out.size(1) <= ids.size(1) + 5
    assert torch.equal(out[0, : ids.size(1)], ids[0])


def test_export_of_a_missing_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        export_run(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("case, expected", [
    ("missing", "config.yaml not found: pass a run directory"),
    ("not_a_run", "config.yaml not found: pass a run directory"),
    ("unfinished", "no adapter/ or model/ to export (did the run finish?)"),
])
def test_export_command_failures_are_one_line(case, expected, tmp_path, capsys):
    run = tmp_path / "run"
    if case == "not_a_run":
        run.mkdir()
        (run / "notes.txt").write_text("hello")
    elif case == "unfinished":  # a run that wrote its config but never reached the end of fit
        run.mkdir()
        (run / "config.yaml").write_text(
            "model:\n  class_path: lit_rlhf.modules.SFTModule\n  init_args:\n    lm:\n      arch: demo-tiny\n"
            "      tokenizer: demo\n      lora: null\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(run), str(tmp_path / "out")])
    assert exit_.value.code == 2  # bad input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_full_fine_tuning_export_reads_every_weight_file_and_applies_the_dtype(tmp_path, capsys):
    import yaml
    from transformers import AutoModelForCausalLM

    from lit_rlhf.models import load_model, load_tokenizer

    # A full fine-tuning run as the SFT stage leaves it: config.yaml and model/.
    run = tmp_path / "run"
    tokenizer = load_tokenizer("demo")
    model = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), tokenizer)
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {
        "class_path": "lit_rlhf.modules.SFTModule",
        "init_args": {"lm": {"arch": TINY_LLAMA, "tokenizer": "demo", "lora": None}}}}))
    main([str(run), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert exported.dtype == torch.bfloat16
    torch.testing.assert_close(exported.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())
    # A truncated weight file: one line, exit 2 (bad input), nothing written.
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(run), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the weights file (truncated or corrupt?)" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_written_model_that_does_not_load_back_is_never_put_in_place(lora_run, tmp_path, monkeypatch):
    import lit_rlhf.export as export

    run_dir, _ = lora_run
    export_run(run_dir, tmp_path / "out")  # a good export in place
    before = sorted(p.name for p in (tmp_path / "out").iterdir())

    def broken(model, task):
        def check(folder):
            raise ValueError(f"{folder}: cannot load the model's weights: broken on purpose")
        return check

    monkeypatch.setattr(export, "written_model_check", broken)
    with pytest.raises(ValueError, match="broken on purpose"):
        export_run(run_dir, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # the old export stays
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left


def _full_fine_tuning_run(root: Path, **arch) -> tuple[Path, torch.nn.Module]:
    import yaml

    from lit_rlhf.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("demo")
    lm = {**TINY_LLAMA, **arch}
    model = load_model(ModelConfig(arch=lm, tokenizer="demo"), tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {
        "class_path": "lit_rlhf.modules.SFTModule", "init_args": {"lm": {"arch": lm, "tokenizer": "demo", "lora": None}}}}))
    return root, model


def test_the_written_model_is_checked_without_loading_it_again(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    run, _ = _full_fine_tuning_run(tmp_path / "run", tie_word_embeddings=True)  # a tied weight is written once
    loaded = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(Path(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    export_run(run, tmp_path / "out")
    assert loaded == [run / "model"]  # the run's model, read once; the written folder never


@pytest.mark.parametrize("damage, message", [
    ("none", None),
    ("drop", "1 weight(s) of the model are not in its safetensors files, e.g. model.norm.weight"),
    ("swap", "_proj.weight holds other values than the model's"),  # q_proj and k_proj swapped
    ("bfloat16", "is BF16, the model's is torch.float32"),
    ("reshape", "model.norm.weight [32] is no weight of the LlamaForCausalLM that config.json describes (expected [64])"),
    ("truncate", "unreadable safetensors file"),
])
def test_the_check_of_a_written_model_reads_its_headers(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from lit_rlhf.export import written_model_check

    _, model = _full_fine_tuning_run(tmp_path)
    folder, file = tmp_path / "model", tmp_path / "model" / "model.safetensors"
    weights = load_file(file)
    layer = "model.layers.0.self_attn."
    changed = {
        "drop": lambda w: {k: v for k, v in w.items() if k != "model.norm.weight"},
        "swap": lambda w: {**w, layer + "q_proj.weight": w[layer + "k_proj.weight"], layer + "k_proj.weight": w[layer + "q_proj.weight"]},
        "bfloat16": lambda w: {k: v.bfloat16() for k, v in w.items()},
        "reshape": lambda w: {**w, "model.norm.weight": w["model.norm.weight"][:32].clone()},
    }
    if damage in changed:
        save_file(changed[damage](weights), file, metadata={"format": "pt"})
    elif damage == "truncate":
        file.write_bytes(file.read_bytes()[:-100])
    check = written_model_check(model, "causal_lm")
    if message is None:
        check(folder)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        check(folder)
