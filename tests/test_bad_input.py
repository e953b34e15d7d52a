"""Every user mistake ends in one line naming the offending file, field or value: through
the real command lines (``train.py fit``, ``train.py pipeline``, ``python -m lit_rlhf.export``),
each in its own process (tests/cli_runner.py), with its exit code (2: bad input, 1: a runtime
failure) and no traceback."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLAMA
from tests.resume import ROOT, overlay

SFT = "configs/sft/demo.yaml"
RM = "configs/rm/demo.yaml"
PPO = "configs/ppo/demo.yaml"
# A random-init policy scored by the rule-based judge: no demo model is built for PPO cases.
PPO_TINY = ("--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
            "--model.init_args.lm.tokenizer=demo", "--model.init_args.reward=lit_rlhf.demo.JudgeReward",
            "--model.init_args.judge=null", "--model.init_args.sampling.max_new_tokens=8",
            "--model.init_args.sampling.min_new_tokens=4", "--data.init_args.batch_size=8",
            "--model.init_args.ppo.mini_batch_size=8", "--trainer.max_steps=1")


@dataclass
class Files:
    """Inputs the cases point at, made once per session."""

    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def files(tmp_path_factory, cli, demo, tokenizer) -> Files:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("bad_input")
    f = Files(root)
    rows = demo.train_file.read_text().splitlines()
    p = f.paths
    p["sft_rows"] = _write(root / "sft.jsonl", "\n".join(rows[:400]) + "\n")
    p["empty"] = _write(root / "empty.jsonl", "")
    p["malformed"] = _write(root / "malformed.jsonl", "\n".join(rows[:29] + ['{"text": "unterminated'] + rows[30:60]))
    p["null_text"] = _write(root / "null_text.jsonl", "\n".join(rows[:29] + ['{"text": null}'] + rows[30:60]))
    p["pairs_unknown"] = _write(root / "pairs.jsonl", '{"good": "a", "bad": "b"}\n' * 20)
    p["yaml_syntax"] = _write(root / "syntax.yaml", "trainer:\n  max_steps: 10\n   devices: 1\n")
    p["yaml_list"] = _write(root / "list.yaml", "- trainer\n- model\n")
    p["text_file"] = _write(root / "notes.ckpt", "not a checkpoint\n")
    # Models in HF format: a causal LM, a reward model, and broken copies.
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, num_labels=1)
    torch.manual_seed(0)
    for name, cls in (("lm_dir", LlamaForCausalLM), ("rm_dir", LlamaForSequenceClassification)):
        model = cls(config)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        p[name] = root / name
    # A reward adapter (LoRA + score head) trained on lm_dir, as the RM stage writes it.
    from lit_rlhf.models import LoraSettings, ModelConfig, load_model
    from lit_rlhf.models.adapters import base_identity

    rm_cfg = ModelConfig(name_or_path=str(root / "lm_dir"), lora=LoraSettings(r=4))
    load_model(rm_cfg, tokenizer, task="seq_cls", new_head=True).save_pretrained(root / "rm_adapter")
    (root / "rm_adapter" / "lit_rlhf.json").write_text(json.dumps({"base": base_identity(rm_cfg)}))
    p["rm_adapter"] = root / "rm_adapter"
    p["no_weights"] = root / "no_weights"
    p["no_weights"].mkdir()
    shutil.copy(root / "lm_dir" / "config.json", p["no_weights"])
    tokenizer.save_pretrained(p["no_weights"])
    p["truncated"] = root / "truncated"
    shutil.copytree(root / "lm_dir", p["truncated"])
    weights = p["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # A finished SFT run (checkpoint + adapter) and an RM checkpoint, one step each.
    # The demo SFT config fine-tunes in full; the fixtures need a finished LoRA run.
    lora = {"model": {"init_args": {"lm": {"lora": {"r": 4, "target_modules": "all-linear"}}}}}
    sft = overlay(root, "sft_run", SFT, 1, 1, None, lora)
    out = cli.run(["fit", "-c", str(sft), f"--data.init_args.path={p['sft_rows']}", "--data.init_args.val_size=20"])
    assert out.code == 0, out.stderr[-3000:]
    p["sft_ckpt"] = root / "sft_run" / "ckpt" / "last.ckpt"
    p["sft_run"] = next((root / "sft_run" / "lightning_logs").glob("version_*"))
    rm = overlay(root, "rm_run", RM, 1, 1, None, {})
    out = cli.run(["fit", "-c", str(rm), "--data.init_args.max_train_pairs=16", "--data.init_args.batch_size=8"])
    assert out.code == 0, out.stderr[-3000:]
    p["rm_ckpt"] = root / "rm_run" / "ckpt" / "last.ckpt"
    # Export inputs: an unfinished run (config, no adapter) and a truncated adapter.
    p["unfinished"] = root / "unfinished"
    p["unfinished"].mkdir()
    shutil.copy(p["sft_run"] / "config.yaml", p["unfinished"])
    p["bad_adapter"] = root / "bad_adapter"
    shutil.copytree(p["sft_run"], p["bad_adapter"])
    adapter = p["bad_adapter"] / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:500])
    p["a_file"] = _write(root / "a_file.txt", "x")
    # Conversational files, each with one bad row at line 30.
    chat = [{"messages": [{"role": "user", "content": f"Film {i}?"}, {"role": "assistant", "content": "Good."}]}
            for i in range(40)]
    for name, bad in (("chat_no_role", [{"content": "hi"}, {"role": "assistant", "content": "x"}]),
                      ("chat_unknown_role", [{"role": "narrator", "content": "hi"}]),
                      ("chat_no_assistant", [{"role": "user", "content": "hi"}])):
        rows = [dict(r) for r in chat]
        rows[29] = {"messages": bad}
        p[name] = _write(root / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    p["chat_ok"] = _write(root / "chat_ok.jsonl", "".join(json.dumps(r) + "\n" for r in chat))
    user = {"role": "user", "content": "Film?"}
    pairs = [{"prompt": "Film?", "chosen": [user, {"role": "assistant", "content": "Yes"}],
              "rejected": [user, {"role": "assistant", "content": "No"}]} for _ in range(40)]
    pairs[29]["rejected"] = [{"role": "user", "content": "Book?"}, {"role": "assistant", "content": "No"}]
    p["chat_pairs_mismatch"] = _write(root / "chat_pairs.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    # Explicit text pairs, each file with one bad row at line 30.
    good = [{"prompt": f"Review {i}:", "chosen": " a fine film.", "rejected": " a dull film."} for i in range(40)]
    for name, bad in (("pairs_empty_response", {"prompt": "Review:", "chosen": "", "rejected": " dull."}),
                      ("pairs_long_prompt", {"prompt": "Review of a long film " * 60, "chosen": " fine.",
                                             "rejected": " dull."})):
        rows = [dict(r) for r in good]
        rows[29] = bad
        p[name] = _write(root / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    p["overlay_bad_rm"] = _write(root / "bad_rm.yaml", f"config: {ROOT / RM}\nmodel:\n  init_args:\n    center_coef: -1\n")
    p["overlay_bad_ppo"] = _write(root / "bad_ppo.yaml",
                                  f"config: {ROOT / PPO}\nmodel:\n  init_args:\n    kl:\n      target: -3\n")
    return f


def sft(f: Files, *args: str) -> list[str]:
    return ["fit", "-c", SFT, f"--trainer.default_root_dir={f.root / 'runs'}", "--trainer.max_steps=1",
            f"--data.init_args.path={f['sft_rows']}", "--data.init_args.val_size=20", *args]


def sft_demo(f: Files, *args: str) -> list[str]:
    return ["fit", "-c", SFT, f"--trainer.default_root_dir={f.root / 'runs'}", *args]


def rm(f: Files, *args: str) -> list[str]:
    return ["fit", "-c", RM, f"--trainer.default_root_dir={f.root / 'runs'}", "--trainer.max_steps=1",
            "--data.init_args.max_train_pairs=16", *args]


def ppo(f: Files, *args: str) -> list[str]:
    return ["fit", "-c", PPO, f"--trainer.default_root_dir={f.root / 'runs'}", *PPO_TINY, *args]


def dpo(f: Files, *args: str) -> list[str]:
    return ["fit", "-c", "configs/dpo/demo.yaml", f"--trainer.default_root_dir={f.root / 'runs'}",
            "--trainer.max_steps=1", "--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
            "--model.init_args.lm.tokenizer=demo", "--data.init_args.max_train_pairs=16", *args]


def pipeline(f: Files, *args: str) -> list[str]:
    return ["pipeline", *args]


# (id, command builder, fragments the error line must contain, exit code); `{name}` in a
# fragment is a path of `files`.
CASES = [
    # --- values in a config: caught when the config is parsed or the classes are built
    ("seq_length-0", lambda f: sft_demo(f, "--data.init_args.seq_length=0"), ["data.seq_length must be >= 2, got 0"], 2),
    ("batch_size-0", lambda f: sft_demo(f, "--data.init_args.batch_size=0"), ["data.batch_size must be >= 1, got 0"], 2),
    ("lora.r-0", lambda f: sft_demo(f, "--model.init_args.lm.lora.r=0"), ["lora.r must be >= 1, got 0"], 2),
    ("lora.dropout-1.5", lambda f: sft_demo(f, "--model.init_args.lm.lora.dropout=1.5"), ["lora.dropout", "1.5"], 2),
    ("4bit-without-lora", lambda f: sft_demo(f, "--model.init_args.lm.lora=null",
                                             "--model.init_args.lm.quantization=4bit-nf4"),
     ["quantization='4bit-nf4' needs `lora`"], 2),
    ("quantization-3bit", lambda f: sft_demo(f, "--model.init_args.lm.quantization=3bit"),
     ["model.init_args.lm.quantization", "3bit"], 2),
    ("dtype-float8", lambda f: sft_demo(f, "--model.init_args.lm.dtype=float8"), ["model.init_args.lm.dtype", "float8"], 2),
    ("lr-negative", lambda f: sft_demo(f, "--model.init_args.optim.lr=-1"), ["optim.lr must be > 0, got -1.0"], 2),
    ("unknown-module-class", lambda f: sft_demo(f, "--model.class_path=lit_rlhf.modules.NoSuchModule"),
     ["NoSuchModule"], 2),
    ("unknown-data-class", lambda f: sft_demo(f, "--data.class_path=lit_rlhf.data.NoSuchData"), ["NoSuchData"], 2),
    ("max_steps-abc", lambda f: sft_demo(f, "--trainer.max_steps=abc"), ["trainer.max_steps", "abc"], 2),
    ("unknown-key", lambda f: sft_demo(f, "--model.init_args.no_such_arg=1"), ["no_such_arg"], 2),
    ("model-neither-source", lambda f: sft_demo(f, "--model.init_args.lm.arch=null"),
     ["give exactly one of `name_or_path` and `arch`"], 2),
    ("model-both-sources", lambda f: sft_demo(f, f"--model.init_args.lm.name_or_path={f['lm_dir']}"),
     ["give exactly one of `name_or_path` and `arch`"], 2),
    ("tokenizer-missing", lambda f: sft_demo(f, "--model.init_args.lm.tokenizer=./no/such/tokenizer"),
     ["model.init_args.lm.tokenizer", "./no/such/tokenizer"], 2),
    ("model-path-missing", lambda f: sft_demo(f, "--model.init_args.lm.arch=null",
                                              "--model.init_args.lm.name_or_path=./no/such/model"),
     ["model.init_args.lm.name_or_path", "./no/such/model"], 2),
    ("arch-file-missing", lambda f: sft_demo(f, "--model.init_args.lm.arch=./no/such/config.json"),
     ["model.init_args.lm.arch", "./no/such/config.json"], 2),
    ("arch-unknown-name", lambda f: sft_demo(f, "--model.init_args.lm.arch=no-such-arch"), ["model.init_args.lm.arch", "no-such-arch"], 2),
    ("seq_length-beyond-positions", lambda f: sft_demo(f, "--data.init_args.seq_length=4096"),
     ["seq_length=4096 exceeds the model's 512 positions"], 2),
    ("attention-unknown", lambda f: sft_demo(f, "--model.init_args.lm.attn_implementation=fast_as_light"),
     ["attn_implementation", "fast_as_light"], 2),
    ("accelerator-gpu-without-one", lambda f: sft_demo(f, "--trainer.accelerator=gpu"), ["GPU"], 2),
    ("precision-unknown", lambda f: sft_demo(f, "--trainer.precision=17-true"), ["trainer.precision", "'17-true' is none of"], 2),
    ("strategy-unknown", lambda f: sft_demo(f, "--trainer.strategy=warp_drive"), ["warp_drive"], 2),
    # --- config files
    ("config-missing", lambda f: ["fit", "-c", "configs/sft/no_such.yaml"], ["config file not found", "no_such.yaml"], 2),
    ("config-syntax", lambda f: ["fit", "-c", f["yaml_syntax"]], ["{yaml_syntax}", "line 3", "invalid YAML"], 2),
    ("config-not-a-mapping", lambda f: ["fit", "-c", f["yaml_list"]], ["{yaml_list}", "mapping"], 2),
    ("config-include-missing", lambda f: ["fit", "-c", str(_write(f.root / "inc.yaml", "config: gone.yaml\n"))],
     ["config file not found", "gone.yaml"], 2),
    # --- checkpoints to resume from
    ("ckpt-missing", lambda f: sft(f, "--ckpt_path=/no/such/last.ckpt"), ["ckpt_path /no/such/last.ckpt: no such file"], 2),
    ("ckpt-not-a-checkpoint", lambda f: sft(f, f"--ckpt_path={f['text_file']}"),
     ["ckpt_path {text_file}: not a Lightning checkpoint"], 2),
    ("ckpt-weights-only", lambda f: sft(f, f"--ckpt_path={f['lm_dir']}/model.safetensors"),
     ["model.safetensors: not a Lightning training checkpoint"], 2),
    ("ckpt-of-another-stage", lambda f: sft(f, f"--ckpt_path={f['rm_ckpt']}"),
     ["saved by lit_rlhf.modules.RewardModule, but this run configures lit_rlhf.modules.SFTModule"], 2),
    ("ckpt-sft-for-ppo", lambda f: ppo(f, f"--ckpt_path={f['sft_ckpt']}"),
     ["saved by lit_rlhf.modules.SFTModule, but this run configures lit_rlhf.modules.PPOModule"], 2),
    ("ckpt-other-adapter", lambda f: sft(f, f"--ckpt_path={f['sft_ckpt']}", "--model.init_args.lm.lora.r=8"),
     ["saved with model.init_args.lm.lora.r=4, this run has 8"], 2),
    ("ckpt-lora-vs-full", lambda f: sft(f, f"--ckpt_path={f['sft_ckpt']}", "--model.init_args.lm.lora=null"),
     ["saved from LoRA, this run configures full fine-tuning"], 2),
    ("ckpt-other-model", lambda f: sft(f, f"--ckpt_path={f['sft_ckpt']}", "--model.init_args.lm.arch=null",
                                       f"--model.init_args.lm.name_or_path={f['lm_dir']}"),
     ["saved from model.init_args.lm.name_or_path=None"], 2),
    # --- data files
    ("data-missing", lambda f: sft_demo(f, "--data.init_args.path=/no/such/file.jsonl"),
     ["data file not found: /no/such/file.jsonl"], 2),
    ("data-empty", lambda f: sft_demo(f, f"--data.init_args.path={f['empty']}"), ["{empty}", "empty"], 2),
    ("data-malformed-line", lambda f: sft_demo(f, f"--data.init_args.path={f['malformed']}"), ["{malformed}", "line 30"], 2),
    ("data-null-text", lambda f: sft_demo(f, f"--data.init_args.path={f['null_text']}", "--data.init_args.val_size=5"),
     ["{null_text}", "line 30", "text"], 2),
    ("data-missing-field", lambda f: sft(f, "--data.init_args.text_field=body"), ["{sft_rows}", "body"], 2),
    ("data-template-field", lambda f: sft(f, "--data.init_args.template=Question {question}"),
     ["{sft_rows}", "question"], 2),
    ("data-val_size-negative", lambda f: sft_demo(f, f"--data.init_args.path={f['sft_rows']}",
                                                  "--data.init_args.val_size=-1"), ["val_size", "-1"], 2),
    ("data-val_size-too-big", lambda f: sft_demo(f, f"--data.init_args.path={f['sft_rows']}",
                                                 "--data.init_args.val_size=100000"), ["val_size", "100000"], 2),
    ("pairs-unknown-schema", lambda f: rm(f, f"--data.init_args.path={f['pairs_unknown']}", "--data.init_args.val_size=4"),
     ["{pairs_unknown}", "schema"], 2),
    ("pairs-empty", lambda f: rm(f, f"--data.init_args.path={f['empty']}"), ["{empty}", "empty"], 2),
    ("prompts-empty", lambda f: ppo(f, f"--data.init_args.path={f['empty']}"), ["{empty}", "empty"], 2),
    # --- conversational data
    ("chat-message-without-role", lambda f: sft(f, f"--data.init_args.path={f['chat_no_role']}", "--model.init_args.lm.chat_template=chatml"),
     ["{chat_no_role}: line 30: field 'messages': message 0 needs 'role' and 'content'"], 2),
    ("chat-unknown-role", lambda f: sft(f, f"--data.init_args.path={f['chat_unknown_role']}", "--model.init_args.lm.chat_template=chatml"),
     ["{chat_unknown_role}: line 30: field 'messages': message 0 has unknown role 'narrator'"], 2),
    ("chat-no-assistant-turn", lambda f: sft(f, f"--data.init_args.path={f['chat_no_assistant']}", "--model.init_args.lm.chat_template=chatml"),
     ["{chat_no_assistant}: line 30: field 'messages': the conversation has no assistant turn"], 2),
    ("chat-pair-prompt-mismatch", lambda f: rm(f, f"--data.init_args.path={f['chat_pairs_mismatch']}", "--data.init_args.val_size=4",
                                               "--model.init_args.lm.chat_template=llama3"),
     ["{chat_pairs_mismatch}: line 30: rejected starts with other messages than the prompt"], 2),
    ("chat-without-template", lambda f: sft(f, f"--data.init_args.path={f['chat_ok']}"),
     ["has no chat template for conversational data", "model.init_args.lm.chat_template"], 2),
    ("chat-template-unknown", lambda f: sft_demo(f, "--model.init_args.lm.chat_template=no-such-template"),
     ["model.init_args.lm.chat_template 'no-such-template': no such file, and not one of chatml"], 2),
    # --- DPO
    ("dpo-beta-0", lambda f: dpo(f, "--model.init_args.beta=0"), ["beta must be > 0, got 0.0"], 2),
    ("dpo-loss-type-unknown", lambda f: dpo(f, "--model.init_args.loss_type=kto"),
     ["model.init_args.loss_type", "Got value: kto"], 2),
    ("dpo-unpacked-pairs", lambda f: dpo(f, "--data.init_args.pack=false"), ["DPOModule needs packed pair batches"], 2),
    ("dpo-precompute-without-reference", lambda f: dpo(f, "--model.init_args.reference=none",
                                                       "--model.init_args.precompute_reference=true"),
     ["precompute_reference: true needs a reference model, but reference is 'none'"], 2),
    ("dpo-target-margin-negative", lambda f: dpo(f, "--model.init_args.target_margin=-1"), ["target_margin must be >= 0"], 2),
    ("dpo-empty-response", lambda f: dpo(f, f"--data.init_args.path={f['pairs_empty_response']}", "--data.init_args.val_size=4"),
     ["{pairs_empty_response}: line 30: field 'chosen' is empty"], 2),
    ("dpo-prompt-fills-max-length", lambda f: dpo(f, f"--data.init_args.path={f['pairs_long_prompt']}",
                                                  "--data.init_args.val_size=4", "--data.init_args.max_train_pairs=null",
                                                  "--data.init_args.max_length=64", "--data.init_args.too_long=truncate"),
     ["{pairs_long_prompt}: line 30: chosen and rejected are identical in their first 64 tokens", "no room"], 2),
    # --- the other stages' settings
    ("rm-center_coef", lambda f: rm(f, "--model.init_args.center_coef=-1"), ["model.init_args.center_coef must be >= 0"], 2),
    ("rm-max_length-0", lambda f: rm(f, "--data.init_args.max_length=0"), ["max_length", "0"], 2),
    ("ppo-temperature-0", lambda f: ppo(f, "--model.init_args.sampling.temperature=0"),
     ["sampling.temperature must be > 0, got 0.0"], 2),
    ("ppo-min-above-max", lambda f: ppo(f, "--model.init_args.sampling.min_new_tokens=30"),
     ["min_new_tokens <= max_new_tokens"], 2),
    ("ppo-minibatch-not-dividing", lambda f: ppo(f, "--model.init_args.ppo.mini_batch_size=5"),
     ["ppo.mini_batch_size=5 does not divide the rollout batch size"], 2),
    ("ppo-kl-estimator-k2", lambda f: ppo(f, "--model.init_args.kl.estimator=k2"), ["model.init_args.kl.estimator", "k2"], 2),
    ("ppo-top_p-above-1", lambda f: ppo(f, "--model.init_args.sampling.top_p=1.5"), ["top_p", "1.5"], 2),
    ("ppo-reward-path-missing", lambda f: ppo(f, "--model.init_args.reward=lit_rlhf.rewards.RewardModelReward",
                                              "--model.init_args.reward.init_args.path=./no/such/rm"),
     ["reward.init_args.path", "./no/such/rm"], 2),
    ("ppo-reward-adapter-other-base", lambda f: ppo(f, "--model.init_args.reward=lit_rlhf.rewards.AdapterReward",
                                                    f"--model.init_args.reward.adapter={f['rm_adapter']}"),
     ["model.init_args.reward {rm_adapter} was trained on the base name_or_path='{lm_dir}'", "arch='demo-tiny'"], 2),
    ("ppo-reward-adapter-missing", lambda f: ppo(f, "--model.init_args.reward=lit_rlhf.rewards.AdapterReward",
                                                 f"--model.init_args.reward.adapter={f.root / 'nope'}"),
     ["reward.init_args.adapter: no adapter_config.json in", "nope"], 2),
    ("ppo-reward-adapter-full-ft", lambda f: ppo(f, "--model.init_args.lm.arch=null", "--model.init_args.lm.lora=null",
                                                 f"--model.init_args.lm.name_or_path={f['lm_dir']}",
                                                 "--model.init_args.reward=lit_rlhf.rewards.AdapterReward",
                                                 f"--model.init_args.reward.adapter={f['rm_adapter']}"),
     ["AdapterReward scores on the policy's frozen base, so the policy needs LoRA"], 2),
    ("ppo-prompt-batch-0", lambda f: ppo(f, "--data.init_args.batch_size=0"), ["batch_size", "0"], 2),
    # --- weights that cannot load, or would load as random
    ("weights-missing", lambda f: sft(f, "--model.init_args.lm.arch=null", f"--model.init_args.lm.name_or_path={f['no_weights']}"),
     ["{no_weights}", "cannot load the model's weights"], 2),
    ("weights-truncated", lambda f: sft(f, "--model.init_args.lm.arch=null", f"--model.init_args.lm.name_or_path={f['truncated']}"),
     ["{truncated}", "cannot"], 2),
    ("policy-is-a-reward-model", lambda f: sft(f, "--model.init_args.lm.arch=null", f"--model.init_args.lm.name_or_path={f['rm_dir']}"),
     ["{rm_dir}", "lm_head.weight", "randomly initialised"], 2),
    ("ppo-policy-is-a-reward-model", lambda f: ppo(f, "--model.init_args.lm.arch=null", f"--model.init_args.lm.name_or_path={f['rm_dir']}"),
     ["{rm_dir}", "lm_head.weight", "randomly initialised"], 2),
    ("reward-model-without-head", lambda f: rm(f, "--model.init_args.lm.arch=null", "--model.init_args.new_score_head=false",
                                               f"--model.init_args.lm.name_or_path={f['lm_dir']}"),
     ["{lm_dir}", "score.weight", "new_score_head"], 2),
    ("ppo-reward-is-a-language-model", lambda f: ppo(f, "--model.init_args.reward=lit_rlhf.rewards.RewardModelReward",
                                                     f"--model.init_args.reward.init_args.path={f['lm_dir']}"),
     ["model.init_args.reward.init_args.path: {lm_dir} is a LlamaForCausalLM, not a reward model"], 2),
    # --- the pipeline: every stage checked before the first one trains
    ("pipeline-output-is-a-file", lambda f: pipeline(f, f"--output_dir={f['a_file']}"), ["--output_dir", "not a directory"], 2),
    ("pipeline-config-missing", lambda f: pipeline(f, f"--output_dir={f.root / 'p1'}", "--rm_config=./nope.yaml"),
     ["--rm_config", "nope.yaml"], 2),
    ("pipeline-unknown-option", lambda f: pipeline(f, f"--output_dir={f.root / 'p2'}", "--no-such-option"),
     ["--no-such-option"], 2),
    ("pipeline-bad-rm-before-sft", lambda f: pipeline(f, f"--output_dir={f.root / 'p3'}", f"--rm_config={f['overlay_bad_rm']}"),
     ["pipeline stage rm", "model.init_args.center_coef must be >= 0"], 2),
    ("pipeline-bad-ppo-before-sft", lambda f: pipeline(f, f"--output_dir={f.root / 'p4'}", f"--ppo_config={f['overlay_bad_ppo']}"),
     ["pipeline stage ppo", "kl.target must be a finite number > 0, got -3"], 2),
    # --- export of a run
    ("export-missing-dir", lambda f: ["/no/such/run", str(f.root / "out1")], ["config.yaml not found"], 2),
    ("export-not-a-run", lambda f: [str(f.root), str(f.root / "out2")], ["config.yaml not found"], 2),
    ("export-unfinished", lambda f: [f["unfinished"], str(f.root / "out3")], ["did the run finish?"], 2),
    ("export-truncated-adapter", lambda f: [f["bad_adapter"], str(f.root / "out4")], ["adapter"], 2),
]

EXPORT = "lit_rlhf.export"


@pytest.mark.slow
@pytest.mark.parametrize("case_id, command, fragments, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(cli, files, case_id, command, fragments, code):
    args = [str(a) for a in command(files)]
    result = cli.run(args, module=EXPORT if case_id.startswith("export") else None)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    context = f"exit {result.code}; stderr:\n{result.stderr[-3000:]}"
    assert result.code == code, context
    assert "Traceback" not in result.stderr, context
    assert len(errors) == 1, context
    assert result.stderr.strip().splitlines()[-1] == errors[0], context  # the last word
    for fragment in fragments:
        fragment = fragment.format(**{k: str(v) for k, v in files.paths.items()})
        assert fragment in errors[0], context


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
