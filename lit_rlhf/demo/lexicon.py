"""The sentiment lexicon shared by the demo's review generator and its judge.

Every word that carries sentiment in a generated review comes from the tables below, and the
judge (:mod:`lit_rlhf.demo.judge`) scores text with exactly these tables, so the "gold" label
is a transparent function of the words: no hidden model.

Values are on a -3 (very negative) .. +3 (very positive) scale. Words are grouped by the
grammatical slot the generator uses them in; the judge only sees the merged :data:`LEXICON`,
so a word has one value wherever it appears.
"""

from __future__ import annotations

# --- adjectives --------------------------------------------------------------------------
# Gradable adjectives take intensifiers, downtoners and negation ("very dull", "not good").
GRADABLE_ADJECTIVES: dict[str, float] = {
    # positive
    "good": 1.5, "great": 2.0, "fine": 1.0, "solid": 1.5, "decent": 1.0, "nice": 1.0,
    "pleasant": 1.0, "enjoyable": 2.0, "entertaining": 2.0, "clever": 2.0, "gripping": 2.0,
    "moving": 2.0, "charming": 2.0, "beautiful": 2.0, "memorable": 2.0, "fresh": 1.5,
    "engaging": 2.0, "compelling": 2.0, "impressive": 2.0, "delightful": 2.0, "powerful": 2.0,
    "thoughtful": 1.5, "witty": 2.0, "elegant": 2.0, "lovely": 2.0, "inspired": 2.0,
    "captivating": 2.0, "riveting": 2.0, "touching": 2.0, "heartfelt": 2.0, "polished": 1.5,
    "confident": 1.5, "funny": 1.5, "smart": 1.5, "fun": 1.5, "satisfying": 1.5,
    "effective": 1.5, "convincing": 1.5, "likable": 1.5, "sharp": 1.5, "vivid": 1.5,
    "rich": 1.5, "original": 1.5, "inventive": 2.0, "assured": 1.5, "competent": 1.0,
    "adequate": 0.5, "passable": 0.5, "serviceable": 0.5,
    # negative
    "bad": -1.5, "poor": -1.5, "weak": -1.5, "dull": -2.0, "boring": -2.0, "clumsy": -1.5,
    "flat": -1.5, "tedious": -2.0, "predictable": -1.5, "forgettable": -1.5, "messy": -1.5,
    "bland": -1.5, "lazy": -2.0, "awkward": -1.5, "stiff": -1.5, "wooden": -2.0,
    "confusing": -1.5, "pointless": -2.0, "silly": -1.0, "shallow": -1.5, "sloppy": -2.0,
    "uninspired": -2.0, "overlong": -1.5, "cheap": -1.5, "hollow": -1.5, "stale": -1.5,
    "uneven": -1.0, "mediocre": -1.5, "tired": -1.0, "slow": -1.0, "clunky": -1.5,
    "lifeless": -2.0, "disappointing": -2.0, "muddled": -1.5, "formulaic": -1.5, "thin": -1.0,
    "lackluster": -1.5, "tiresome": -2.0, "annoying": -2.0, "frustrating": -2.0,
}
# Extreme adjectives are used bare ("superb", not "very superb"), but can be negated.
EXTREME_ADJECTIVES: dict[str, float] = {
    "superb": 3.0, "masterful": 3.0, "brilliant": 3.0, "outstanding": 3.0, "magnificent": 3.0,
    "flawless": 3.0, "breathtaking": 3.0, "exceptional": 3.0, "phenomenal": 3.0, "sublime": 3.0,
    "stunning": 2.5, "dazzling": 2.5, "spectacular": 2.5, "unforgettable": 2.5, "excellent": 2.5,
    "wonderful": 2.5, "fantastic": 2.5, "terrific": 2.5, "marvelous": 2.5, "remarkable": 2.5,
    "terrible": -3.0, "awful": -3.0, "dreadful": -3.0, "horrible": -3.0, "atrocious": -3.0,
    "abysmal": -3.0, "unbearable": -3.0, "unwatchable": -3.0, "insufferable": -3.0,
    "painful": -2.5, "dire": -2.5, "incoherent": -2.5, "laughable": -2.5, "embarrassing": -2.5,
}
# Adjectives that describe a performer ("charismatic as the detective"), all gradable.
PERFORMANCE_ADJECTIVES: dict[str, float] = {
    "charismatic": 2.0, "magnetic": 2.5, "luminous": 2.5, "believable": 1.5, "committed": 1.5,
    "miscast": -2.0, "unconvincing": -1.5, "hammy": -1.5, "forced": -1.5, "vacant": -2.0,
}

# --- nouns, verbs, adverbs ---------------------------------------------------------------
# Verdict nouns: "it is a masterpiece", "a total mess".
NOUNS: dict[str, float] = {
    "masterpiece": 3.0, "triumph": 3.0, "gem": 2.5, "delight": 2.5, "treat": 2.0, "joy": 2.5,
    "marvel": 2.5, "winner": 2.0, "classic": 2.5, "pleasure": 2.0,
    "disaster": -3.0, "mess": -2.5, "failure": -2.5, "bore": -2.0, "letdown": -2.0,
    "disappointment": -2.0, "slog": -2.0, "chore": -2.0, "misfire": -2.0, "dud": -2.5,
    "trainwreck": -3.0, "waste": -2.5,
}
# Verbs of the viewer's reaction, past tense: "I loved the score".
VIEWER_VERBS: dict[str, float] = {
    "loved": 2.5, "adored": 3.0, "enjoyed": 2.0, "liked": 1.5, "admired": 1.5,
    "appreciated": 1.0, "cherished": 2.5, "savored": 2.0,
    "hated": -3.0, "disliked": -1.5, "loathed": -3.0, "detested": -3.0, "resented": -2.0,
}
# Verbs whose subject is a part of the film, as (singular, plural) forms: "the pacing drags".
ASPECT_VERBS: list[tuple[str, str, float]] = [
    ("shines", "shine", 2.0), ("soars", "soar", 2.5), ("sparkles", "sparkle", 2.0),
    ("dazzles", "dazzle", 2.5), ("excels", "excel", 2.5), ("impresses", "impress", 2.0),
    ("delights", "delight", 2.5), ("succeeds", "succeed", 1.5), ("sings", "sing", 2.0),
    ("drags", "drag", -2.0), ("stumbles", "stumble", -1.5), ("fails", "fail", -2.0),
    ("falters", "falter", -1.5), ("sags", "sag", -1.5), ("disappoints", "disappoint", -2.0),
    ("flounders", "flounder", -2.0), ("misfires", "misfire", -2.0),
    ("collapses", "collapse", -2.5), ("grates", "grate", -2.0),
]
# Manner adverbs: "plays the pilot beautifully", "poorly written".
ADVERBS: dict[str, float] = {
    "beautifully": 2.5, "brilliantly": 3.0, "wonderfully": 2.5, "expertly": 2.5,
    "skillfully": 2.0, "elegantly": 2.0, "superbly": 3.0, "convincingly": 1.5,
    "gracefully": 2.0, "sensitively": 1.5,
    "poorly": -2.0, "badly": -2.0, "clumsily": -1.5, "lazily": -2.0, "sloppily": -2.0,
    "awkwardly": -1.5, "woodenly": -2.0, "unconvincingly": -1.5, "carelessly": -2.0,
    "blandly": -1.5,
}
# How the viewer felt: "I left the theater thrilled".
FEELINGS: dict[str, float] = {
    "thrilled": 2.5, "delighted": 2.5, "moved": 2.0, "impressed": 2.0, "satisfied": 1.5,
    "charmed": 2.0, "entertained": 1.5, "captivated": 2.5, "enchanted": 2.5, "amused": 1.5,
    "bored": -2.0, "disappointed": -2.0, "annoyed": -2.0, "frustrated": -2.0,
    "underwhelmed": -1.5, "irritated": -2.0, "baffled": -1.0, "exhausted": -1.5,
    "cheated": -2.5, "insulted": -2.5,
}
# Recommendation verbs: "I would recommend it", "skip it".
RECOMMEND_VERBS: dict[str, float] = {"recommend": 2.0, "avoid": -2.0, "skip": -2.0, "worth": 1.5}

# --- modifiers ---------------------------------------------------------------------------
# Multiply the value of the sentiment word right after them ("very good" = 1.5 * good).
INTENSIFIERS: dict[str, float] = {
    "very": 1.5, "really": 1.4, "extremely": 1.8, "incredibly": 1.8, "truly": 1.5,
    "remarkably": 1.6, "genuinely": 1.4, "thoroughly": 1.6, "deeply": 1.5, "utterly": 1.8,
    "absolutely": 1.8, "so": 1.4, "quite": 1.2, "completely": 1.7, "totally": 1.7,
    "highly": 1.5, "strongly": 1.5, "definitely": 1.4, "well": 1.3,
    "real": 1.4, "total": 1.6, "absolute": 1.7, "complete": 1.6,
}
# ... or dampen it ("somewhat dull" = 0.5 * dull).
DOWNTONERS: dict[str, float] = {
    "somewhat": 0.5, "slightly": 0.4, "fairly": 0.6, "mildly": 0.5, "moderately": 0.6,
    "rather": 0.7, "bit": 0.5, "occasionally": 0.5, "sometimes": 0.6, "probably": 0.7,
    "minor": 0.6, "mostly": 0.8,
}
MODIFIERS: dict[str, float] = {**INTENSIFIERS, **DOWNTONERS}
# Flip (and halve) the next sentiment word within a few tokens ("not good", "never dull").
# Any token ending in "n't" ("isn't", "didn't") is a negator too.
NEGATORS: frozenset[str] = frozenset({"not", "never", "no", "hardly", "rarely", "cannot"})


def _merge() -> dict[str, float]:
    """All sentiment words in one table; a word listed twice must have one value."""
    merged: dict[str, float] = {}
    tables: list[dict[str, float]] = [
        GRADABLE_ADJECTIVES, EXTREME_ADJECTIVES, PERFORMANCE_ADJECTIVES, NOUNS, VIEWER_VERBS,
        {sg: v for sg, _, v in ASPECT_VERBS}, {pl: v for _, pl, v in ASPECT_VERBS},
        ADVERBS, FEELINGS, RECOMMEND_VERBS,
    ]
    for table in tables:
        for word, value in table.items():
            if merged.get(word, value) != value:
                raise ValueError(f"lexicon: {word!r} has two values ({merged[word]}, {value})")
            merged[word] = value
    overlap = set(merged) & (set(MODIFIERS) | NEGATORS)
    if overlap:
        raise ValueError(f"lexicon: words both sentiment and modifier/negator: {sorted(overlap)}")
    return merged


LEXICON: dict[str, float] = _merge()
MAX_VALUE = 3.0  # the largest |value| of a bare word: scores are normalised by it
