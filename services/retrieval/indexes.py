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
(PyStemmer). Dense: MiniLM-L6-v2 vectors, L2-normalised, inner product: exact (IndexFlatIP)
below `DenseConfig.hnsw_min_chunks` chunks, HNSW (IndexHNSWFlat) from there on. HNSW searches
with the access/filter id selector inside the graph walk; an allowed subset of at most
`exact_below` chunks, or an HNSW walk that found fewer than k allowed chunks, is searched
exactly over the allowed vectors instead, so a selective filter never loses results.
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
class DenseConfig:
    """How the dense index is built and searched (the `LLMO_RETRIEVAL_HNSW_*` knobs)."""

    hnsw_min_chunks: int = 25_000
    m: int = 32
    ef_construction: int = 100
    ef_search: int = 64
    exact_below: int = 4096

    @classmethod
    def of(cls, settings: Any) -> DenseConfig:
        """From llmo.retrieval.settings.RetrievalSettings."""
        return cls(hnsw_min_chunks=settings.hnsw_min_chunks, m=settings.hnsw_m,
                   ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search,
                   exact_below=settings.hnsw_exact_below)


DEFAULT_DENSE = DenseConfig()


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
        self.config = DEFAULT_DENSE  # search knobs; IndexManager sets its own on every index it hands out
        # access lists as arrays, so a search decides readability with a few numpy operations
        self._open_docs = np.array([not acl for _, acl, _ in docs], dtype=bool)
        named: dict[str, list[int]] = {}
        for number, (_, acl, _) in enumerate(docs):
            for principal in acl:
                named.setdefault(principal, []).append(number)
        self._docs_naming = {p: np.array(v, dtype=np.int64) for p, v in named.items()}

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def readable_documents(self, principals: frozenset[str]) -> np.ndarray:
        """Per document (index into `docs`), whether `principals` may read it: an empty access list,
        or one naming any of them (`llmo.retrieval.ranking.visible`)."""
        out = self._open_docs.copy()
        for principal in principals:
            named = self._docs_naming.get(principal)
            if named is not None:
                out[named] = True
        return out

    # --- building and persistence -------------------------------------------------------------

    @classmethod
    def build(cls, generation: int, chunks: list[IndexedChunk], *, k1: float, b: float,
              dense_config: DenseConfig = DEFAULT_DENSE) -> CollectionIndex:
        import bm25s

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
        dense = _empty_dense(len(chunks), dense_config)
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

    @property
    def is_hnsw(self) -> bool:
        import faiss

        return isinstance(self.dense, faiss.IndexHNSW)

    def dense_search(self, vector: np.ndarray, allowed: np.ndarray, k: int) -> list[Hit]:
        import faiss

        config = self.config

        n_allowed = int(allowed.sum())
        if n_allowed == 0 or k <= 0:
            return []
        k = min(k, n_allowed)
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        everything = n_allowed == self.size
        if not self.is_hnsw:
            if everything:
                scores, positions = self.dense.search(query, k)
            else:
                selector = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
                scores, positions = self.dense.search(query, k, params=faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]
            return _hits(positions[0], scores[0])
        if not everything and n_allowed <= config.exact_below:
            return self._exact_subset(query[0], np.flatnonzero(allowed), k)
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(config.ef_search, k)
        if not everything:
            selector = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
            params.sel = selector
        scores, positions = self.dense.search(query, k, params=params)  # type: ignore[call-arg]
        hits = _hits(positions[0], scores[0])
        if len(hits) < k:  # the graph walk ran out of allowed neighbours: exact over the allowed set
            return self._exact_subset(query[0], np.flatnonzero(allowed), k)
        return hits

    def _exact_subset(self, query: np.ndarray, positions: np.ndarray, k: int) -> list[Hit]:
        """Exact inner product over the given positions, from the vectors HNSW keeps in its storage."""
        import faiss

        storage = faiss.downcast_index(self.dense.storage)
        flat = storage.get_xb()  # type: ignore[attr-defined]
        vectors = faiss.rev_swig_ptr(flat, self.dense.ntotal * EMBEDDING_DIM).reshape(-1, EMBEDDING_DIM)
        scores = vectors[positions] @ query
        if positions.size > k:
            best = np.argpartition(-scores, k - 1)[:k]
            positions, scores = positions[best], scores[best]
        order = np.lexsort((positions, -scores))
        return [Hit(int(positions[i]), float(scores[i])) for i in order]


def _empty_dense(size: int, config: DenseConfig) -> Any:
    """Exact flat below the HNSW threshold, HNSW (inner product) from it on."""
    import faiss

    if size < config.hnsw_min_chunks:
        return faiss.IndexFlatIP(EMBEDDING_DIM)
    index = faiss.IndexHNSWFlat(EMBEDDING_DIM, config.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    return index


def _hits(positions: np.ndarray, scores: np.ndarray) -> list[Hit]:
    return [Hit(int(p), float(s)) for p, s in zip(positions, scores, strict=True) if p >= 0]


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

    def __init__(self, store: RetrievalStore, root: Path, *, k1: float, b: float, cached: int = 64,
                 dense: DenseConfig = DEFAULT_DENSE) -> None:
        self.store, self.root, self.k1, self.b, self.cached, self.dense = store, root, k1, b, cached, dense
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
                index.config = self.dense
            with self._guard:
                self._indexes[uid] = index
                self._indexes.move_to_end(uid)
                while len(self._indexes) > self.cached:
                    self._indexes.popitem(last=False)
            return index

    def _build(self, collection_pk: int, uid: str) -> CollectionIndex:
        generation, chunks = self.store.indexed_chunks(collection_pk)
        index = CollectionIndex.build(generation, chunks, k1=self.k1, b=self.b, dense_config=self.dense)
        self.builds += 1
        try:
            index.save(self.folder(uid))
        except OSError as error:  # a full or read-only disk costs a rebuild next start, not the search
            log.warning("retrieval index not persisted", collection=uid, error=repr(error))
        log.info("retrieval index built", collection=uid, generation=generation, chunks=len(chunks),
                 dense="hnsw" if index.is_hnsw else "flat")
        return index

    def drop(self, uid: str) -> None:
        """Forget a deleted collection's index, in memory and on disk."""
        with self._guard:
            self._indexes.pop(uid, None)
            self._locks.pop(uid, None)
        shutil.rmtree(self.folder(uid), ignore_errors=True)
