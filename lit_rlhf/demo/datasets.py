"""The demo's dataset names for the data modules (:mod:`lit_rlhf.data.sources`).

* ``demo``: the offline movie reviews; for SFT their text, for reward modelling and DPO the
  preference pairs its judge labels, for online RL the first 2-8 words of each review as a
  prompt (as in the IMDB experiment);
* ``arithmetic``: the arithmetic task's ``{prompt, completion}`` SFT rows and its
  ``{prompt, answer}`` problems;
* ``calculator``: the calculator task's demonstrations and problems, the same schema.

:func:`register` is the ``lit_rlhf.datasets`` entry point of this package.
"""

from __future__ import annotations

from lit_rlhf.data.sources import DatasetSource, register_dataset

# The words a demo prompt keeps of its review: at least, at most.
PROMPT_MIN_WORDS, PROMPT_MAX_WORDS = 2, 8


def register() -> None:
    """Register ``demo``, ``arithmetic`` and ``calculator`` with the data modules (idempotent)."""
    register_dataset("demo", "sft", _reviews)
    register_dataset("demo", "preference", _pairs)
    register_dataset("demo", "prompts", _review_openings)
    for task in ("arithmetic", "calculator"):
        register_dataset(task, "sft", _task(task, "sft_dir"))
        register_dataset(task, "prompts", _task(task, "prompts_dir"))


def _reviews(**_) -> DatasetSource:
    from lit_rlhf.data.formats import load_rows
    from lit_rlhf.demo import prepare_demo

    demo = prepare_demo()
    return DatasetSource(train=load_rows(str(demo.train_file)), val=load_rows(str(demo.val_file)),
                         description=str(demo.root))


def _pairs(**_) -> DatasetSource:
    from lit_rlhf.data.formats import load_rows
    from lit_rlhf.demo import prepare_demo

    demo = prepare_demo()
    return DatasetSource(train=load_rows(str(demo.pairs_train_file)), val=load_rows(str(demo.pairs_val_file)),
                         description="demo pairs")


def _review_openings(seed: int = 0, val_size: int = 64, **_) -> DatasetSource:
    from lit_rlhf.demo import make_prompts, prepare_demo, read_jsonl

    demo = prepare_demo()
    train = [r["text"] for r in read_jsonl(demo.train_file)]
    val = [r["text"] for r in read_jsonl(demo.val_file)][:val_size]
    return DatasetSource(train=make_prompts(train, PROMPT_MIN_WORDS, PROMPT_MAX_WORDS, seed),
                         val=make_prompts(val, PROMPT_MIN_WORDS, PROMPT_MAX_WORDS, seed + 1),
                         description="demo prompts")


def _task(module: str, folder: str):
    """A built task's split folder (``sft_dir`` or ``prompts_dir``), its ``prepare_*`` run first."""

    def build(**_) -> DatasetSource:
        import importlib

        task = importlib.import_module(f"lit_rlhf.demo.{module}")
        path = str(getattr(getattr(task, f"prepare_{module}")(), folder))
        return DatasetSource(path=path, val_split="validation", description=path)

    return build
