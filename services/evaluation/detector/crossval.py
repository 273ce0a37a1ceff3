"""Cross-validated scores of the detector on claims it was not trained on.

The examples of `data.load_all` (SciFact train claims against their abstracts, Climate-FEVER claims
against each evidence sentence) are split into k folds by claim (`scifact:<claim_id>`,
`climate-fever:<claim_id>`: no claim is in both a fold and its training data, and a claim's
rule-negated copies stay with it); for each fold a detector is fitted on the other folds exactly
as `train` fits the committed one, and judges the fold's real (not negated) examples. Scores per data set: binary (SUPPORTED vs not) P/R/F1, three-way macro-F1, AUROC of
P(SUPPORTED). Latency: the committed-style detector (trained on everything) judging SciFact pairs
end to end, embeddings included, one pair per call and in one batch.

    python -m llmo.evaluation.detector.crossval --data ../shared/data [--folds 5] [--cache-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmo.core.logging import configure_logging
from llmo.embedding import Embedder
from llmo.evaluation.detector.data import LABELS, SUPPORTED, augmented, load_all
from llmo.evaluation.detector.detector import Detector
from llmo.evaluation.detector.metrics import score
from llmo.evaluation.detector.train import SEED, featurize, fit_detector, grouped_folds

LATENCY_PAIRS = 100


def crossval(data: Path, folds: int = 5, cache_dir: Path | None = None) -> dict[str, Any]:
    examples = augmented(load_all(data))  # the negated copies train folds, never score them
    features = featurize(examples, Embedder(cache_dir=cache_dir))
    probabilities = np.zeros((len(examples), len(LABELS)))
    started = time.perf_counter()
    for held in grouped_folds([e.group for e in examples], folds, SEED):
        rest = np.setdiff1d(np.arange(len(examples)), held)
        model = fit_detector([examples[i] for i in rest], [features[i] for i in rest])
        for i in held:
            probabilities[i] = model.predict(features[i])[0]
    fit_s = time.perf_counter() - started
    predicted = [LABELS[int(j)] for j in probabilities.argmax(axis=1)]
    result: dict[str, Any] = {"folds": folds, "grouped_by": "claim", "seed": SEED, "fit_seconds": round(fit_s, 1)}
    for source in ("scifact", "climate-fever"):
        chosen = [i for i, e in enumerate(examples) if e.source == source]
        scores = score([examples[i].label for i in chosen], [predicted[i] for i in chosen],
                       [float(probabilities[i, LABELS.index(SUPPORTED)]) for i in chosen])
        result[source] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.as_dict().items()}
        result[source]["f1_per_label"] = {k: round(v, 4) for k, v in scores.f1_per_label.items()}
    result["latency"] = latency(examples, features)
    return result


def latency(examples: list[Any], features: list[np.ndarray]) -> dict[str, Any]:
    """Per pair, on SciFact (claim, abstract) pairs, with a fresh uncached embedder."""
    detector = Detector(fit_detector(examples, features), Embedder())
    scifact = [e for e in examples if e.source == "scifact"][:LATENCY_PAIRS]
    pairs = [(" ".join(e.sentences), e.claim) for e in scifact]
    detector.judge(*pairs[0])  # loads MiniLM
    started = time.perf_counter()
    for context, claim in pairs:
        detector.judge(context, claim)
    single = (time.perf_counter() - started) / len(pairs)
    started = time.perf_counter()
    detector.judge_many(pairs)
    batched = (time.perf_counter() - started) / len(pairs)
    return {"pairs": len(pairs), "mean_sentences": round(float(np.mean([len(e.sentences) for e in scifact])), 1),
            "ms_per_pair_single": round(single * 1000, 1), "ms_per_pair_batched": round(batched * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmo.evaluation.detector.crossval",
                                     description="Cross-validate the faithfulness detector (grouped by claim).")
    parser.add_argument("--data", type=Path, required=True, help="the reference data folder (../shared/data)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=None, help="MiniLM embedding cache (default: none)")
    parser.add_argument("--json", action="store_true", help="one JSON object (default: indented JSON)")
    args = parser.parse_args(argv)
    configure_logging("evaluation", level="warning")  # logs on stderr: stdout carries the result
    result = crossval(args.data, args.folds, args.cache_dir)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
