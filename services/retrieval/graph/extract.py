"""The local entity and relation extractor of knowledge-graph mode: deterministic, no network, no model.

(No spaCy model installs from the package index here, so this is a small rule-based extractor.)
The rules, exactly:

**Tokens and sentences.** Tokens are dotted acronyms (``U.S.``) or word runs with inner ``-``,
``'``, ``’`` or ``&`` (``O'Brien``, ``AT&T``, ``Jean-Luc``) and an optional trailing apostrophe.
Sentences end at ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter, a digit, a
quote or a bracket, unless the word before the stop is an abbreviation (``Dr``, ``Inc``, ``e.g``,
a single capital letter...); they also end at blank lines and before lines that open a Markdown
block (``#``, ``-``, ``*``, ``+``, ``1.``, ``>``, ``|``) and after a heading line (``#``). A single
newline is a space.

**Entities.** Three kinds, never overlapping:

1. *Proper-noun phrases*: maximal runs of capitalised tokens separated by whitespace only (or by
   ``. `` after a single-letter initial, or by `` & ``), joined across a lower-case connector
   (``of``, ``de``, ``van``, ``von``, ``der``, ``den``, ``du``, ``da``, ``del``, ``di``, ``la``,
   ``le``) that has a capitalised token on both sides. Stop words (also capitalised: ``The``,
   ``And``, ``However``...), titles (``Mr``, ``Dr``...), months and weekdays never belong to a run;
   a possessive (``Acme's``) ends a run; runs longer than 8 tokens are dropped (title-case lines).
   A one-token run that opens a sentence
   is kept only when it is an acronym, or when the same key occurs capitalised at least twice in
   the text and never as a lower-case word (``Researchers`` at a sentence start is not an entity).
2. *Acronyms*: ``[A-Z][A-Z0-9&]{1,9}`` with at least two letters, or dotted (``U.S.``), anywhere.
3. *Multiword noun phrases*: inside runs of lower-case content words (letters only, at least three,
   not stop words, not verb-like, not ``-ly`` adverbs) separated by whitespace, the sequences of 2-4
   words that occur at least twice in the text (``knowledge graph``), longest first from the left.

An entity's *key* is its text case-folded, curly apostrophes made straight, a possessive ``'s`` /
trailing ``'`` stripped, the dots of acronyms removed and spaces collapsed. Its *display name* is
the most frequent surface form of the key in the text (possessive stripped), the earliest on a tie.

**Relations.** For every pair of mentions of two different entities in one sentence (the first 12
mentions of the sentence), the earlier is the subject and the later the object. The predicate is
the verb phrase of the gap just before the object (between the object and the mention before it),
when that gap holds a verb-like token and no other gap between subject and object does; else
``related_to``. A token is verb-like when it is lower-case and an auxiliary (``is``, ``has``,
``will``...), a listed irregular verb (``made``, ``leads``, ``wrote``...), ends in ``ed`` (4+
letters, a few words excepted), or - first in a gap after a non-possessive subject - ends in a
single ``s`` (``employs``). The verb phrase is the gap's tokens from the first verb-like one on,
lower-cased, determiners dropped (``is the capital of`` -> ``is capital of``); past 5 tokens, only
the verb group (the verb and the verb-like, ``-ing``, ``-en`` or ``-ly`` tokens right after it)
plus the gap's last token when it is a preposition.

**Chunks.** A chunk holds the mentions lying wholly inside its span and the relations whose two
mentions both lie inside it (a relation is never attributed to a chunk that does not state it).
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmo.retrieval.storage import ChunkGraph

RELATED_TO = "related_to"
MAX_RUN_TOKENS = 8
MAX_SENTENCE_MENTIONS = 12
MAX_PHRASE_TOKENS = 5
MAX_NAME_CHARS = 200
MAX_PREDICATE_CHARS = 128
MAX_CHUNK_ENTITIES = 256
MAX_CHUNK_RELATIONS = 512

_TOKEN = re.compile(r"(?:[A-Z]\.){2,}|\w+(?:[-'’&]\w+)*['’]?")
_ACRONYM = re.compile(r"^(?:[A-Z][A-Z0-9&]{1,9}|(?:[A-Z]\.){2,})$")
_SENTENCE_END = re.compile(r"[.!?]+['\"”’)\]]*\s+(?=[A-Z0-9\"“'‘(\[])")
_BLOCK_BREAK = re.compile(r"\n[ \t]*\n|\n(?=[ \t]*(?:#|[-*+][ \t]|\d+[.)][ \t]|>|\|))")
_HEADING = re.compile(r"(?m)^[ \t]*#[^\n]*")

STOP_WORDS = frozenset("""
a about above according across after afterwards again against all almost alone along already also although
always am among an and another any anyone anything anyway anywhere are around as at back be became because
become becomes been before beforehand behind being below beside besides between beyond both but by can cannot
could did do does doing done down due during each either else elsewhere enough especially even ever every
everyone everything everywhere except few finally first for former formerly from further furthermore had has
have having he hence her here hers herself him himself his how however i if in indeed instead into is it its
itself just last later latter least less let like many may maybe me meanwhile might mine more moreover most
mostly much must my myself namely neither never nevertheless next no nobody none nor not nothing now nowhere
of off often on once one only onto or other others otherwise our ours ourselves out over overall own per
perhaps please rather really regarding same second several she should since so some someone something
sometimes somewhere still such than that the their theirs them themselves then there thereafter thereby
therefore these they third this those though through throughout thus to today together tomorrow too toward
towards under unless until up upon us very via was we well were what whatever when whence whenever where
whereas wherever whether which while who whoever whole whom whose why will with within without would yes
yesterday yet you your yours yourself yourselves
""".split())
TITLES = frozenset("mr mrs ms dr prof sir st mt jr sr".split())
CALENDAR = frozenset("""january february march april june july august september october november december
monday tuesday wednesday thursday friday saturday sunday""".split())
CONNECTORS = frozenset("of de van von der den du da del di la le".split())
ABBREVIATIONS = frozenset("mr mrs ms dr prof sir st mt jr sr inc ltd co corp vs etc eg ie e.g i.e no fig al approx "
                          "dept est jan feb mar apr jun jul aug sep sept oct nov dec".split())
DETERMINERS = frozenset("a an the this that these those".split())
PREPOSITIONS = frozenset("of in on at by for with from to into onto over under about as".split())
AUXILIARIES = frozenset("is are was were be been being am has have had do does did will would can could shall "
                        "should may might must".split())
IRREGULAR_VERBS = frozenset("""
made makes make built builds build led leads lead wrote writes write won wins win became becomes bought buys buy
sold sells sell took takes take gave gives give met meets meet ran runs run owns own knew knows know found finds
began begins begin grew grows grow held holds hold left leaves leave brought brings bring taught teaches teach
told tells tell paid pays pay sent sends send spent spends spend kept keeps keep fought fights fight beat beats
got gets get went goes go saw sees see said says say thought thinks think
""".split())
_NOT_VERBS = frozenset("need seed feed speed indeed bed red breed greed hundred kindred naked sacred wicked "
                       "shed bred".split())


@dataclass(frozen=True)
class Mention:
    key: str
    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Triple:
    subject: str
    predicate: str
    object: str
    start: int  # the subject mention's start
    end: int  # the object mention's end


@dataclass
class Extraction:
    """Entities (key -> display name), their mentions in text order, and the relations found."""

    entities: dict[str, str] = field(default_factory=dict)
    mentions: list[Mention] = field(default_factory=list)
    relations: list[Triple] = field(default_factory=list)


@dataclass(frozen=True)
class _Tok:
    text: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.text.lower().replace("’", "'")

    @property
    def bare(self) -> str:
        """Lower-cased, possessive stripped."""
        return _strip_possessive(self.lower)

    @property
    def capitalised(self) -> bool:
        return self.text[0].isupper()


def _strip_possessive(text: str) -> str:
    text = text.replace("’", "'")
    if text.endswith("'s"):
        return text[:-2]
    return text.rstrip("'")


def normalise(name: str) -> str:
    """The key of an entity name (see the module docstring)."""
    words = [_strip_possessive(w) for w in name.replace("’", "'").split()]
    words = [w.replace(".", "") if _ACRONYM.match(w.upper()) and "." in w else w for w in words]
    text = " ".join(w for w in words if w).casefold()
    if text.startswith("the "):
        text = text[4:]
    return text.strip()


def _display(text: str) -> str:
    return _strip_possessive(" ".join(text.split()))


def _is_acronym(token: _Tok) -> bool:
    return bool(_ACRONYM.match(_strip_possessive(token.text))) and sum(c.isalpha() for c in token.text) >= 2 \
        and token.bare not in STOP_WORDS


def _excluded(token: _Tok) -> bool:
    bare = token.bare
    return bare in STOP_WORDS or bare in TITLES or bare in CALENDAR or not token.text[0].isalpha()


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`, in order (see the module docstring)."""
    cuts = {0, len(text)}
    for match in _BLOCK_BREAK.finditer(text):
        cuts.add(match.start())
    for match in _HEADING.finditer(text):
        cuts.add(match.end())
    for match in _SENTENCE_END.finditer(text):
        before = text[max(0, match.start() - 24):match.start()].rsplit(None, 1)
        word = re.sub(r"^\W+", "", before[-1].lower()) if before else ""
        if word in ABBREVIATIONS or "." in word or (len(word) == 1 and word.isalpha()):
            continue
        cuts.add(match.start() + len(match.group().rstrip()))
    bounds = sorted(cuts)
    out = []
    for start, end in itertools.pairwise(bounds):
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            out.append((start + lead, start + lead + len(stripped)))
    return out


def _tokens(text: str, start: int, end: int) -> list[_Tok]:
    return [_Tok(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text, start, end)]


def _verb_like(token: _Tok, *, first_after_subject: bool) -> bool:
    word = token.lower
    if not token.text.islower() or not word.isalpha():
        return False
    if word in AUXILIARIES or word in IRREGULAR_VERBS:
        return True
    if len(word) >= 4 and word.endswith("ed") and word not in _NOT_VERBS:
        return True
    return first_after_subject and len(word) >= 3 and word.endswith("s") and word not in STOP_WORDS and \
        not word.endswith(("ss", "us", "is", "ous", "ics", "'s"))


def _content_word(token: _Tok) -> bool:
    word = token.text
    return word.isalpha() and word.islower() and len(word) >= 3 and word not in STOP_WORDS and \
        not word.endswith("ly") and not _verb_like(token, first_after_subject=False)


@dataclass
class _Run:
    tokens: list[_Tok]
    sentence_initial: bool


def _joinable(text: str, left: _Tok, right: _Tok) -> bool:
    gap = text[left.end:right.start]
    if gap.strip() == "":
        return "\n\n" not in gap
    if gap.strip() == "&":
        return True
    return gap.strip() == "." and len(left.text) == 1 and left.text.isupper()


def _capital_runs(text: str, tokens: list[_Tok]) -> list[_Run]:
    """Maximal runs of capitalised tokens (with connectors) of one sentence."""
    runs: list[_Run] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.capitalised or _excluded(token):
            i += 1
            continue
        run = [token]
        j = i + 1
        while j < len(tokens) and run[-1].bare == run[-1].lower:  # a possessive ends the run
            nxt = tokens[j]
            if nxt.capitalised and not _excluded(nxt) and _joinable(text, run[-1], nxt):
                run.append(nxt)
                j += 1
                continue
            if nxt.text in CONNECTORS and j + 1 < len(tokens) and _joinable(text, run[-1], nxt):
                after = tokens[j + 1]
                if after.capitalised and not _excluded(after) and _joinable(text, nxt, after):
                    run += [nxt, after]
                    j += 2
                    continue
            break
        runs.append(_Run(run, sentence_initial=i == 0))
        i = j
    return runs


def _content_runs(text: str, tokens: list[_Tok]) -> list[list[_Tok]]:
    """Maximal runs of at least two lower-case content words of one sentence."""
    runs: list[list[_Tok]] = []
    current: list[_Tok] = []
    for token in tokens:
        if _content_word(token) and current and text[current[-1].end:token.start].isspace():
            current.append(token)
            continue
        if len(current) >= 2:
            runs.append(current)
        current = [token] if _content_word(token) else []
    if len(current) >= 2:
        runs.append(current)
    return runs


def _ngrams(run: list[_Tok]) -> list[str]:
    words = [t.text for t in run]
    return [" ".join(words[i:i + n]) for n in range(2, 5) for i in range(len(words) - n + 1)]


def _phrases(run: list[_Tok], counts: Counter[str]) -> list[list[_Tok]]:
    """The repeated 2-4 word sequences of a content run, longest first from the left."""
    out, i = [], 0
    while i < len(run) - 1:
        for n in range(min(4, len(run) - i), 1, -1):
            if counts[" ".join(t.text for t in run[i:i + n])] >= 2:
                out.append(run[i:i + n])
                i += n
                break
        else:
            i += 1
    return out


def extract(text: str) -> Extraction:
    """Entities, mentions and relations of `text` (blocking, linear in its length)."""
    spans = sentences(text)
    per_sentence = [_tokens(text, start, end) for start, end in spans]
    lower_words = {t.lower for tokens in per_sentence for t in tokens if t.text.islower()}
    runs = [_capital_runs(text, tokens) for tokens in per_sentence]
    capital_counts = Counter(normalise(text[r.tokens[0].start:r.tokens[-1].end]) for rs in runs for r in rs)
    content = [_content_runs(text, tokens) for tokens in per_sentence]
    phrase_counts = Counter(gram for runs_ in content for run in runs_ for gram in _ngrams(run))
    phrases = [[p for run in runs_ for p in _phrases(run, phrase_counts)] for runs_ in content]

    out = Extraction()
    surfaces: dict[str, Counter[str]] = {}
    first_seen: dict[str, dict[str, int]] = {}
    sentence_mentions: list[list[tuple[Mention, bool]]] = []
    for sentence_runs, sentence_phrases in zip(runs, phrases, strict=True):
        found: list[tuple[Mention, bool]] = []  # (mention, possessive)
        for run in sentence_runs:
            if len(run.tokens) > MAX_RUN_TOKENS:
                continue
            surface = text[run.tokens[0].start:run.tokens[-1].end]
            key = normalise(surface)
            if run.sentence_initial and len(run.tokens) == 1 and not _is_acronym(run.tokens[0]):
                if capital_counts[key] < 2 or key in lower_words:
                    continue
            found.append((Mention(key, _display(surface), run.tokens[0].start, run.tokens[-1].end),
                          run.tokens[-1].bare != run.tokens[-1].lower))
        for phrase in sentence_phrases:
            surface = " ".join(t.text for t in phrase)
            found.append((Mention(normalise(surface), surface, phrase[0].start, phrase[-1].end), False))
        found = [(m, p) for m, p in found if m.key and max(len(m.name), len(m.key)) <= MAX_NAME_CHARS]
        found.sort(key=lambda item: item[0].start)
        for mention, _ in found:
            surfaces.setdefault(mention.key, Counter())[mention.name] += 1
            first_seen.setdefault(mention.key, {}).setdefault(mention.name, mention.start)
        sentence_mentions.append(found)

    for key, counts in surfaces.items():
        out.entities[key] = min(counts, key=lambda name: (-counts[name], first_seen[key][name]))
    for found, tokens in zip(sentence_mentions, per_sentence, strict=True):
        mentions = [Mention(m.key, out.entities[m.key], m.start, m.end) for m, _ in found]
        out.mentions += mentions
        out.relations += _relations(found[:MAX_SENTENCE_MENTIONS], tokens)
    return out


def _gap_tokens(tokens: list[_Tok], start: int, end: int) -> list[_Tok]:
    return [t for t in tokens if t.start >= start and t.end <= end]


def _verb_phrase(gap: list[_Tok], possessive_subject: bool) -> str | None:
    first = next((i for i, t in enumerate(gap) if _verb_like(t, first_after_subject=i == 0 and not possessive_subject)),
                 None)
    if first is None:
        return None
    words = [t.lower for t in gap[first:] if t.lower not in DETERMINERS]
    if len(words) > MAX_PHRASE_TOKENS:
        group = [gap[first].lower]
        for t in gap[first + 1:]:
            if _verb_like(t, first_after_subject=False) or t.lower.endswith(("ing", "en", "ly")):
                group.append(t.lower)
            else:
                break
        if gap[-1].lower in PREPOSITIONS and len(gap) - 1 > first + len(group) - 1:
            group.append(gap[-1].lower)
        words = group
    return " ".join(words)[:MAX_PREDICATE_CHARS]


def _relations(found: Sequence[tuple[Mention, bool]], tokens: list[_Tok]) -> list[Triple]:
    if len(found) < 2:
        return []
    # the verb phrase of the gap before each mention (from the previous mention's end), if any
    gaps: list[str | None] = [None]
    for (before, possessive), (mention, _) in itertools.pairwise(found):
        gaps.append(_verb_phrase(_gap_tokens(tokens, before.end, mention.start), possessive))
    out = []
    for i, (subject, _) in enumerate(found):
        for j in range(i + 1, len(found)):
            obj = found[j][0]
            if obj.key == subject.key:
                continue
            phrase = gaps[j]
            if phrase is not None and any(gaps[g] is not None for g in range(i + 1, j)):
                phrase = None
            out.append(Triple(subject.key, phrase or RELATED_TO, obj.key, subject.start, obj.end))
    return out


def chunk_graphs(text: str, spans: Sequence[tuple[int, int]]) -> list[ChunkGraph]:
    """The graph of each chunk `text[start:end]` of one document, extracted over the whole text (so
    repetition and display names are decided per document), in the order of `spans`."""
    found = extract(text)
    mention_starts = [m.start for m in found.mentions]
    relation_starts = [r.start for r in found.relations]
    out = []
    for start, end in spans:
        entities: dict[str, str] = {}
        for m in found.mentions[bisect.bisect_left(mention_starts, start):bisect.bisect_left(mention_starts, end)]:
            if m.end <= end and len(entities) < MAX_CHUNK_ENTITIES:
                entities.setdefault(m.key, m.name)
        relations: dict[tuple[str, str, str], None] = {}
        for r in found.relations[bisect.bisect_left(relation_starts, start):bisect.bisect_left(relation_starts, end)]:
            if r.end <= end and r.subject in entities and r.object in entities and len(relations) < MAX_CHUNK_RELATIONS:
                relations.setdefault((r.subject, r.predicate, r.object), None)
        out.append(ChunkGraph(entities=entities, relations=list(relations)))
    return out
