"""The vLLM engine's checks in their own process (``python -m tests.engines.vllm_checks``):
vLLM's in-process worker sets up process-wide state (a torch.distributed group among it) that
must not leak into the test session. Prints one JSON line of results for tests/engines/test_vllm.py.

Cases, one after the other on one engine (vLLM's start-up is most of a case's time; each fit
starts with a whole sync, so a case never sees the previous one's weights): ``full`` and ``lora``
(a GRPO fit of three rollouts sampled by the engine, then greedy output of the engine against
the trained policy's own greedy decoding), ``broken`` (the sync skipped after the first: the
sync check must stop the run).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

import lightning as L
import torch

from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.models.heads import unwrap_peft
from lit_rlhf.modules import GRPOModule
from lit_rlhf.modules.grpo import GRPOConfig
from lit_rlhf.modules.ppo import SamplingConfig
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA
from tests.modules.ppo_helpers import LetterReward, make_data

# vLLM's CPU attention needs a head size of at least 32: two heads of 32 in TINY_LLAMA's 64 width.
ARCH = dict(TINY_LLAMA, num_attention_heads=2, num_key_value_heads=2)
LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear")


@torch.no_grad()
def hf_greedy(lm, ids: torch.Tensor, mask: torch.Tensor, n: int) -> list[list[int]]:
    """Each left-padded prompt's ``n`` greedy tokens by plain forwards of the policy (no cache, no EOS stop)."""
    out = []
    for row, keep in zip(ids, mask):
        seq = row[keep.bool()][None]
        for _ in range(n):
            seq = torch.cat([seq, lm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        out.append(seq[0, -n:].tolist())
    return out


def engine_greedy(module, ids, mask, n) -> list[list[int]]:
    module.engine.sync(module.policy.lm)
    rollout = module.engine.generate(None, ids, mask, torch.full((len(ids),), n), eos_token_id=None,
                                     pad_token_id=module.tokenizer.pad_token_id, temperature=0.0)
    return rollout.response_ids.tolist()


def run_case(case: str, engine) -> tuple[dict, object]:
    """One case's results and the engine (built by the first case, handed to the next)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    module = GRPOModule(ModelConfig(arch=ARCH, tokenizer="demo", lora=LORA if case == "lora" else None), LetterReward(),
                        optim=OptimConfig(lr=1e-2, min_lr_ratio=1.0), grpo=GRPOConfig(num_generations=4),
                        sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8, engine="vllm"), rollout_batch_size=4)
    stats, first_loss = [], {}
    log_step, loss = module._log_step, module.loss

    def record(s):
        stats.append({k: float(v) for k, v in s.items() if k in ("rollout/sampler_logprob_gap", "time/weight_sync")})
        log_step(s)

    def recording_loss(sub, *args):
        value, s = loss(sub, *args)
        if not first_loss:
            first_loss.update(ratio_mean=float(s["ratio_mean"]), ratio_max=float(s["ratio_max"]), kl=float(s["kl"]))
        return value, s

    module._log_step, module.loss = record, recording_loss
    if engine is not None:
        engine.syncs = 0
        module.engine = engine
    real_sync = type(engine).sync if engine is not None else None
    if case == "broken":  # the engine keeps the first weights: every later "sync" does nothing
        def stale_after_first(lm):
            if module.engine.syncs == 0:
                return real_sync(module.engine, lm)
            module.engine.syncs += 1
            return 0.0

        module.engine.sync = stale_after_first
    # The run's export (model/, adapter/) goes to a folder of its own, never the working directory.
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=(root := tempfile.mkdtemp(prefix="lit_rlhf_vllm_checks_")))
    result = {"case": case}
    try:
        trainer.fit(module, make_data(module, 4))
    except RuntimeError as err:
        result["error"] = str(err).splitlines()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.update(stats=stats, first_loss=first_loss, threads=[threads, torch.get_num_threads()])
    if case != "broken":
        dm = make_data(module, 4)
        dm.setup("fit")
        batch = dm.train_dataloader().dataset.batch(0)
        module.policy.eval()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        result["hf_greedy"] = hf_greedy(unwrap_peft(module.policy.lm) if case == "full" else module.policy.lm, ids, mask, 6)
        result["engine_greedy"] = engine_greedy(module, ids, mask, 6)
    return result, module.engine


def main(cases: list[str]) -> None:
    results, engine = {}, None
    for case in cases:
        results[case], engine = run_case(case, engine)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["full", "lora", "broken"])
