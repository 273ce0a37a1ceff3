"""The BM25 (bm25s) and dense (FAISS) indexes of a collection, derived from the store of record.

An index is built from every chunk of a collection at one `generation` of it (see
llmo.retrieval.storage), persisted under `<index_dir>/<collection pk>/`, and used while the
database's generation is unchanged. A missing, unreadable or stale index is rebuilt from the
database: the vectors are stored with the chunks, so a rebuild never re-embeds. Building is
blocking work and runs off the event loop; one build per collection at a time.

Access control and metadata filters are applied *inside* each index, before top-k: BM25 scores
are computed for the allowed chunks only and FAISS searches with an id selector of the allowed
positions, so a chunk the caller may not read never takes a place in a candidate list.

Sparse scoring, pinned: bm25s, Lucene BM25 variant, k1 and b from the settings (1.2 / 0.75),
tokens = lower-cased `\\w\\w+` runs, English stop words removed, Snowball English stemmer
(PyStemmer). Dense: MiniLM-L6-v2 vectors, L2-normalised, exact inner product (IndexFlatIP).
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmo.core.logging import get_logger
from llmo.embedding import EMBEDDING_DIM
from llmo.retrieval.storage import IndexedChunk, RetrievalStore

log = get_logger(__name__)

BM25_METHOD = "lucene"
STOPWORDS = "en"
STEMMER_LANGUAGE = "english"
_FORMAT = 1  # bump when the on-disk layout changes: older folders are rebuilt


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer(STEMMER_LANGUAGE)


def bm25_tokens(texts: list[str]) -> Any:
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords=STOPWORDS, stemmer=_stemmer(), show_progress=False)


def query_terms(query: str) -> list[str]:
    import bm25s

    (terms,) = bm25s.tokenize([query], lower=True, stopwords=STOPWORDS, stemmer=_stemmer(), return_ids=False,
                              show_progress=False)
    return [t for t in terms if t]


@dataclass(frozen=True)
class Hit:
    position: int
    score: float


class CollectionIndex:
    """Both indexes of one collection at one generation, plus what access control and filters need."""

    def __init__(self, generation: int, ids: np.ndarray, doc_of: np.ndarray, docs: list[tuple[str, list[str], dict[str, Any]]],
                 bm25: Any, dense: Any) -> None:
        self.generation = generation
        self.ids = ids  # position -> chunk id
        self.doc_of = doc_of  # position -> index into docs
        self.docs = docs  # (document id, access list, metadata)
        self.bm25 = bm25
        self.dense = dense

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    # --- building and persistence -------------------------------------------------------------

    @classmethod
    def build(cls, generation: int, chunks: list[IndexedChunk], *, k1: float, b: float) -> CollectionIndex:
        import bm25s
        import faiss

        doc_index: dict[str, int] = {}
        docs: list[tuple[str, list[str], dict[str, Any]]] = []
        doc_of = np.zeros(len(chunks), dtype=np.int64)
        for i, chunk in enumerate(chunks):
            if chunk.document_id not in doc_index:
                doc_index[chunk.document_id] = len(docs)
                docs.append((chunk.document_id, list(chunk.acl), chunk.metadata))
            doc_of[i] = doc_index[chunk.document_id]
        ids = np.array([c.id for c in chunks], dtype=np.int64)
        bm25 = None
        if chunks:
            bm25 = bm25s.BM25(k1=k1, b=b, method=BM25_METHOD)
            bm25.index(bm25_tokens([c.text for c in chunks]), show_progress=False)
        dense = faiss.IndexFlatIP(EMBEDDING_DIM)
        if chunks:
            dense.add(np.stack([np.frombuffer(c.embedding, dtype=np.float32) for c in chunks]))
        return cls(generation, ids, doc_of, docs, bm25, dense)

    def save(self, folder: Path) -> None:
        """Written to a fresh folder then renamed into place, so a crash leaves the old one or none."""
        import faiss

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "ids.npy", self.ids)
        np.save(tmp / "doc_of.npy", self.doc_of)
        (tmp / "docs.json").write_text(json.dumps(self.docs))
        faiss.write_index(self.dense, str(tmp / "dense.faiss"))
        if self.bm25 is not None:
            self.bm25.save(str(tmp / "bm25"))
        (tmp / "meta.json").write_text(json.dumps({"format": _FORMAT, "generation": self.generation}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    @classmethod
    def load(cls, folder: Path) -> CollectionIndex | None:
        """The persisted index, or None when it is absent or unreadable (then it is rebuilt)."""
        import bm25s
        import faiss

        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("format") != _FORMAT:
                return None
            ids = np.load(folder / "ids.npy")
            bm25 = bm25s.BM25.load(str(folder / "bm25")) if (folder / "bm25").exists() else None
            index = cls(int(meta["generation"]), ids, np.load(folder / "doc_of.npy"),
                        [(d, list(a), dict(m)) for d, a, m in json.loads((folder / "docs.json").read_text())],
                        bm25, faiss.read_index(str(folder / "dense.faiss")))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            log.warning("retrieval index unreadable; rebuilding", folder=str(folder), error=repr(error))
            return None
        if index.dense.ntotal != index.size or (index.bm25 is None) != (index.size == 0):
            return None
        return index

    # --- search -------------------------------------------------------------------------------

    def sparse(self, query: str, allowed: np.ndarray, k: int) -> list[Hit]:
        """BM25 top-k among the allowed positions (a boolean mask); chunks sharing no term score 0 and are left out."""
        if self.bm25 is None or k <= 0:
            return []
        vocab = self.bm25.vocab_dict
        terms = [t for t in query_terms(query) if t in vocab]
        if not terms:
            return []
        scores = np.asarray(self.bm25.get_scores(terms), dtype=np.float64)
        scores = np.where(allowed, scores, 0.0)
        return _top(scores, k)

    def dense_search(self, vector: np.ndarray, allowed: np.ndarray, k: int) -> list[Hit]:
        import faiss

        n_allowed = int(allowed.sum())
        if n_allowed == 0 or k <= 0:
            return []
        k = min(k, n_allowed)
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        if n_allowed == self.size:
            scores, positions = self.dense.search(query, k)
        else:
            selector = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
            scores, positions = self.dense.search(query, k, params=faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]
        return [Hit(int(p), float(s)) for p, s in zip(positions[0], scores[0], strict=True) if p >= 0]


def _top(scores: np.ndarray, k: int) -> list[Hit]:
    positive = np.flatnonzero(scores > 0)
    if positive.size == 0:
        return []
    if positive.size > k:
        positive = positive[np.argpartition(-scores[positive], k - 1)[:k]]
    ordered = positive[np.lexsort((positive, -scores[positive]))]  # score desc, then position (stable ties)
    return [Hit(int(p), float(scores[p])) for p in ordered]


class IndexManager:
    """Keeps each searched collection's index current: loaded from disk, else built from the database."""

    def __init__(self, store: RetrievalStore, root: Path, *, k1: float, b: float, cached: int = 64) -> None:
        self.store, self.root, self.k1, self.b, self.cached = store, root, k1, b, cached
        self._indexes: OrderedDict[str, CollectionIndex] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.builds = 0  # how many times an index was built from the database (tests and logs)

    def folder(self, uid: str) -> Path:
        return self.root / uid

    def current(self, collection_pk: int, uid: str) -> CollectionIndex:
        """The index at the database's current generation (blocking: call it off the event loop)."""
        generation = self.store.generation(collection_pk)
        with self._guard:
            lock = self._locks.setdefault(uid, threading.Lock())
        with lock:
            index = self._indexes.get(uid)
            if index is None or index.generation != generation:
                index = CollectionIndex.load(self.folder(uid))
                if index is None or index.generation != generation:
                    index = self._build(collection_pk, uid)
            with self._guard:
                self._indexes[uid] = index
                self._indexes.move_to_end(uid)
                while len(self._indexes) > self.cached:
                    self._indexes.popitem(last=False)
            return index

    def _build(self, collection_pk: int, uid: str) -> CollectionIndex:
        generation, chunks = self.store.indexed_chunks(collection_pk)
        index = CollectionIndex.build(generation, chunks, k1=self.k1, b=self.b)
        self.builds += 1
        try:
            index.save(self.folder(uid))
        except OSError as error:  # a full or read-only disk costs a rebuild next start, not the search
            log.warning("retrieval index not persisted", collection=uid, error=repr(error))
        log.info("retrieval index built", collection=uid, generation=generation, chunks=len(chunks))
        return index

    def drop(self, uid: str) -> None:
        """Forget a deleted collection's index, in memory and on disk."""
        with self._guard:
            self._indexes.pop(uid, None)
            self._locks.pop(uid, None)
        shutil.rmtree(self.folder(uid), ignore_errors=True)
