"""Train the reranker artifact on judged collections, with candidates from the service's own
hybrid first stage (`harness.py`: the service in-process, IngestDocuments and Search over gRPC).

    python -m llmo.retrieval.rerank.train --data DIR [--data DIR ...] --split train --out DIR

The same inputs give the same artifact, byte for byte (deterministic LightGBM, one thread, the
version derived from the model's bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from llmo.retrieval.rerank import data as judged
from llmo.retrieval.rerank import harness
from llmo.retrieval.rerank.model import LearnedReranker, TrainingSet, fit


async def training_data(folders: Sequence[Path], split: str, *, candidates: int = harness.DEFAULT_CANDIDATES,
                        cache_dir: Path | None = None) -> tuple[TrainingSet, list[dict[str, object]]]:
    parts, described = [], []
    for folder in folders:
        dataset = judged.load(folder, split)
        async with harness.session(dataset, cache_dir=cache_dir) as current:
            part = harness.training_set(await current.record(sorted(dataset.queries), candidates), dataset.name)
        parts.append(part)
        described.append({"name": dataset.name, "documents": len(dataset.corpus), "queries": len(dataset.queries),
                          "candidate_rows": int(part.labels.size), "relevant_rows": int((part.labels > 0).sum())})
    return TrainingSet.concat(parts), described


def train(folders: Sequence[Path], split: str, out: Path, *, candidates: int = harness.DEFAULT_CANDIDATES,
          cache_dir: Path | None = None, version: str | None = None) -> LearnedReranker:
    data, described = asyncio.run(training_data(folders, split, candidates=candidates, cache_dir=cache_dir))
    model = fit(data, version=version, summary={"collections": described, "split": split, "candidates": candidates,
                                                "first_stage": "hybrid RRF (service defaults), top_k = candidates"})
    model.save(out)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmo.retrieval.rerank.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, action="append", required=True, help="BEIR (or SMART) collection folder")
    parser.add_argument("--split", default="train", help="qrels split (default train)")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--candidates", type=int, default=harness.DEFAULT_CANDIDATES)
    parser.add_argument("--version", default=None, help="artifact version (default: derived from the model bytes)")
    parser.add_argument("--cache", type=Path, default=None, help="folder memoising MiniLM vectors between runs")
    args = parser.parse_args(argv)
    model = train(args.data, args.split, args.out, candidates=args.candidates, cache_dir=args.cache,
                  version=args.version)
    print(f"wrote {args.out} version {model.version} ({model.metadata['training']['rows']} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
