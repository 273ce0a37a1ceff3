"""Features of one (claim, sentence) pair for the sentence classifier.

`FEATURE_NAMES`: cosine of the two MiniLM embeddings, its gap to the best sentence of the
  same context, lexical overlap of stemmed content words (claim recall, sentence precision, bigram
  recall), numbers (claim numbers found / missing in the sentence), negation (counts and a parity
mismatch), direction words ("increases" / "reduces": a product that is -1 when claim and
sentence point opposite ways), antonym pairs across the two, and lengths.

The raw embedding blocks (u*v, |u-v| of the 384-d vectors, or the embedding of the concatenated
pair) were measured too and left out: with ~16k training pairs they overfit (cross-validated
SciFact binary F1 0.50 with them, 0.62 without; see the README).

Everything here is deterministic and needs only the texts and the embeddings.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)?")
_NUMBER = re.compile(r"^[0-9]+(?:[.,][0-9]+)?$")
STOP_WORDS = frozenset(
    "a an the of in on at to for from by with and or as is are was were be been being this that these those "
    "it its their there which who whom whose what when where how than then into onto over under via per "
    "has have had do does did can could may might will would shall should also such both each other".split()
)
NEGATIONS = frozenset(
    "not no never none nor neither without cannot cant nothing nobody lack lacks lacking absent absence fail "
    "fails failed unable n't".split()
)
UP_WORDS = frozenset(
    "increase increases increased increasing higher high greater more elevated elevate elevates enhance enhances "
    "enhanced promote promotes promoted activate activates activated induce induces induced improve improves "
    "improved raise raises raised rise rises gain gains upregulate upregulates upregulated upregulation "
    "stimulate stimulates stimulated accelerate accelerates accelerated exacerbate exacerbates worsen "
    "worsens amplify amplifies boost boosts faster longer larger stronger warming warmer positive".split()
)
DOWN_WORDS = frozenset(
    "decrease decreases decreased decreasing lower low less fewer reduce reduces reduced reducing reduction "
    "inhibit inhibits inhibited inhibition suppress suppresses suppressed impair impairs impaired prevent "
    "prevents prevented attenuate attenuates attenuated downregulate downregulates downregulated "
    "downregulation decline declines declined drop drops dropped diminish diminishes diminished loss lose "
    "loses block blocks blocked slow slows slowed slower shorter smaller weaker cooling cooler negative".split()
)
DIRECTION_VERBS = frozenset(w for w in UP_WORDS | DOWN_WORDS if w.endswith("s")) | frozenset(
    "causes affects increases reduces improves prevents predicts requires induces regulates protects "
    "correlates contributes leads results depends".split())
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("increase", "decrease"), ("higher", "lower"), ("more", "less"), ("more", "fewer"), ("high", "low"),
    ("positive", "negative"), ("benefit", "harm"), ("safe", "unsafe"), ("effective", "ineffective"),
    ("warm", "cool"), ("warming", "cooling"), ("rise", "fall"), ("gain", "loss"), ("activate", "inhibit"),
    ("promote", "suppress"), ("enhance", "impair"), ("up", "down"), ("above", "below"), ("before", "after"),
    ("major", "minor"), ("common", "rare"), ("present", "absent"), ("strong", "weak"), ("large", "small"),
    ("long", "short"), ("fast", "slow"), ("early", "late"), ("male", "female"), ("all", "some"),
    ("always", "sometimes"), ("protective", "harmful"), ("improve", "worsen"), ("human", "animal"),
    ("sufficient", "insufficient"), ("correlated", "uncorrelated"), ("dependent", "independent"),
)

FEATURE_NAMES: tuple[str, ...] = (
    "cosine", "cosine_gap_to_best", "cosine_rank",
    "claim_recall", "sentence_precision", "bigram_recall", "idf_free_jaccard",
    "claim_numbers", "claim_numbers_found", "claim_numbers_missing", "sentence_numbers_unmatched",
    "claim_negations", "sentence_negations", "negation_mismatch",
    "claim_direction", "sentence_direction", "direction_product", "antonym_pairs",
    "claim_words_log", "sentence_words_log", "negation_mismatch_x_recall", "direction_product_x_recall",
)


@lru_cache(maxsize=1)
def _stemmer() -> object:
    import Stemmer

    return Stemmer.Stemmer("english")


def words(text: str) -> list[str]:
    """Lower-cased words and numbers ("n't" kept as a word of its own)."""
    lowered = text.lower().replace("n't", " n't")
    found = _WORD.findall(lowered)
    if " n't" in lowered:
        found += ["n't"] * lowered.count(" n't")
    return found


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return str(_stemmer().stemWord(word))  # type: ignore[attr-defined]


class _Text:
    """The word-level views of one text that the cues compare."""

    __slots__ = ("antonym_keys", "bigrams", "content", "direction", "n_words", "negations", "numbers")

    def __init__(self, text: str) -> None:
        tokens = words(text)
        self.n_words = len(tokens)
        self.numbers = {t.replace(",", ".") for t in tokens if _NUMBER.match(t)}
        self.negations = sum(1 for t in tokens if t in NEGATIONS)
        self.direction = sum(1 for t in tokens if t in UP_WORDS) - sum(1 for t in tokens if t in DOWN_WORDS)
        stems = [_stem(t) for t in tokens if t not in STOP_WORDS and t not in NEGATIONS]
        self.content = set(stems)
        self.bigrams = set(itertools.pairwise(stems))
        self.antonym_keys = {_stem(t) for t in tokens}


_ANTONYM_STEMS: tuple[tuple[str, str], ...] = ()


def _antonym_stems() -> tuple[tuple[str, str], ...]:
    global _ANTONYM_STEMS
    if not _ANTONYM_STEMS:
        _ANTONYM_STEMS = tuple((_stem(a), _stem(b)) for a, b in ANTONYMS)
    return _ANTONYM_STEMS


def _sign(value: int) -> float:
    return float((value > 0) - (value < 0))


def cue_features(claim: str, sentences: Sequence[str], cosines: np.ndarray) -> np.ndarray:
    """The features of `claim` against each of one context's `sentences` given their embedding
    cosines: (len(sentences), len(FEATURE_NAMES))."""
    c = _Text(claim)
    best = float(cosines.max()) if len(cosines) else 0.0
    order = np.argsort(-cosines, kind="stable")
    ranks = np.empty(len(cosines), dtype=np.float64)
    ranks[order] = np.arange(len(cosines))
    rows = np.zeros((len(sentences), len(FEATURE_NAMES)), dtype=np.float64)
    pairs = _antonym_stems()
    for i, sentence in enumerate(sentences):
        s = _Text(sentence)
        shared = c.content & s.content
        recall = len(shared) / max(1, len(c.content))
        found = len(c.numbers & s.numbers)
        antonyms = sum(1 for a, b in pairs if (a in c.antonym_keys and b in s.antonym_keys)
                       or (b in c.antonym_keys and a in s.antonym_keys))
        rows[i] = (
            cosines[i], best - cosines[i], np.log1p(ranks[i]),
            recall, len(shared) / max(1, len(s.content)),
            len(c.bigrams & s.bigrams) / max(1, len(c.bigrams)),
            len(shared) / max(1, len(c.content | s.content)),
            float(len(c.numbers)), float(found), float(len(c.numbers) - found),
            float(len(s.numbers - c.numbers) > 0),
            float(c.negations), float(s.negations), float((c.negations % 2) != (s.negations % 2)),
            _sign(c.direction), _sign(s.direction), _sign(c.direction) * _sign(s.direction), float(antonyms),
            np.log1p(c.n_words), np.log1p(s.n_words),
            float((c.negations % 2) != (s.negations % 2)) * recall,
            _sign(c.direction) * _sign(s.direction) * recall,
        )
    return rows


def pair_features(claim_vector: np.ndarray, claim: str, sentence_vectors: np.ndarray,
                  sentences: Sequence[str]) -> np.ndarray:
    """The feature matrix of `claim` against one context's sentences (L2-normalised MiniLM vectors)."""
    if not sentences:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float64)
    cosines = sentence_vectors.astype(np.float64) @ claim_vector.astype(np.float64)
    return cue_features(claim, sentences, cosines)
