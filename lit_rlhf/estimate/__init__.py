"""``lit-rlhf estimate``: a stage's predicted peak memory per device, from its config, no weights read.

    lit-rlhf estimate -c configs/ppo/demo.yaml
    python train.py estimate -c configs/sft/llama-7b-stack-exchange.yaml --memory 24GB
    python train.py estimate -c configs/ppo/gpt-neox-20b-sentiment.yaml --model.init_args.lm.quantization=4bit-nf4

The configs compose as for ``fit`` (``-c base -c overlay``, ``config:`` includes, dotted
overrides). The model's shape comes from its ``config.json`` (a local directory, the hub cache,
or the hub) or its ``arch``, built on PyTorch's meta device (shapes without storage); the
arithmetic is :mod:`lit_rlhf.estimate.memory` (pure formulas), the reading of the config
:mod:`lit_rlhf.estimate.config`. ``--memory`` (``24GB``, ``24GiB``, ``24000MB``, ``80G``)
adds a last line saying whether the prediction fits; the exit code is 0 either way, 2 for bad
input (one ``error:`` line).

From Python (a benchmark beside its measured peak)::

    from lit_rlhf.estimate import RewardSpec, estimate_stage
    est = estimate_stage(lm, "ppo", batch_size=8, prompt_length=32, new_tokens=32,
                         reward=RewardSpec("adapter"))
    est.allocated  # bytes, comparable to torch.cuda.max_memory_allocated()
"""

from lit_rlhf.estimate.config import (
    RewardSpec,
    arch_shape,
    estimate_config,
    estimate_stage,
    main,
    parse_memory,
)

__all__ = ["RewardSpec", "arch_shape", "estimate_config", "estimate_stage", "main", "parse_memory"]
