"""Reward functions for PPO: ``(prompts, responses) -> (B,) scores``.

Any callable with that signature works (from Python; the online modules wrap it once with
:func:`as_reward_function`); from a config, give a :class:`RewardFunction` subclass by
``class_path``. Built in:

* :class:`RewardModelReward`: a reward model exported by the RM stage (or any HF
  sequence-classification model with one output), optionally normalized with the reward
  mean/std stored beside it;
* :class:`AdapterReward`: a reward model trained as a LoRA adapter on the policy's base,
  loaded onto the policy's own model as a second adapter (no second copy of the base);
* :class:`TextClassificationReward`: a transformers text-classification model, scored by the
  logit of one label, as in the classic IMDB sentiment experiment;
* rule checks ("verifiable rewards"): :class:`ExactAnswerReward` (the final answer against
  the row's ``answer`` field), :class:`RegexFormatReward`, :class:`LengthPenalty`;
* :class:`WeightedRewards`: a weighted sum of several, each logged on its own.

A function that needs fields of the prompt's data row (e.g. ``answer``) names them in
``fields``; the online modules pass them as keyword arguments, one value per response
(``data.init_args.fields`` says which columns the prompts carry).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, get_args

import torch

from lit_rlhf.models.config import ModelConfig, Quantization, check_reference


class RewardFunction:
    """Base class: score each prompt + response; move to a device when asked.

    Prompts arrive as text (rendered by the chat template for conversational data). A
    subclass that sets ``wants_messages = True`` gets conversational prompts as their
    message lists instead (text prompts stay text).
    """

    wants_messages = False
    fields: tuple[str, ...] = ()
    """Data-row fields this function is called with, as keyword arguments (lists of B values)."""

    def to(self, device: torch.device) -> RewardFunction:
        return self

    def check_base(self, lm: ModelConfig, where: str = "reward") -> None:
        """Called by the online modules at construction with the policy's model config, before
        any weights load: a function that runs on the policy's base checks it fits (none by default)."""

    def attach(self, lm, tokenizer) -> None:
        """Called by the online modules once the policy's weights are loaded, with the policy's
        (peft) causal LM and tokenizer: a function that shares the policy's base takes it here."""

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        raise NotImplementedError

    def statistics(self) -> dict[str, torch.Tensor]:
        """Scalars about the last call worth logging (e.g. ``accuracy``); none by default."""
        return {}

    @property
    def display_name(self) -> str:
        """How messages name this function."""
        return type(self).__name__

    @property
    def log_name(self) -> str:
        """Its TensorBoard name: the class name in snake case without ``Reward``
        (``RewardModelReward`` -> ``reward_model``, ``ExactAnswerReward`` -> ``exact_answer``)."""
        return snake_name(self.display_name)


def snake_name(class_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name.removesuffix("Reward")).lower()


class CallableReward(RewardFunction):
    """A plain ``(prompts, responses, **fields) -> (B,)`` callable in the full protocol."""

    def __init__(self, fn) -> None:
        self.fn = fn
        # A plain callable may still declare what it wants, as a RewardFunction does.
        self.fields = tuple(getattr(fn, "fields", ()))
        self.wants_messages = bool(getattr(fn, "wants_messages", False))

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        return self.fn(prompts, responses, **fields)

    @property
    def display_name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


def as_reward_function(fn) -> RewardFunction:
    """``fn`` in the full :class:`RewardFunction` protocol: itself, or a plain callable wrapped once."""
    if isinstance(fn, RewardFunction):
        return fn
    if not callable(fn):
        raise ValueError(f"reward: expected a RewardFunction or a callable (prompts, responses) -> scores, "
                         f"got {type(fn).__name__}")
    return CallableReward(fn)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(response: str, extract: Literal["last_number", "stripped"] = "last_number") -> str | None:
    """The answer a response gives: its last number (``last_number``), or the whole response
    stripped of surrounding white space (``stripped``); None when there is none."""
    if extract == "stripped":
        return response.strip() or None
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def same_answer(given: str | None, expected) -> bool:
    """Numbers compare by value (``"46.0"`` is ``46``), anything else as stripped text."""
    if given is None or expected is None:
        return False
    expected = str(expected).strip()
    try:
        return float(given) == float(expected)
    except ValueError:
        return given.strip() == expected


class ExactAnswerReward(RewardFunction):
    """``correct`` when the response's final answer equals the row's answer, else ``wrong``.

    Logs ``accuracy`` (the fraction of correct answers) through :meth:`statistics`.
    """

    def __init__(self, answer_field: str = "answer", extract: Literal["last_number", "stripped"] = "last_number",
                 correct: float = 1.0, wrong: float = 0.0) -> None:
        """
        Args:
            answer_field: the prompt row's column holding the expected answer.
            extract: ``last_number`` (the last number in the response) or ``stripped`` (the
                whole response, stripped).
            correct, wrong: the two scores.
        """
        self.fields = (answer_field,)
        self.answer_field, self.extract, self.correct, self.wrong = answer_field, extract, correct, wrong
        self._accuracy = torch.zeros(())

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        right = torch.tensor([same_answer(final_answer(r, self.extract), a)
                              for r, a in zip(responses, fields[self.answer_field])])
        self._accuracy = right.float().mean()
        return torch.where(right, self.correct, self.wrong).float()

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"accuracy": self._accuracy}


class RegexFormatReward(RewardFunction):
    """``reward`` when the response matches ``pattern`` (whole response, or anywhere), else 0."""

    def __init__(self, pattern: str, reward: float = 1.0, full_match: bool = True) -> None:
        """
        Args:
            pattern: a Python regular expression, e.g. ``"\\d+"`` for a bare number.
            reward: the score of a matching response.
            full_match: the whole response (stripped) must match; False: a match anywhere.
        """
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"reward pattern {pattern!r} is not a regular expression: {err}") from None
        self.reward, self.full_match = reward, full_match

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        match = self.regex.fullmatch if self.full_match else self.regex.search
        return torch.tensor([self.reward if match(r.strip() if self.full_match else r) else 0.0 for r in responses])


class LengthPenalty(RewardFunction):
    """``-coef * max(0, words - max_words)``: nothing up to ``max_words`` words, then linear."""

    def __init__(self, max_words: int, coef: float = 0.1) -> None:
        if max_words < 0 or coef < 0:
            raise ValueError(f"LengthPenalty needs max_words >= 0 and coef >= 0, got {max_words}, {coef}")
        self.max_words, self.coef = max_words, coef

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        return torch.tensor([-self.coef * max(0, len(r.split()) - self.max_words) for r in responses])


class WeightedRewards(RewardFunction):
    """``sum_i weight_i * function_i``; each function's mean is logged as ``rewards/<name>``.

    Names are the class names in snake case (``exact_answer``, ``regex_format``, ...), with
    ``_2``, ``_3`` appended to repeats; each function's own statistics follow as
    ``rewards/<name>/<statistic>`` (e.g. ``rewards/exact_answer/accuracy``).
    """

    def __init__(self, functions: list[RewardFunction], weights: list[float] | None = None) -> None:
        if not functions:
            raise ValueError("WeightedRewards needs at least one function")
        weights = [1.0] * len(functions) if weights is None else list(weights)
        if len(weights) != len(functions):
            raise ValueError(f"WeightedRewards: {len(weights)} weights for {len(functions)} functions")
        if any(getattr(f, "wants_messages", False) for f in functions):
            raise ValueError("WeightedRewards passes text prompts; a function that wants messages cannot be combined")
        self.functions, self.weights = functions, weights
        self.names: list[str] = []
        for f in functions:
            name = snake_name(type(f).__name__)
            self.names.append(name if name not in self.names else f"{name}_{self.names.count(name) + 1}")
        self.fields = tuple(dict.fromkeys(field for f in functions for field in getattr(f, "fields", ())))
        self._last: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device) -> WeightedRewards:
        self.functions = [f.to(device) if hasattr(f, "to") else f for f in self.functions]
        return self

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        total, self._last = torch.zeros(len(responses)), {}
        for name, weight, f in zip(self.names, self.weights, self.functions):
            score = torch.as_tensor(f(prompts, responses, **{k: fields[k] for k in getattr(f, "fields", ())}),
                                    dtype=torch.float32).cpu()
            self._last[name] = score.mean()
            for key, value in (f.statistics() if hasattr(f, "statistics") else {}).items():
                self._last[f"{name}/{key}"] = value
            total = total + weight * score
        return total

    def statistics(self) -> dict[str, torch.Tensor]:
        return dict(self._last)


class _HFClassifierReward(RewardFunction):
    """Shared loading and batched scoring of a sequence-classification model."""

    kind = "model"  # what check_reference expects at ``path`` (a reward model: a one-output head)

    def __init__(self, path: str, batch_size: int, dtype: str, max_length: int, trust_remote_code: bool,
                 quantization: str = "none") -> None:
        if quantization not in get_args(Quantization):
            raise ValueError(f"reward quantization must be none, 8bit, 4bit-nf4 or 4bit-fp4, got {quantization!r}")
        if batch_size < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
        # Checked here, at construction: otherwise the first rollout would fail on a hub lookup.
        check_reference(path, "model.init_args.reward.init_args.path", self.kind)
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.dtype, self.trust_remote_code, self.quantization = getattr(torch, dtype), trust_remote_code, quantization
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
            quantized = {}
            if self.quantization != "none":
                from lit_rlhf.models import check_quantization
                from lit_rlhf.models.loading import bnb_config

                check_quantization(self.quantization, self.device)
                # Quantized weights load straight onto their device and cannot move after.
                quantized = {"quantization_config": bnb_config(self.quantization, self.dtype),
                             "device_map": {"": self.device}}
            # A missing score head would be randomly initialised: scores of noise.
            self._model = from_pretrained_checked(
                AutoModelForSequenceClassification, self.path, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                **quantized,
            )
            self._model.config.pad_token_id = self._tokenizer.pad_token_id
            if self.quantization != "none":  # the CPU-only repacked 4-bit kernel differs (see there)
                from lit_rlhf.models import disable_cpu_4bit_repacking

                disable_cpu_4bit_repacking(self._model)
            self._model.requires_grad_(False).eval()
            if not quantized:
                self._model.to(self.device)
        return self._model, self._tokenizer

    def to(self, device: torch.device) -> RewardFunction:
        self.device = torch.device(device)
        if self._model is not None and self.quantization == "none":
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

    kind = "reward model"

    def __init__(
        self,
        path: str,
        normalize: bool = True,
        batch_size: int = 16,
        dtype: str = "float32",
        max_length: int = 1024,
        trust_remote_code: bool = False,
        quantization: Quantization = "none",
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
            quantization: load the reward model's weights in 8-bit or 4-bit (bitsandbytes),
                computing in ``dtype``; a second copy of a base the policy already holds costs
                less as an :class:`AdapterReward`.
        """
        super().__init__(path, batch_size, dtype, max_length, trust_remote_code, quantization)
        self.normalize, self.mean, self.std = normalize, 0.0, 1.0
        stats = Path(path).expanduser() / "lit_rlhf.json"
        if normalize and stats.is_file():  # an RM export: its statistics must be there to normalize by
            meta = json.loads(stats.read_text())
            if meta.get("reward_mean") is None or not meta.get("reward_std"):
                raise ValueError(f"model.init_args.reward.init_args.normalize: {stats} has no reward mean/std (the RM run never "
                                 "validated): validate the RM run (trainer.limit_val_batches > 0), or set "
                                 "model.init_args.reward.init_args.normalize=false")

    def _load(self):
        first = self._model is None
        loaded = super()._load()
        stats = Path(self.path) / "lit_rlhf.json"
        if first and self.normalize and stats.is_file():
            meta = json.loads(stats.read_text())
            if meta.get("reward_mean") is not None and meta.get("reward_std"):
                self.mean, self.std = float(meta["reward_mean"]), float(meta["reward_std"])
        return loaded

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        logits = self.logits([p + r for p, r in zip(prompts, responses)])
        if logits.size(-1) != 1:
            raise ValueError(f"reward model {self.path} has {logits.size(-1)} outputs; expected 1")
        return ((logits[:, 0] - self.mean) / self.std).cpu()


class AdapterReward(RewardFunction):
    """A reward model trained as a LoRA adapter, served from the policy's own base.

    ``adapter`` is the RM stage's ``adapter/`` folder (a peft LoRA sequence-classification
    adapter with its score head), trained on the same base as the policy (e.g. both on the SFT
    model). The online module loads it onto the policy's base under its own adapter name
    (:meth:`attach`); a score switches to that adapter, runs the trunk, reads the score head at
    each text's last token, and switches back. So one copy of the (8-/4-bit) base serves the
    policy, the reference (adapters off), the value head and the reward model. The scores
    equal those of the same reward model merged and loaded on its own (tested), up to the
    rounding of a quantized base.

    Needs a LoRA policy (with full fine-tuning the base itself is trained: use
    :class:`RewardModelReward` on the RM's export). A base other than the one recorded beside
    the adapter is a one-line error at construction, before any weights load.
    """

    def __init__(self, adapter: str, normalize: bool = True, batch_size: int = 16, max_length: int = 1024,
                 name: str = "reward", check_base: bool = True) -> None:
        """
        Args:
            adapter: the reward adapter's folder (``<rm run>/adapter``).
            normalize: subtract the reward mean and divide by the std stored in its
                ``lit_rlhf.json`` by the RM stage (ignored if absent).
            batch_size: texts per scoring forward pass.
            max_length: longest tokenized prompt + response scored (truncated beyond).
            name: the adapter name on the policy's model (must differ from the policy's ``default``).
            check_base: refuse a policy whose base differs from the adapter's recorded one.
        """
        from lit_rlhf.models.adapters import META, read_scoring_adapter

        if batch_size < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
        if name == "default":
            raise ValueError("AdapterReward name 'default' is the policy's own adapter: choose another")
        self.adapter = Path(adapter).expanduser()
        self.config = read_scoring_adapter(self.adapter, "model.init_args.reward.init_args.adapter")
        self.batch_size, self.max_length, self.name, self._check_base = batch_size, max_length, name, check_base
        self.mean, self.std = 0.0, 1.0
        meta = self.adapter / META
        if normalize and meta.is_file():
            stats = json.loads(meta.read_text())
            if stats.get("reward_mean") is not None and stats.get("reward_std"):
                self.mean, self.std = float(stats["reward_mean"]), float(stats["reward_std"])
        self._lm = self._score = self._tokenizer = None

    def check_base(self, lm: ModelConfig, where: str = "model.init_args.reward.init_args.adapter") -> None:
        """Called by the online modules at construction, with the policy's model config."""
        from lit_rlhf.models.adapters import check_same_base

        if lm.lora is None:
            raise ValueError(f"{where}: AdapterReward scores on the policy's frozen base, so the policy needs LoRA "
                             "(model.init_args.lm.lora); with full fine-tuning use RewardModelReward on the RM's export")
        if self._check_base:
            check_same_base(self.adapter, lm, where)

    def attach(self, lm, tokenizer) -> None:
        """Load the adapter onto the policy's peft model ``lm`` (called once its weights are loaded)."""
        from lit_rlhf.models.adapters import add_scoring_adapter

        if self._lm is lm:
            return
        self._score = add_scoring_adapter(lm, self.adapter, self.name, self.config)
        self._lm = lm
        # The reward model's own tokenizer where it was saved with it (same base: same vocabulary).
        if (self.adapter / "tokenizer_config.json").is_file():
            from lit_rlhf.models import load_tokenizer

            tokenizer = load_tokenizer(str(self.adapter))
        self._tokenizer = tokenizer

    def to(self, device: torch.device) -> AdapterReward:
        if self._score is not None:
            self._score.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        from lit_rlhf.models.adapters import adapter_active
        from lit_rlhf.models.heads import full_precision_head

        if self._lm is None:
            raise RuntimeError("AdapterReward scores on the policy's base: the online module attaches it when "
                               "the policy loads (call attach(policy_lm, tokenizer) to use it on its own)")
        texts = [p + r for p, r in zip(prompts, responses)]
        decoder = self._lm.get_base_model().get_decoder()
        device = self._score.weight.device
        out = []
        with adapter_active(self._lm, self.name):
            for i in range(0, len(texts), self.batch_size):
                enc = self._tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                      padding_side="right", truncation=True, max_length=self.max_length).to(device)
                hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 use_cache=False).last_hidden_state  # (b, T, H)
                last = enc["attention_mask"].sum(-1) - 1  # right-padded: each text's last real token
                last_hidden = hidden[torch.arange(len(last), device=device), last]
                out.append(full_precision_head(self._score, last_hidden).squeeze(-1))
        return ((torch.cat(out) - self.mean) / self.std).cpu()


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

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        model, _ = self._load()
        labels = {v: int(k) for k, v in model.config.id2label.items()}
        if self.label not in labels:
            raise ValueError(f"{self.path} has no label {self.label!r}; labels are {sorted(labels)}")
        return self.logits([p + r for p, r in zip(prompts, responses)])[:, labels[self.label]].cpu()
