"""A small byte-level BPE tokenizer trained on the demo reviews (GPT-2 style, no download).

* Byte-level pre-tokenizer (no prefix space) and decoder, so any text round-trips exactly.
* ``<|endoftext|>`` is both BOS and EOS, ``<|pad|>`` pads; they are ids 0 and 1.
* No post-processor: encoding never adds special tokens. Callers append EOS themselves
  (SFT packing, reward-model inputs), exactly as with GPT-2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_MAX_LENGTH = 1024


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of (at most) ``vocab_size`` tokens on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # 256 byte symbols + 2 specials must fit, or some bytes would be unencodable.
    if vocab_size < len(byte_level.alphabet()) + 2:
        raise ValueError(f"vocab_size must be >= 258 for a byte-level BPE, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )
