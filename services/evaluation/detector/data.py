"""The labelled claim/context data the detector is trained and cross-validated on.

Read from the reference data folder (`--data`, laid out as `../shared/data`):

- `evaluation/scifact-claims/claims_train.jsonl` with the abstracts of `retrieval/scifact/corpus.jsonl`:
  one example per (claim, abstract), the context is the abstract (split by `split_sentences`), the
  label SUPPORT / CONTRADICT / NEI, and the sentences at `evidence_sentences` carry that label (the
  others are NEI).
- `evaluation/climate-fever/climate-fever.jsonl`: one example per (claim, evidence sentence), the
  context is that sentence and the label its `evidence_label`.

Each example names its group (`scifact:<claim_id>` or `climate-fever:<claim_id>`): cross-validation
keeps a group in one fold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmo.evaluation.detector.features import DIRECTION_VERBS
from llmo.evaluation.detector.sentences import split_sentences

SUPPORTED, CONTRADICTED, NOT_ENOUGH_INFO = "SUPPORTED", "CONTRADICTED", "NOT_ENOUGH_INFO"
LABELS: tuple[str, ...] = (SUPPORTED, CONTRADICTED, NOT_ENOUGH_INFO)
# Spellings in the data sets (SciFact, Climate-FEVER, FEVER) of our three labels.
LABEL_ALIASES = {
    "SUPPORT": SUPPORTED, "SUPPORTS": SUPPORTED, "SUPPORTED": SUPPORTED,
    "CONTRADICT": CONTRADICTED, "CONTRADICTS": CONTRADICTED, "CONTRADICTED": CONTRADICTED,
    "REFUTES": CONTRADICTED, "REFUTED": CONTRADICTED,
    "NEI": NOT_ENOUGH_INFO, "NOT_ENOUGH_INFO": NOT_ENOUGH_INFO, "NOT ENOUGH INFO": NOT_ENOUGH_INFO,
}
SCIFACT_CLAIMS = Path("evaluation/scifact-claims/claims_train.jsonl")
SCIFACT_CORPUS = Path("retrieval/scifact/corpus.jsonl")
AUGMENTED_SUFFIX = "+negated"  # source of the rule-negated training copies
CLIMATE_FEVER = Path("evaluation/climate-fever/climate-fever.jsonl")


@dataclass(frozen=True)
class Example:
    """One claim against one context, with the context's label and one label per sentence."""

    source: str
    group: str
    claim: str
    sentences: tuple[str, ...]
    label: str
    sentence_labels: tuple[str, ...]


def label_of(value: Any) -> str:
    """Our label for a data set's spelling of it; ValueError for anything else."""
    label = LABEL_ALIASES.get(str(value).strip().upper()) if isinstance(value, str) else None
    if label is None:
        raise ValueError(f"label {value!r} is not one of SUPPORT, CONTRADICT, NEI")
    return label


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def load_corpus(path: Path) -> dict[str, str]:
    """BEIR corpus.jsonl: `_id` -> text (the title is left out: SciFact's evidence is in the abstract)."""
    return {str(row["_id"]): str(row.get("text") or "") for row in _jsonl(path)}


def scifact(data: Path) -> list[Example]:
    corpus = load_corpus(data / SCIFACT_CORPUS)
    examples = []
    for row in _jsonl(data / SCIFACT_CLAIMS):
        sentences = tuple(s.text for s in split_sentences(corpus[str(row["doc_id"])]))
        label = label_of(row["label"])
        evidence = set(row.get("evidence_sentences") or [])
        examples.append(Example(
            "scifact", f"scifact:{row['claim_id']}", str(row["claim"]), sentences, label,
            tuple(label if i in evidence else NOT_ENOUGH_INFO for i in range(len(sentences)))))
    return examples


def climate_fever(data: Path) -> list[Example]:
    examples = []
    for row in _jsonl(data / CLIMATE_FEVER):
        for evidence in row["evidences"]:
            label = label_of(evidence["evidence_label"])
            examples.append(Example("climate-fever", f"climate-fever:{row['claim_id']}", str(row["claim"]),
                                    (str(evidence["evidence"]),), label, (label,)))
    return examples


_AUXILIARY = re.compile(r"\b(is|are|was|were|can|could|does|do|did|has|have|had|will|would|may|might|should|must)\b(?! not\b)",
                        re.IGNORECASE)
_NOT = re.compile(r"\b(?:does|do|did) not (\w+)|\b(is|are|was|were|can|has|have|had|will|may|should|must) not\b|"
                  r"\bno longer\b|\bnot\b", re.IGNORECASE)
_VERB = re.compile(r"\b(\w{3,}?)(es|s)\b")


def negate(claim: str) -> str | None:
    """A contradiction of `claim` by rule, or None when no rule applies: a negated claim loses its
    negation ("does not cause" -> "causes"); otherwise "not" follows the first auxiliary ("is" ->
    "is not"), or the first verb ending in -s is negated ("reduces" -> "does not reduce")."""
    found = _NOT.search(claim)
    if found:
        if found.group(1):
            return claim[:found.start()] + found.group(1) + "s" + claim[found.end():]
        if found.group(2):
            return claim[:found.start()] + found.group(2) + claim[found.end():]
        return (claim[:found.start()] + claim[found.end():].lstrip()).strip() or None
    auxiliary = _AUXILIARY.search(claim)
    if auxiliary:
        return claim[:auxiliary.end()] + " not" + claim[auxiliary.end():]
    for verb in _VERB.finditer(claim):
        word = verb.group(0).lower()
        if word in DIRECTION_VERBS:
            stem = word[:-2] if word.endswith(("ches", "shes", "sses", "xes")) else word[:-1]
            return claim[:verb.start()] + "does not " + stem + claim[verb.end():]
    return None


def augmented(examples: list[Example]) -> list[Example]:
    """`examples` plus, for each SUPPORTED one, two CONTRADICTED copies where `negate` applies: the
    negated claim against the same context, and the claim against the context with its evidence
    sentences negated (an evidence sentence no rule negates becomes NOT_ENOUGH_INFO). Same group as
    the original, so cross-validation keeps them with their claim. For training only: scores are
    measured on the real examples."""
    extra = []
    for e in examples:
        if e.label != SUPPORTED:
            continue
        flipped = tuple(CONTRADICTED if lab == SUPPORTED else lab for lab in e.sentence_labels)
        negated = negate(e.claim)
        if negated:
            extra.append(Example(e.source + AUGMENTED_SUFFIX, e.group, negated, e.sentences, CONTRADICTED, flipped))
        evidence = [negate(s) if lab == SUPPORTED else None for s, lab in zip(e.sentences, e.sentence_labels, strict=True)]
        if any(evidence):
            sentences = tuple(n or s for s, n in zip(e.sentences, evidence, strict=True))
            labels = tuple(CONTRADICTED if n else (NOT_ENOUGH_INFO if lab == SUPPORTED else lab)
                           for lab, n in zip(e.sentence_labels, evidence, strict=True))
            extra.append(Example(e.source + AUGMENTED_SUFFIX, e.group, e.claim, sentences, CONTRADICTED, labels))
    return examples + extra


def load_all(data: Path) -> list[Example]:
    """SciFact then Climate-FEVER, in file order."""
    return scifact(data) + climate_fever(data)
