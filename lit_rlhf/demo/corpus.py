"""A deterministic generator of plain-English movie reviews of mixed sentiment.

The offline stand-in for the IMDB reviews of the classic "generate positive movie reviews"
RLHF experiment. Each review has a latent sentiment ``s`` in [-1, 1] (uniform) that drives
its wording:

* A review is 2-6 sentences: an opener (a neutral introduction or a first verdict), body
  sentences (one part of the film judged, two parts judged, a contrast such as "the acting
  was superb, but the plot dragged", or neutral plot summary) and a closing verdict,
  sometimes followed by a numeric rating. There are 42 sentence templates, and the sentiment
  phrases inside them vary in shape too ("dull", "somewhat dull", "not dull at all", "never
  drags", "an absolute triumph", ...), so sentence shapes number in the hundreds. The word
  lists are short on purpose (format 4: 340 words, 6 first and 6 last names, a thinned subset
  of the judge's lexicon): the demo's small model must learn to write them in two minutes.
* Every sentiment slot gets a target value: ``s`` plus a little noise for verdicts, more
  noise for individual parts of the film, and ``s +- d`` for the two sides of a contrast,
  which is how mixed reviews arise. The slot is then filled with a phrase whose value under
  the judge's rules (:mod:`lit_rlhf.demo.judge`) is within 0.15 of the target, so the text
  genuinely reflects the latent sentiment, and the judge can recover it.
* Everything else (titles, names, places, plots) comes from word lists that are checked at
  import to contain no sentiment words, modifiers or negators.

Determinism: only ``random.Random(seed).random()``-based draws and exact float arithmetic
(+, -, *, no ``gauss``/``log``), and no ``hash()``-dependent iteration, so a given
``(n, seed)`` yields the same reviews in every process and on every platform. Reviews are
generated one after another from one stream, so ``generate_reviews(n, seed)`` is a prefix of
``generate_reviews(n + m, seed)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from .judge import raw_score, tokenize
from .lexicon import (
    ADVERBS,
    ASPECT_VERBS,
    EXTREME_ADJECTIVES,
    FEELINGS,
    GRADABLE_ADJECTIVES,
    LEXICON,
    MAX_VALUE,
    MODIFIERS,
    NEGATORS,
    NOUNS,
    PERFORMANCE_ADJECTIVES,
    VIEWER_VERBS,
)

__all__ = ["generate_reviews", "make_prompts"]

# =========================================================================================
# Neutral vocabulary (no word here may carry sentiment: checked by _check_vocabulary)

TITLE_ADJECTIVES = [
    "Silent", "Crimson", "Hidden", "Broken", "Distant", "Midnight", "Iron", "Golden",
]
TITLE_NOUNS = [
    "Harbor", "Storm", "River", "Garden", "Empire", "Mirror", "Shadow", "Orchard", "Frontier",
    "Machine",
]
TITLE_PLACES = [
    "Avalon", "Eldridge", "Marrow Creek", "Port Haven",
]
FIRST_NAMES = [
    "Anna", "Marcus", "Elena", "David", "Priya", "Tom",
]
LAST_NAMES = [
    "Hale", "Moreno", "Whitaker", "Okafor", "Lindqvist", "Brennan",
]
GENRES = [
    "thriller", "romantic comedy", "western", "horror film", "documentary", "musical",
    "heist movie", "war drama",
]
ROLES = [
    "detective", "widow", "con artist", "retired soldier", "ghost", "chef", "astronaut",
    "schoolteacher",
]
GOALS = [
    "find her missing sister", "pull off one last heist", "clear his name",
    "win back his family", "solve a string of murders", "escape the island",
]
PLACES = [
    "Lisbon", "a small town in Ohio", "Tokyo", "the Arctic", "a remote lighthouse",
    "a space station",
]
WHEN = [
    "last weekend", "on a rainy Sunday", "at a late screening", "on opening night",
]
RELATIVES = ["sister", "roommate", "father", "best friend", "partner", "cousin", "neighbor", "aunt"]
RELATIONS = [
    "brother", "mother", "old friend", "partner", "rival", "landlord",
]
PARTS = [
    "final act", "opening minutes", "middle stretch", "last twenty minutes", "second half",
    "quieter scenes", "action scenes", "flashbacks", "first hour", "closing scenes",
]
SOURCES = [
    "a novel", "a short story", "an old radio play", "a memoir", "a graphic novel",
    "a stage play", "a newspaper article", "a folk tale",
]
OBJECTS = [
    "a stolen painting", "a locked briefcase", "an old map", "a missing dog", "a cursed ring",
    "a vintage car", "a wedding cake", "a forged passport", "a music box", "a mysterious key",
]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
IT_IS = ["it is", "it's", "the film is", "the movie is", "this is"]
# Parts of a film as (phrase, plural?).
ASPECTS: list[tuple[str, bool]] = [
    ("the acting", False), ("the plot", False), ("the script", False), ("the dialogue", False), ("the soundtrack", False), ("the score", False), ("the cinematography", False), ("the pacing", False),
]
# Countable parts for "a clever premise", "a stunning score".
COUNT_NOUNS = [
    "premise", "idea", "script", "score", "soundtrack", "ending",
]

# =========================================================================================
# Sentence templates. ``{field}`` is filled by _Writer; UPPERCASE fields are sentiment slots
# (a trailing 2 means the second target value), ``{^FIELD}`` capitalises the filler.
# Sentences are capitalised at the start, so templates can begin with a lowercase field.

OPEN_NEUTRAL = [
    "I saw {title} {when}.",
    "{title} is the new {genre} from {director}.",
    "{title} is {a_genre} directed by {director} and starring {actor}.",
    "{director} returns with {title}, {a_genre} set in {place}.",
    "Set in {place}, {title} follows {a_role} who must {goal}.",
    "{actor} stars as {a_role} in {title}, the latest {genre} from {director}.",
]
OPEN_SENTIMENT = [
    "{title} is {VERDICT}.",
    "{title} is {ADJ} from start to finish.",
    "I {VIEW} {title}.",
    "{director}'s {title} is {VERDICT}.",
    "I came out of {title} feeling {FEEL}.",
    "{title} is {A_ATTR} {genre} with {actor} in the lead.",
]
BODY_NEUTRAL = [
    "The story follows {a_role} who must {goal}.",
    "{actor} plays {a_role} trying to {goal}.",
    "Most of the film takes place in {place}.",
    "It runs about {minutes} minutes.",
    "The plot involves {a_role}, {a_role2}, and {object}.",
]
BODY_ONE = [
    "{aspect} {was} {ADJ}.",
    "I thought {aspect} {was} {ADJ}.",
    "{aspect} {be} {ADJ} throughout.",
    "As for {aspect}, {it} {was} {ADJ}.",
    "{aspect} {AVERB}.",
    "{aspect} {AVERB}, especially in the {part}.",
    "{actor} is {PADJ} as the {role}.",
]
BODY_TWO = [
    "{aspect} {be} {ADJ}, and {aspect2} {be2} {ADJ2}.",
    "{aspect} {AVERB}, and {aspect2} {AVERB2}.",
    "I {VIEW} {aspect} and {VIEW2} {aspect2}.",
]
BODY_CONTRAST = [
    "{aspect} {was} {ADJ}, but {aspect2} {was2} {ADJ2}.",
    "While {aspect} {be} {ADJ}, {aspect2} {be2} {ADJ2}.",
    "{aspect} {be} {ADJ}; {aspect2}, on the other hand, {be2} {ADJ2}.",
    "Despite {A_ATTR} {count_noun}, {aspect2} {AVERB2}.",
    "{aspect} {AVERB}, yet {aspect2} {AVERB2}.",
]
CLOSE = [
    "Overall, {it_is} {VERDICT}.",
    "I would {REC}.",
    "{title} is {WORTH}.",
    "All in all, {VERDICT}.",
    "Bottom line: {VERDICT}.",
    "In the end, I {VIEW} it.",
]
RATING = [
    "{rating} out of 10.", "I give it {rating} out of 10.", "Rating: {rating}/10.", "{rating}/10.",
]

# =========================================================================================
# The sentiment words the generator writes with: a thinned subset of the judge's lexicon.
# The judge scores every lexicon word, but a corpus that used them all (and every modifier
# in front of each) was measured too varied for the demo's small model to learn within its
# budget (validation loss stalled near 1.4 nats/token, and its samples were hard to read).
# Keeping every k-th word in value order keeps the whole range of values.


def _thin(words: dict[str, float], keep: int) -> dict[str, float]:
    """``keep`` words of ``words`` spread evenly over their values (deterministic)."""
    ranked = sorted(words, key=lambda w: (words[w], w))
    if keep >= len(ranked):
        return dict(words)
    picks = [ranked[round(i * (len(ranked) - 1) / (keep - 1))] for i in range(keep)]
    return {w: words[w] for w in picks}


_GRADABLE = _thin(GRADABLE_ADJECTIVES, 12)
_EXTREME = _thin(EXTREME_ADJECTIVES, 4)
_PERFORMANCE = _thin(PERFORMANCE_ADJECTIVES, 4)
_NOUNS = _thin(NOUNS, 6)
_FEELINGS = _thin(FEELINGS, 6)
_ADVERBS = _thin(ADVERBS, 4)
_VIEWER_VERBS = _thin(VIEWER_VERBS, 8)
_ASPECT_VERBS = [v for v in ASPECT_VERBS if v[0] in _thin({sg: val for sg, _, val in ASPECT_VERBS}, 6)]

# =========================================================================================
# Sentiment phrases: for each slot kind, every phrase shape ("form") with its value.

_PRED_INTENSIFIERS = [
    "very", "really",
]
_PRED_DOWNTONERS = [
    "somewhat",
]
# Before a noun ("a very clever premise") only some modifiers read naturally.
_ATTR_INTENSIFIERS = [
    "very",
]
_ATTR_DOWNTONERS = [
    "somewhat",
]
_NEUTRAL_ADJ = [
    "average", "ordinary", "conventional", "about what you would expect",
]
_NEUTRAL_ATTR = [
    "ordinary", "conventional", "standard", "familiar",
]

Form = list[tuple[str, str]]  # phrases as (singular, plural) texts


def _same(texts: Sequence[str]) -> Form:
    return [(t, t) for t in texts]


def _each(prefixes: Sequence[str], words: Sequence[str]) -> list[str]:
    """Every ``prefix word`` combination: _each(["very"], ["good"]) == ["very good"]."""
    return [f"{p} {w}" for p in prefixes for w in words]


def _positive(table: dict[str, float]) -> list[str]:
    return [w for w, v in table.items() if v > 0]


def _negative(table: dict[str, float]) -> list[str]:
    return [w for w, v in table.items() if v < 0]


def _strong(table: dict[str, float]) -> dict[str, float]:
    """Words strong enough to take a modifier (|value| >= 1.5)."""
    return {w: v for w, v in table.items() if abs(v) >= 1.5}


def _adjective_forms(
    gradable: dict[str, float], extreme: dict[str, float], negate: bool
) -> dict[str, Form]:
    """Predicative ("was not very clever", negate=True) or attributive ("a very clever ...")."""
    intensifiers = _PRED_INTENSIFIERS if negate else _ATTR_INTENSIFIERS
    downtoners = _PRED_DOWNTONERS if negate else _ATTR_DOWNTONERS
    strong = list(_strong(gradable))  # "very adequate" and "slightly decent" read oddly
    forms = {
        "bare": _same([*gradable, *extreme]),
        "intensified": _same(_each(intensifiers, strong)),
        "downtoned": _same(_each(downtoners, strong)),
        "neutral": _same(_NEUTRAL_ADJ if negate else _NEUTRAL_ATTR),
    }
    if negate:
        positive = _positive(_strong(gradable))
        forms["negated"] = _same(
            _each(["not"], strong)
            + _each(["not very"], positive)
            + [f"not {a} at all" for a in positive]
            + _each(["never"], _negative(gradable))
            + _each(["not"], _negative(extreme))  # "not terrible"
        )
    return forms


def _verdict_forms() -> dict[str, Form]:
    def a(word: str) -> str:
        return f"{_article(word)} {word}"

    nouns = list(_NOUNS)
    attr = _adjective_forms(_GRADABLE, _EXTREME, negate=False)
    forms = {
        "noun": _same([a(n) for n in nouns] + [f"something of {a(n)}" for n in nouns]),
        "noun_intensified": _same(_each(["a real", "an absolute"], nouns)),
        "noun_downtoned": _same(_each(["a minor"], nouns)),
        "noun_negated": _same(
            _each(["no"], nouns)
            + [f"hardly {a(n)}" for n in nouns]
            + [f"not {a(n)}" for n in _negative(_NOUNS)]
        ),
        "neutral": _same([
            "a perfectly ordinary {genre}", "just another {genre}", "a {genre} like many others",
            "a by-the-numbers {genre}",
        ]),
    }
    # "a very clever {genre}": the genre is filled in per review.
    for name in ("bare", "intensified", "downtoned"):
        forms[f"genre_{name}"] = _same([f"{a(p)} {{genre}}" for p, _ in attr[name]])
    return forms


def _aspect_verb_forms() -> dict[str, Form]:
    def both(prefix: str) -> Form:
        return [(f"{prefix} {sg}", f"{prefix} {pl}") for sg, pl, _ in _ASPECT_VERBS]

    return {
        "bare": [(sg, pl) for sg, pl, _ in _ASPECT_VERBS],
        "intensified": both("really") + both("truly"),
        "downtoned": both("occasionally") + both("sometimes"),
        "negated": both("never") + both("rarely")
        + [(f"does not {pl}", f"do not {pl}") for _, pl, _ in _ASPECT_VERBS],
        "neutral": [
            ("does the job", "do the job"), ("is there", "are there"),
            ("works as intended", "work as intended"), ("plays it safe", "play it safe"),
        ],
    }


def _viewer_verb_forms() -> dict[str, Form]:
    verbs = list(_VIEWER_VERBS)
    mild = [v for v in verbs if abs(_VIEWER_VERBS[v]) <= 2]  # "mildly enjoyed", not "mildly adored"
    return {
        "bare": _same(verbs),
        "intensified": _same(
            _each(["really", "truly"], verbs)
        ),
        "downtoned": _same(_each(["mildly", "somewhat"], mild)),
        "negated": _same(
            _each(["did not"], ["like", "enjoy", "love", "hate"])
            + _each(["never really"], verbs)
        ),
        "neutral": _same([
            "had mixed feelings about", "was of two minds about", "kept thinking about", "noticed",
        ]),
    }


def _feeling_forms() -> dict[str, Form]:
    feelings = list(_FEELINGS)
    intensifiers = ["very", "deeply"]
    return {
        "bare": _same(feelings),
        "intensified": _same(_each(intensifiers, feelings)),
        "downtoned": _same(_each(["somewhat"], feelings)),
        "negated": _same(
            _each(["not"], feelings)
            + _each(["never"], _negative(_FEELINGS))
            + _each(["not at all"], _positive(_FEELINGS))
        ),
        "neutral": _same(["indifferent", "puzzled", "unsure what to think", "of two minds"]),
    }


def _adverb_forms() -> dict[str, Form]:
    adverbs = list(_ADVERBS)
    return {
        "bare": _same(adverbs),
        "intensified": _same(_each(["very", "really"], adverbs)),
        "downtoned": _same(_each(["rather"], adverbs)),
        "neutral": _same(["plainly", "conventionally", "straightforwardly", "simply"]),
    }


def _recommend_forms() -> dict[str, Form]:
    return {
        "bare": _same(["recommend it", "avoid it", "skip it"]),
        "intensified": _same(
            _each(["highly", "strongly", "definitely", "really"], ["recommend it"])
            + _each(["definitely", "strongly"], ["avoid it"])
            + ["definitely skip it"]
        ),
        "downtoned": _same(
            _each(["probably"], ["skip it", "avoid it", "recommend it"]) + ["mildly recommend it"]
        ),
        "negated": _same([
            "not recommend it", "never recommend it", "hardly recommend it", "not skip it",
            "not avoid it",
        ]),
        "neutral": _same([
            "wait for it to stream", "watch it with low expectations", "leave it up to you",
        ]),
    }


def _worth_forms() -> dict[str, Form]:
    worth = [f"worth {o}" for o in ("seeing", "a look", "your time", "the ticket")]
    return {
        "bare": _same(worth),
        "intensified": _same(_each(["well", "definitely"], worth)),
        "downtoned": _same(_each(["probably", "mostly"], worth)),
        "negated": _same(_each(["not", "hardly"], worth)),
        "neutral": _same(["a way to pass two hours", "what it is"]),
    }


_PERF_GRADABLE = {**_GRADABLE, **_PERFORMANCE}
_SLOT_FORMS: dict[str, Callable[[], dict[str, Form]]] = {
    "ADJ": lambda: _adjective_forms(_GRADABLE, _EXTREME, negate=True),
    "ATTR": lambda: _adjective_forms(_GRADABLE, _EXTREME, negate=False),
    "PADJ": lambda: _adjective_forms(_PERF_GRADABLE, _EXTREME, negate=True),
    "PATTR": lambda: _adjective_forms(_PERF_GRADABLE, _EXTREME, negate=False),
    "VERDICT": _verdict_forms,
    "AVERB": _aspect_verb_forms,
    "VIEW": _viewer_verb_forms,
    "FEEL": _feeling_forms,
    "ADV": _adverb_forms,
    "REC": _recommend_forms,
    "WORTH": _worth_forms,
}

# Target values are bucketed into bins of width 0.05 over [-1, 1]; a phrase can fill a bin if
# its value (mean word value / 3, 0 for sentiment-free phrases) is within TOLERANCE of it.
N_BINS = 41
TOLERANCE = 0.15


def _bin(value: float) -> int:
    value = min(1.0, max(-1.0, value))
    return int((value + 1.0) * 20.0 + 0.5)


def phrase_value(text: str) -> float:
    """A phrase's value as the generator sees it: the judge's mean word value scaled to [-1, 1]."""
    total, hits = raw_score(text)
    return total / (MAX_VALUE * hits) if hits else 0.0


class _PhraseTable:
    """For each bin, the phrase forms that have a phrase near it, each with its candidates."""

    def __init__(self, forms: dict[str, Form]):
        valued = {name: [(p, phrase_value(p[0])) for p in ps] for name, ps in forms.items()}
        everything = [pv for name in forms for pv in valued[name]]
        self.bins: list[list[list[tuple[str, str]]]] = []
        self.exact: list[bool] = []  # whether some phrase is within TOLERANCE of the bin
        for b in range(N_BINS):
            center = -1.0 + b / 20.0
            groups = [
                [p for p, u in valued[name] if abs(u - center) <= TOLERANCE + 1e-9]
                for name in forms
            ]
            groups = [g for g in groups if g]
            self.exact.append(bool(groups))
            if not groups:  # out of this slot's range: the closest phrases stand in
                ranked = sorted(everything, key=lambda pu: (abs(pu[1] - center), pu[0]))
                groups = [[p for p, _ in ranked[:3]]]
            self.bins.append(groups)

    def pick(self, rng: random.Random, value: float, plural: bool = False) -> str:
        groups = self.bins[_bin(value)]
        group = groups[int(rng.random() * len(groups))]  # a phrase shape first, then a phrase
        sg, pl = group[int(rng.random() * len(group))]
        return pl if plural else sg


_TABLES: dict[str, _PhraseTable] = {}


def _table(kind: str) -> _PhraseTable:
    if kind not in _TABLES:
        _TABLES[kind] = _PhraseTable(_SLOT_FORMS[kind]())
    return _TABLES[kind]


# =========================================================================================
# Rendering

_ARTICLE_EXCEPTIONS = {"one": "a", "unique": "a", "user": "a", "hour": "an", "honest": "an"}


def _article(phrase: str) -> str:
    word = phrase.split(maxsplit=1)[0].lower()
    if word in _ARTICLE_EXCEPTIONS:
        return _ARTICLE_EXCEPTIONS[word]
    return "an" if word[0] in "aeiou" else "a"


def _pluralize(noun: str) -> str:
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


_FIELD = re.compile(r"\{(\^?)(\w+)\}")
_SENTIMENT_FIELD = re.compile(r"^(A_)?([A-Z]+?)(2?)$")


class _Template:
    """A sentence template parsed once: literal text and (field, capitalise) parts."""

    def __init__(self, text: str):
        self.text = text
        self.parts: list[str | tuple[str, bool]] = []
        pos = 0
        for m in _FIELD.finditer(text):
            if m.start() > pos:
                self.parts.append(text[pos:m.start()])
            self.parts.append((m.group(2), bool(m.group(1))))
            pos = m.end()
        if pos < len(text):
            self.parts.append(text[pos:])
        fields = [p[0] for p in self.parts if isinstance(p, tuple)]
        self.kinds = sorted({_SENTIMENT_FIELD.match(f).group(2) for f in fields if f[0].isupper()})
        self.sentiment = bool(self.kinds)
        # Whether the sentence names a part of the film (its number drives "is"/"are", verbs).
        self.uses_aspect = bool({"aspect", "be", "was", "it"} & set(fields))
        self.uses_aspect2 = bool({"aspect2", "be2", "was2"} & set(fields))

    def literal_words(self) -> list[str]:
        return tokenize(_FIELD.sub(" ", self.text))


def _compile(texts: list[str]) -> list[_Template]:
    return [_Template(t) for t in texts]


_OPEN_NEUTRAL, _OPEN_SENTIMENT = _compile(OPEN_NEUTRAL), _compile(OPEN_SENTIMENT)
_BODY_NEUTRAL, _BODY_ONE = _compile(BODY_NEUTRAL), _compile(BODY_ONE)
_BODY_TWO, _BODY_CONTRAST = _compile(BODY_TWO), _compile(BODY_CONTRAST)
_CLOSE, _RATING = _compile(CLOSE), _compile(RATING)


def _by_bin(templates: list[_Template]) -> list[list[_Template]]:
    """Per bin, the single-value templates all of whose slots can express that value."""
    out = []
    for b in range(N_BINS):
        fits = [t for t in templates if all(_table(k).exact[b] for k in t.kinds)]
        out.append(fits or templates)
    return out


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


_TITLE_SHAPES: list[Callable[[random.Random], str]] = [
    lambda r: f"The {r.choice(TITLE_ADJECTIVES)} {r.choice(TITLE_NOUNS)}",
    lambda r: f"{r.choice(TITLE_NOUNS)} of the {r.choice(TITLE_NOUNS)}",
    lambda r: f"The {r.choice(TITLE_NOUNS)}",
    lambda r: f"{r.choice(TITLE_ADJECTIVES)} {r.choice(TITLE_NOUNS)}",
    lambda r: f"Return to {r.choice(TITLE_PLACES)}",
    lambda r: f"The Last {r.choice(TITLE_NOUNS)}",
]


def make_title(rng: random.Random) -> str:
    """A film title from the word lists ("The Silent Harbor", "Return to Port Haven")."""
    return rng.choice(_TITLE_SHAPES)(rng)


class _Writer:
    """Fills templates for one review: the film's facts stay fixed across its sentences."""

    def __init__(self, rng: random.Random, sentiment: float):
        self.rng = rng
        self.sentiment = sentiment
        self.title = make_title(rng)
        self.genre = rng.choice(GENRES)
        # Four different people: with short name lists, independent draws often repeat a name
        # ("directed by David Hale and starring David Hale").
        people: list[str] = []
        while len(people) < 4:
            name = _name(rng)
            if name not in people:
                people.append(name)
        self.director, self.actor, self.actor2, self.writer = people
        self.role = rng.choice(ROLES)
        self.values = (0.0, 0.0)
        self.aspects: list[tuple[str, bool]] = []
        self.used: set[int] = set()  # ids of the templates this review already used

    def choose(self, templates: list[_Template]) -> _Template:
        """A random template, avoiding (within a few tries) ones this review already used."""
        for _ in range(4):
            template = self.rng.choice(templates)
            if id(template) not in self.used:
                break
        self.used.add(id(template))
        return template

    def sentence(self, template: _Template, v1: float, v2: float = 0.0) -> str:
        rng = self.rng
        self.values = (v1, v2)
        # Sentences without a named part of the film use a singular default ("the cast drags").
        first = rng.choice(ASPECTS) if template.uses_aspect else ("", False)
        self.aspects = [first]
        if template.uses_aspect2:
            second = rng.choice(ASPECTS)
            while second == first:
                second = rng.choice(ASPECTS)
            self.aspects.append(second)
        else:
            self.aspects.append(("", False))
        out = []
        for part in template.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            field, cap = part
            text = self._fill(field)
            out.append(text[0].upper() + text[1:] if cap else text)
        sentence = "".join(out)
        return sentence[0].upper() + sentence[1:]

    def _fill(self, field: str) -> str:
        if field[0].isupper():
            return self._sentiment(field)
        return _NEUTRAL_FIELDS[field](self)

    def _sentiment(self, field: str) -> str:
        article, kind, second = _SENTIMENT_FIELD.match(field).groups()
        index = 1 if second else 0
        plural = kind == "AVERB" and self.aspects[index][1]
        phrase = _table(kind).pick(self.rng, self.values[index], plural)
        if "{genre}" in phrase:
            phrase = phrase.replace("{genre}", self.genre)
        return f"{_article(phrase)} {phrase}" if article else phrase

    def other_role(self) -> str:
        """A role other than the review's own ("a widow, a ghost", not "a widow, a widow")."""
        role = self.rng.choice(ROLES)
        while role == self.role:
            role = self.rng.choice(ROLES)
        return role

    def aspect(self, index: int) -> tuple[str, bool]:
        return self.aspects[index]


_NEUTRAL_FIELDS: dict[str, Callable[[_Writer], str]] = {
    "title": lambda w: w.title,
    "genre": lambda w: w.genre,
    "a_genre": lambda w: f"{_article(w.genre)} {w.genre}",
    "genre_plural": lambda w: _pluralize(w.genre),
    "director": lambda w: w.director,
    "actor": lambda w: w.actor,
    "actor2": lambda w: w.actor2,
    "writer": lambda w: w.writer,
    "role": lambda w: w.role,
    "a_role": lambda w: f"{_article(w.role)} {w.role}",
    "a_role2": lambda w: (lambda r: f"{_article(r)} {r}")(w.other_role()),
    "place": lambda w: w.rng.choice(PLACES),
    "goal": lambda w: w.rng.choice(GOALS),
    "when": lambda w: w.rng.choice(WHEN),
    "year": lambda w: str(1960 + int(w.rng.random() * 65)),
    "minutes": lambda w: str(80 + int(w.rng.random() * 90)),
    "relative": lambda w: w.rng.choice(RELATIVES),
    "relation": lambda w: w.rng.choice(RELATIONS),
    "part": lambda w: w.rng.choice(PARTS),
    "source": lambda w: w.rng.choice(SOURCES),
    "object": lambda w: w.rng.choice(OBJECTS),
    "ordinal": lambda w: w.rng.choice(ORDINALS),
    "count_noun": lambda w: w.rng.choice(COUNT_NOUNS),
    "it_is": lambda w: w.rng.choice(IT_IS),
    # 1..10, from the latent sentiment: the judge cannot read digits, a model can.
    "rating": lambda w: str(min(10, max(1, int((w.sentiment + 1.0) * 4.5 + 1.5)))),
    "aspect": lambda w: w.aspect(0)[0],
    "aspect2": lambda w: w.aspect(1)[0],
    "be": lambda w: "are" if w.aspect(0)[1] else "is",
    "be2": lambda w: "are" if w.aspect(1)[1] else "is",
    "was": lambda w: "were" if w.aspect(0)[1] else "was",
    "was2": lambda w: "were" if w.aspect(1)[1] else "was",
    "it": lambda w: "they" if w.aspect(0)[1] else "it",
}


def _noise(rng: random.Random, sd: float) -> float:
    """Roughly normal noise (sum of three uniforms) using exact arithmetic only."""
    return (rng.random() + rng.random() + rng.random() - 1.5) * 2.0 * sd


def _clip(value: float) -> float:
    return min(1.0, max(-1.0, value))


VERDICT_NOISE = 0.1  # overall verdicts stay close to the latent sentiment
ASPECT_NOISE = 0.15  # single parts of the film wander further


class _Generator:
    def __init__(self):
        self.open_sentiment = _by_bin(_OPEN_SENTIMENT)
        self.body_one = _by_bin(_BODY_ONE)
        self.close = _by_bin(_CLOSE)

    def review(self, rng: random.Random) -> dict:
        s = round(rng.uniform(-1.0, 1.0), 4)
        w = _Writer(rng, s)
        n = rng.randint(2, 6)
        # Plan the sentence roles, then make sure at least two carry sentiment.
        plan = ["open_sentiment" if n == 2 or rng.random() < 0.5 else "open_neutral"]
        for _ in range(n - 2):
            r = rng.random()
            plan.append(
                "neutral" if r < 0.2 else "one" if r < 0.65 else "two" if r < 0.75 else "contrast"
            )
        plan.append("rating" if n >= 4 and rng.random() < 0.1 else "close")
        for i, role in enumerate(plan):
            if sum(p not in ("open_neutral", "neutral", "rating") for p in plan) >= 2:
                break
            if role in ("open_neutral", "neutral"):
                plan[i] = "open_sentiment" if i == 0 else "one"
        return {"text": " ".join(self._sentence(rng, w, s, role) for role in plan), "sentiment": s}

    def _sentence(self, rng: random.Random, w: _Writer, s: float, role: str) -> str:
        if role == "open_neutral":
            return w.sentence(w.choose(_OPEN_NEUTRAL), 0.0)
        if role == "neutral":
            return w.sentence(w.choose(_BODY_NEUTRAL), 0.0)
        if role == "rating":
            return w.sentence(w.choose(_RATING), 0.0)
        if role in ("open_sentiment", "close"):
            v = _clip(s + _noise(rng, VERDICT_NOISE))
            table = self.open_sentiment if role == "open_sentiment" else self.close
            return w.sentence(w.choose(table[_bin(v)]), v)
        if role == "one":
            v = _clip(s + _noise(rng, ASPECT_NOISE))
            return w.sentence(w.choose(self.body_one[_bin(v)]), v)
        if role == "two":
            v1, v2 = _clip(s + _noise(rng, ASPECT_NOISE)), _clip(s + _noise(rng, ASPECT_NOISE))
            return w.sentence(w.choose(_BODY_TWO), v1, v2)
        # contrast: one side better and one worse than the latent sentiment, in either order
        d = 0.4 + 0.5 * rng.random()
        v1, v2 = _clip(s + d), _clip(s - d)
        if rng.random() < 0.5:
            v1, v2 = v2, v1
        return w.sentence(w.choose(_BODY_CONTRAST), v1, v2)


_GENERATOR: _Generator | None = None


def generate_reviews(n: int, seed: int = 0) -> list[dict]:
    """``n`` reviews as ``{"text": str, "sentiment": float}`` rows, deterministic in ``(n, seed)``.

    ``sentiment`` is the latent value in [-1, 1] the review was written from.
    """
    global _GENERATOR
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if _GENERATOR is None:
        _GENERATOR = _Generator()
    rng = random.Random(seed)
    return [_GENERATOR.review(rng) for _ in range(n)]


def make_prompts(
    texts: list[str], min_words: int = 2, max_words: int = 6, seed: int = 0
) -> list[str]:
    """The first ``k`` words of each text, ``k`` uniform in [min_words, max_words] (PPO prompts).

    Like the IMDB experiment, the policy is asked to continue the opening of a real review.
    A text shorter than ``k`` words is returned whole (whitespace-normalised).
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = random.Random(seed)
    return [" ".join(text.split()[: rng.randint(min_words, max_words)]) for text in texts]


# =========================================================================================
# Import-time check that the neutral material really is neutral: a sentiment word, modifier
# or negator slipping into a title or a template would silently corrupt the labels.

def _check_vocabulary() -> None:
    words: list[str] = []
    lists = [
        TITLE_ADJECTIVES, TITLE_NOUNS, TITLE_PLACES, FIRST_NAMES, LAST_NAMES, GENRES, ROLES, GOALS,
        PLACES, WHEN, RELATIVES, RELATIONS, PARTS, SOURCES, OBJECTS, ORDINALS, IT_IS, COUNT_NOUNS,
        [a for a, _ in ASPECTS], ["The Last", "Return to", "of the", "Beyond the", "Night of the",
                                  "Under the", "After the", "and", "in"],
    ]
    for items in lists:
        for item in items:
            words += tokenize(item)
    templates = (
        OPEN_NEUTRAL, OPEN_SENTIMENT, BODY_NEUTRAL, BODY_ONE, BODY_TWO, BODY_CONTRAST, CLOSE, RATING
    )
    for group in templates:
        for template in _compile(group):
            words += template.literal_words()
    special = set(LEXICON) | set(MODIFIERS) | NEGATORS
    bad = sorted({t for t in words if t in special or t.endswith("n't")})
    if bad:
        raise ValueError(f"demo corpus: neutral text has sentiment/modifier/negator words: {bad}")


_check_vocabulary()
