"""Reward functions for PPO: ``(prompts, responses) -> (B,) scores``.

Any callable with that signature works (give it as a ``class_path`` in the config). Built in:

* :class:`RewardModelReward`: a reward model exported by the RM stage (or any HF
  sequence-classification model with one output), optionally normalized with the reward
  mean/std stored beside it;
* :class:`TextClassificationReward`: a transformers text-classification model, scored by the
  logit of one label, as in the classic IMDB sentiment experiment;
* :class:`JudgeReward`: the offline demo's lexicon judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lit_rlhf.models.config import looks_local


class RewardFunction:
    """Base class: score each prompt + response; move to a device when asked.

    Prompts arrive as text (rendered by the chat template for conversational data). A
    subclass that sets ``wants_messages = True`` gets conversational prompts as their
    message lists instead (text prompts stay text).
    """

    wants_messages = False

    def to(self, device: torch.device) -> RewardFunction:
        return self

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        raise NotImplementedError


class JudgeReward(RewardFunction):
    """The demo's transparent sentiment judge on prompt + response (see lit_rlhf.demo.judge)."""

    def __init__(self, scale: float = 1.0) -> None:
        """
        Args:
            scale: multiply the judge's score (about [-1, 1]) by this.
        """
        self.scale = scale

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        from lit_rlhf.demo import sentiment_score

        return torch.tensor([self.scale * sentiment_score(p + r) for p, r in zip(prompts, responses)])


class _HFClassifierReward(RewardFunction):
    """Shared loading and batched scoring of a sequence-classification model."""

    def __init__(self, path: str, batch_size: int, dtype: str, max_length: int, trust_remote_code: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
        if looks_local(path) and not Path(path).expanduser().exists():
            # Checked here, at construction: otherwise the first rollout would fail on a hub lookup.
            raise FileNotFoundError(f"reward.init_args.path: no such model directory {path!r}")
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.dtype, self.trust_remote_code = getattr(torch, dtype), trust_remote_code
        self.device = torch.device("cpu")
        self._model = self._tokenizer = None

    def _load(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._model is None:
            from lit_rlhf.models import from_pretrained_checked, resolve_path

            self.path = resolve_path(self.path)
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            if self._tokenizer.pad_token_id is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
            # A missing score head would be randomly initialised: scores of noise.
            self._model = from_pretrained_checked(
                AutoModelForSequenceClassification, self.path, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            self._model.config.pad_token_id = self._tokenizer.pad_token_id
            self._model.requires_grad_(False).eval().to(self.device)
        return self._model, self._tokenizer

    def to(self, device: torch.device) -> RewardFunction:
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """(N, num_labels) float32 logits, scored in batches of ``batch_size``."""
        model, tokenizer = self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=self.max_length).to(self.device)
            out.append(model(**enc).logits.float())
        return torch.cat(out)


class RewardModelReward(_HFClassifierReward):
    """A one-output reward model in HF format, e.g. ``<rm run>/export`` from the RM stage."""

    def __init__(
        self,
        path: str,
        normalize: bool = True,
        batch_size: int = 16,
        dtype: str = "float32",
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            path: directory (or hub id) of the reward model and its tokenizer.
            normalize: subtract the reward mean and divide by the std stored in
                ``lit_rlhf.json`` by the RM export (ignored if the file is absent).
            batch_size: texts per reward-model forward pass.
            dtype: weights dtype of the reward model.
            max_length: longest tokenized prompt + response scored (truncated beyond).
            trust_remote_code: run code shipped with a hub model (off by default).
        """
        super().__init__(path, batch_size, dtype, max_length, trust_remote_code)
        self.normalize, self.mean, self.std = normalize, 0.0, 1.0

    def _load(self):
        first = self._model is None
        loaded = super()._load()
        stats = Path(self.path) / "lit_rlhf.json"
        if first and self.normalize and stats.is_file():
            meta = json.loads(stats.read_text())
            if meta.get("reward_mean") is not None and meta.get("reward_std"):
                self.mean, self.std = float(meta["reward_mean"]), float(meta["reward_std"])
        return loaded

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        logits = self.logits([p + r for p, r in zip(prompts, responses)])
        if logits.size(-1) != 1:
            raise ValueError(f"reward model {self.path} has {logits.size(-1)} outputs; expected 1")
        return ((logits[:, 0] - self.mean) / self.std).cpu()


class TextClassificationReward(_HFClassifierReward):
    """The logit of one label of a text classifier (e.g. POSITIVE of an IMDB sentiment model)."""

    def __init__(
        self,
        path: str,
        label: str = "POSITIVE",
        batch_size: int = 16,
        dtype: str = "float32",
        max_length: int = 512,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            path: directory or hub id of the classifier, e.g. ``lvwerra/distilbert-imdb``.
            label: the label whose raw logit is the reward.
            batch_size: texts per forward pass.
            dtype: weights dtype.
            max_length: longest tokenized text scored (truncated beyond).
            trust_remote_code: run code shipped with a hub model (off by default).
        """
        super().__init__(path, batch_size, dtype, max_length, trust_remote_code)
        self.label = label

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        model, _ = self._load()
        labels = {v: int(k) for k, v in model.config.id2label.items()}
        if self.label not in labels:
            raise ValueError(f"{self.path} has no label {self.label!r}; labels are {sorted(labels)}")
        return self.logits([p + r for p, r in zip(prompts, responses)])[:, labels[self.label]].cpu()
