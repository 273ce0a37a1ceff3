"""LangChain's hybrid retriever, built the way LangChain documents it: `EnsembleRetriever` (weighted
reciprocal rank fusion, c = 60) over `BM25Retriever` (rank_bm25's BM25Okapi) and a FAISS vectorstore
retriever, on MiniLM vectors the bench computed (the same vectors as its own FAISS peer).

Runs in .peers/retrieval-langchain's python (scripts/peers_retrieval.sh), never in the project's venv.
argv: SPEC.json, holding "ids", "texts" (documents), "qids", "queries", "doc_vectors" and
"query_vectors" (paths of .npy float32 arrays, rows in the order of texts / queries), "k" (results kept
per query for the metrics), "fetch" (what each retriever returns before fusion for the metrics),
"latency_fetch" (the same while timed), "latency_queries" (how many of the queries are timed, top
"latency_k" kept) and "weights" ([bm25, dense]).
Prints one JSON line: versions, build_s, "samples" (seconds per timed `invoke`), "rankings" {qid: ids}
of the ensemble and "parts" {"bm25": ..., "faiss": ...} of each retriever alone.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from importlib.metadata import version
from typing import Any

warnings.filterwarnings("ignore")
WORD = re.compile(r"\w\w+")


def tokens(text: str) -> list[str]:
    """Lower-cased words of two or more characters (the default, str.split, keeps case and punctuation)."""
    return WORD.findall(text.lower())


def main(spec_path: str) -> dict[str, Any]:
    import numpy as np
    from langchain_classic.retrievers import EnsembleRetriever
    from langchain_community.retrievers import BM25Retriever
    from langchain_community.vectorstores import FAISS
    from langchain_core.embeddings import Embeddings

    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    ids, texts, qids, queries = spec["ids"], spec["texts"], spec["qids"], spec["queries"]
    doc_vectors = np.load(spec["doc_vectors"])
    query_vectors = dict(zip(queries, np.load(spec["query_vectors"]).tolist(), strict=True))

    class Precomputed(Embeddings):
        """The bench's MiniLM vectors: queries looked up by text; documents arrive with their vectors."""

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise RuntimeError("document vectors are handed to FAISS.from_embeddings")

        def embed_query(self, text: str) -> list[float]:
            return query_vectors[text]  # type: ignore[no-any-return]

    metadatas = [{"id": i} for i in ids]
    started = time.perf_counter()
    bm25 = BM25Retriever.from_texts(texts, metadatas=metadatas, preprocess_func=tokens, k=spec["latency_fetch"])
    store = FAISS.from_embeddings(list(zip(texts, doc_vectors.tolist(), strict=True)), Precomputed(),
                                  metadatas=metadatas)
    build_s = time.perf_counter() - started
    dense = store.as_retriever(search_kwargs={"k": spec["latency_fetch"]})
    ensemble = EnsembleRetriever(retrievers=[bm25, dense], weights=spec["weights"], id_key="id")

    def named(docs: list[Any], k: int) -> list[str]:
        return [d.metadata["id"] for d in docs][:k]

    timed = queries[: spec["latency_queries"]]
    for query in timed[:5]:
        named(ensemble.invoke(query), spec["latency_k"])
    samples = []
    for query in timed:
        started = time.perf_counter()
        named(ensemble.invoke(query), spec["latency_k"])
        samples.append(time.perf_counter() - started)
    bm25.k = spec["fetch"]
    dense.search_kwargs["k"] = spec["fetch"]
    k = spec["k"]
    rankings = {q: named(ensemble.invoke(t), k) for q, t in zip(qids, queries, strict=True)}
    parts = {"bm25": {q: named(bm25.invoke(t), k) for q, t in zip(qids, queries, strict=True)},
             "faiss": {q: named(dense.invoke(t), k) for q, t in zip(qids, queries, strict=True)}}
    return {"versions": {p: version(p) for p in ("langchain-classic", "langchain-community", "langchain-core",
                                                 "rank-bm25", "faiss-cpu")},
            "build_s": build_s, "samples": samples, "rankings": rankings, "parts": parts}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
