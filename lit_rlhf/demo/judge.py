"""A transparent, lexicon-based sentiment judge: the demo's "gold" labeller and reward.

In the classic IMDB experiment a pretrained sentiment classifier scores the policy's reviews.
Offline we need something with the same role whose behaviour a reader can check by hand, so
the judge is a few lines of rules over the lexicon the review generator draws its sentiment
words from (:mod:`lit_rlhf.demo.lexicon`).

How a score is made
-------------------
1. Tokenise: ``re.findall(r"[a-z]+(?:'[a-z]+)?|[.!?;,]", text.lower())``: words (with an
   optional apostrophe part, so "isn't" is one token) and clause punctuation.
2. Walk the tokens left to right, keeping two pieces of state:

   * a pending *multiplier* (starts at 1). An intensifier ("very" x1.5, "extremely" x1.8, ...)
     or downtoner ("somewhat" x0.5, "a bit" x0.5, ...) multiplies it; it applies only to the
     token right after it (chains like "not very" and "really very" carry on), and the
     combined multiplier is clipped to [0.25, 2] so stacking cannot blow up a score.
   * a pending *negation*: "not", "never", "no", "hardly", "rarely", "cannot" or any word
     ending in "n't" negates the next sentiment word within 3 tokens.

   A sentiment word (value in [-3, 3], e.g. "superb" +3, "good" +1.5, "dull" -2) contributes
   ``value * multiplier``, times ``-0.5`` if negated ("not good" = -0.75, "not terrible" =
   +1.5: negation flips a word and weakens it). Then both states reset. Clause punctuation
   (``. ! ? ; ,``) also resets them, so "not" never reaches into the next clause.
3. ``score = total / (3 * (hits + 1))`` where ``hits`` is the number of sentiment words. This
   is roughly the mean word value scaled to [-1, 1], shrunk towards 0 when there is little
   evidence (the ``+ 1``). Text without sentiment words, including empty text, scores 0.0.

Examples: "the film was terrible" -> -3 / 6 = -0.5; "a wonderful, moving film" ->
(2.5 + 2) / 9 = 0.5; "not good at all" -> -0.75 / 6 = -0.125. A typical generated review
scores in roughly [-1, 1]; the extreme reachable value is +-2 (every word maximally boosted).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .lexicon import LEXICON, MAX_VALUE, MODIFIERS, NEGATORS

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[.!?;,]")
_BOUNDARIES = frozenset(".!?;,")
if TYPE_CHECKING:
    import torch

NEGATION_SCALE = -0.5  # a negated word counts for minus half its value
NEGATION_WINDOW = 3  # negation reaches the next sentiment word within this many tokens
MULTIPLIER_RANGE = (0.25, 2.0)


def tokenize(text: str) -> list[str]:
    """Lowercase words and clause punctuation, as the judge sees them."""
    return _TOKEN.findall(text.lower())


def _is_negator(token: str) -> bool:
    return token in NEGATORS or token.endswith("n't")


def raw_score(text: str) -> tuple[float, int]:
    """``(total, hits)``: the summed word contributions and how many sentiment words there were."""
    total, hits = 0.0, 0
    multiplier, negation_left = 1.0, 0
    for token in tokenize(text):
        if token in _BOUNDARIES:
            multiplier, negation_left = 1.0, 0
            continue
        value = LEXICON.get(token)
        if value is not None:
            value *= multiplier
            if negation_left > 0:
                value *= NEGATION_SCALE
            total += value
            hits += 1
            multiplier, negation_left = 1.0, 0
        elif token in MODIFIERS:
            lo, hi = MULTIPLIER_RANGE
            multiplier = min(hi, max(lo, multiplier * MODIFIERS[token]))
            negation_left -= 1  # a modifier still uses up one token of the negation window
        elif _is_negator(token):
            multiplier, negation_left = 1.0, NEGATION_WINDOW
        else:
            multiplier = 1.0  # modifiers bind to the very next word only
            negation_left -= 1
    return total, hits


def sentiment_score(text: str) -> float:
    """The judge's score of one text: higher is more positive, typically in [-1, 1]."""
    total, hits = raw_score(text)
    return total / (MAX_VALUE * (hits + 1))


class DemoJudge:
    """Batch wrapper around :func:`sentiment_score`, with the interface of a reward model.

    ``judge(texts)`` returns a float32 tensor of shape ``(len(texts),)`` on the CPU.
    """

    def __call__(self, texts: Iterable[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("DemoJudge expects a list of texts, not a single string")
        import torch  # deferred: the generator and the scores themselves need no torch

        return torch.tensor([sentiment_score(t) for t in texts], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lexicon={len(LEXICON)} words)"
