"""Cross-validated evidence for the reranker: nDCG@10 of hybrid vs hybrid + rerank on a judged
collection, each query scored by a model that never saw it.

The queries are split into k folds (seeded shuffle); for each fold a model is trained on the
candidates of the other folds (plus any `extra` training data from other collections) and
installed in the running service, and the fold's queries are searched with rerank over gRPC.
The rerank stage latency is read from each response's `stages`.

    python -m llmo.retrieval.rerank.crossval --data DIR [--split train] [--folds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmo.retrieval.evaluation import ndcg_at_k
from llmo.retrieval.rerank import data as judged
from llmo.retrieval.rerank import harness
from llmo.retrieval.rerank.model import TrainingSet, fit


def ndcg_at(ranking: Sequence[str], relevant: dict[str, int], k: int = 10) -> float:
    """nDCG@k as `llmo retrieval evaluate` and BEIR compute it (`llmo.retrieval.evaluation`)."""
    return ndcg_at_k(ranking, relevant, k)


@dataclass
class FoldResult:
    fold: int
    queries: int
    hybrid_ndcg10: float
    rerank_ndcg10: float
    model_version: str


@dataclass
class CrossValResult:
    dataset: str
    split: str
    k: int
    seed: int
    candidates: int
    queries: int
    hybrid_ndcg10: float  # mean over all queries (each scored once, held out)
    rerank_ndcg10: float
    gain: float
    rerank_ms_p50: float
    rerank_ms_p99: float
    rerank_ms_mean: float
    folds: list[FoldResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def folds_of(query_ids: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """k disjoint folds covering every query, by a seeded shuffle of the sorted ids."""
    if not 2 <= k <= len(query_ids):
        raise ValueError(f"k must be in 2..{len(query_ids)} (the number of queries)")
    ordered = sorted(query_ids)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    return [sorted(part.tolist()) for part in np.array_split(np.array(shuffled, dtype=object), k)]


async def crossval_session(current: harness.Session, *, split: str, k: int = 5, seed: int = 0,
                           candidates: int = harness.DEFAULT_CANDIDATES,
                           extra: Sequence[TrainingSet] = ()) -> CrossValResult:
    """Cross-validation on a collection already ingested into a running harness session."""
    dataset = current.dataset
    qids = sorted(dataset.queries)
    recorded = {r.query_id: r for r in await current.record(qids, candidates)}
    plain = {r.query_id: r for r in await current.evaluate(qids, None, candidates)}
    folds, latencies = [], []
    hybrid_scores, rerank_scores = [], []
    for number, held_out in enumerate(folds_of(qids, k, seed)):
        held = set(held_out)
        train = harness.training_set([recorded[q] for q in qids if q not in held], dataset.name)
        model = fit(TrainingSet.concat([train, *extra]))
        reranked = await current.evaluate(held_out, model, candidates)
        hybrid = [ndcg_at(plain[q].ranking, dataset.qrels[q]) for q in held_out]
        rerank = [ndcg_at(r.ranking, dataset.qrels[r.query_id]) for r in reranked]
        latencies += [r.rerank_ms for r in reranked]
        hybrid_scores += hybrid
        rerank_scores += rerank
        folds.append(FoldResult(number, len(held_out), float(np.mean(hybrid)), float(np.mean(rerank)), model.version))
    hybrid_mean, rerank_mean = float(np.mean(hybrid_scores)), float(np.mean(rerank_scores))
    return CrossValResult(dataset.name, split, k, seed, candidates, len(qids), hybrid_mean, rerank_mean,
                          rerank_mean - hybrid_mean, float(np.percentile(latencies, 50)),
                          float(np.percentile(latencies, 99)), float(np.mean(latencies)), folds)


async def crossval(data: Path, split: str = "train", k: int = 5, *, seed: int = 0,
                   candidates: int = harness.DEFAULT_CANDIDATES, cache_dir: Path | None = None,
                   extra: Sequence[Path] = ()) -> CrossValResult:
    """Cross-validation of the reranker on the BEIR (or SMART) collection in `data`, judged by
    `qrels/<split>.tsv`. `extra` collections (all of their queries) are added to every fold's
    training data; they are other collections, so no evaluated query is ever trained on."""
    extra_sets = []
    for folder in extra:
        other = judged.load(folder, split)
        async with harness.session(other, cache_dir=cache_dir) as current:
            extra_sets.append(harness.training_set(await current.record(sorted(other.queries), candidates), other.name))
    dataset = judged.load(data, split)
    async with harness.session(dataset, cache_dir=cache_dir) as current:
        return await crossval_session(current, split=split, k=k, seed=seed, candidates=candidates, extra=extra_sets)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmo.retrieval.rerank.crossval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="BEIR (or SMART) collection folder")
    parser.add_argument("--split", default="train", help="qrels split (default train)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=harness.DEFAULT_CANDIDATES)
    parser.add_argument("--extra", type=Path, action="append", default=[],
                        help="another collection whose queries are added to every fold's training data")
    parser.add_argument("--cache", type=Path, default=None, help="folder memoising MiniLM vectors between runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(crossval(args.data, args.split, args.folds, seed=args.seed, candidates=args.candidates,
                                  cache_dir=args.cache, extra=args.extra))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"{result.dataset} ({result.split}, {result.queries} queries, {result.k} folds, {result.candidates} candidates)")
    for f in result.folds:
        print(f"  fold {f.fold}: {f.queries:4d} queries  hybrid {f.hybrid_ndcg10:.4f}  rerank {f.rerank_ndcg10:.4f}")
    print(f"  mean   nDCG@10 hybrid {result.hybrid_ndcg10:.4f}  rerank {result.rerank_ndcg10:.4f}  "
          f"gain {result.gain:+.4f}")
    print(f"  rerank stage ms  p50 {result.rerank_ms_p50:.1f}  p99 {result.rerank_ms_p99:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
