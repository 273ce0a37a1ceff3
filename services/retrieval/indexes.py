"""The BM25 (bm25s) and dense (FAISS) indexes of a collection, derived from the store of record.

An index holds every chunk of a collection at one `generation` of it (see
llmo.retrieval.storage), is persisted under `<index_dir>/<collection uid>/`, and is used while the
database's generation is unchanged. When the generation moved on, the documents changed since
(`RetrievalStore.index_changes`) are applied to a copy of it: a changed document's old chunks
become tombstones (positions masked out of every search), its current chunks are appended, and
an access-list / metadata change only refreshes `docs`. Each position keeps its BM25 terms and
counts, so BM25 is re-indexed from them without re-tokenising; FAISS gets only the new vectors.
Once tombstones pass `DenseConfig.rebuild_tombstone_share` of the positions, or the live count
crosses `hnsw_min_chunks` either way, the dense index is rebuilt from the live vectors it holds.
Positions stay in chunk id order, so an updated index ranks exactly as one built afresh (HNSW up
to its approximation). A missing, unreadable or stale index whose changes are no longer known is
rebuilt from the database: the vectors are stored with the chunks, so nothing is re-embedded.
This is blocking work and runs off the event loop; one update per collection at a time, and an
index handed out is never modified (searches may still be using it).

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
import itertools
import json
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmo.core.logging import get_logger
from llmo.embedding import EMBEDDING_DIM
from llmo.retrieval.storage import IndexChanges, IndexedChunk, RetrievalStore

log = get_logger(__name__)

BM25_METHOD = "lucene"
STOPWORDS = "en"
STEMMER_LANGUAGE = "english"
_FORMAT = 2  # bump when the on-disk layout changes: older folders are rebuilt


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer(STEMMER_LANGUAGE)


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
    rebuild_tombstone_share: float = 0.2

    @classmethod
    def of(cls, settings: Any) -> DenseConfig:
        """From llmo.retrieval.settings.RetrievalSettings."""
        return cls(hnsw_min_chunks=settings.hnsw_min_chunks, m=settings.hnsw_m,
                   ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search,
                   exact_below=settings.hnsw_exact_below,
                   rebuild_tombstone_share=settings.index_rebuild_tombstone_share)


DEFAULT_DENSE = DenseConfig()


@dataclass(frozen=True)
class Hit:
    position: int
    score: float


@dataclass(frozen=True)
class Terms:
    """Each position's BM25 terms, kept so BM25 is re-indexed without re-tokenising: position i has
    the distinct term ids `term[ptr[i]:ptr[i + 1]]` (into `tokens`, the stemmed tokens) occurring
    `count[...]` times, and `length[i]` tokens once stop words are removed. Never modified once
    made: `extended` and `compacted` return new ones."""

    tokens: list[str]
    vocab: dict[str, int]  # token -> term id; also the BM25 index's vocab_dict
    ptr: np.ndarray  # int64, positions + 1
    term: np.ndarray  # int32
    count: np.ndarray  # int32
    length: np.ndarray  # int32, per position

    @classmethod
    def empty(cls) -> Terms:
        return cls([], {}, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32),
                   np.zeros(0, dtype=np.int32))

    @property
    def size(self) -> int:
        return int(self.length.shape[0])

    def extended(self, texts: list[str]) -> Terms:
        """These positions plus one per text, tokenised as `query_terms` tokenises (new tokens join the vocabulary)."""
        if not texts:
            return self
        import bm25s

        ids, local = bm25s.tokenize(texts, lower=True, stopwords=STOPWORDS, stemmer=_stemmer(), show_progress=False)
        tokens, vocab = self.tokens, self.vocab
        if any(token not in vocab for token in local):
            tokens, vocab = list(tokens), dict(vocab)
        to_term = np.zeros(len(local), dtype=np.int64)
        for token in sorted(local):  # sorted: the same term ids whatever the process's hash seed
            term = vocab.get(token)
            if term is None:
                term = vocab[token] = len(tokens)
                tokens.append(token)
            to_term[local[token]] = term
        lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        width = max(len(tokens), 1)
        keys = np.repeat(np.arange(len(ids), dtype=np.int64), lengths) * width + to_term[flat]
        pairs, counts = np.unique(keys, return_counts=True)  # (position, term) sorted, with term frequencies
        per_position = np.bincount(pairs // width, minlength=len(ids))
        return Terms(tokens, vocab, np.concatenate([self.ptr, self.ptr[-1] + np.cumsum(per_position)]),
                     np.concatenate([self.term, (pairs % width).astype(np.int32)]),
                     np.concatenate([self.count, counts.astype(np.int32)]),
                     np.concatenate([self.length, lengths.astype(np.int32)]))

    def compacted(self, keep: np.ndarray) -> Terms:
        """Only the positions `keep` (a boolean mask) selects, and only the tokens they use."""
        per_position = np.diff(self.ptr)
        selected = np.repeat(keep, per_position)
        term, count = self.term[selected], self.count[selected]
        used = np.unique(term)
        renumber = np.zeros(len(self.tokens), dtype=np.int32)
        renumber[used] = np.arange(used.size, dtype=np.int32)
        tokens = [self.tokens[int(i)] for i in used]
        ptr = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(per_position[keep], out=ptr[1:])
        return Terms(tokens, {t: i for i, t in enumerate(tokens)}, ptr, renumber[term], count, self.length[keep])


def _bm25(terms: Terms, live: np.ndarray, k1: float, b: float) -> Any:
    """A bm25s index (Lucene variant) over the live positions, computed from their stored terms;
    its score matrix has a row per position (tombstones: empty rows), so scores index by position.
    None when no position is live."""
    import bm25s
    import scipy.sparse as sp

    n = int(np.count_nonzero(live))
    if n == 0:
        return None
    position = np.repeat(np.arange(terms.size, dtype=np.int64), np.diff(terms.ptr))
    term, tf = terms.term, terms.count.astype(np.float64)
    if n < terms.size:
        keep = live[position]
        position, term, tf = position[keep], term[keep], tf[keep]
    length = terms.length.astype(np.float64)
    average = float(length[live].mean())
    df = np.bincount(term, minlength=len(terms.tokens))
    idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)
    scores = np.zeros(0, dtype=np.float64)
    if term.size:  # then some live position has tokens, and `average` > 0
        scores = idf[term] * (tf / (k1 * ((1 - b) + b * length[position] / average) + tf))
    matrix = sp.csc_matrix((scores.astype(np.float32), (position, term)), shape=(terms.size, len(terms.tokens)),
                           dtype=np.float32)
    bm25 = bm25s.BM25(k1=k1, b=b, method=BM25_METHOD)
    bm25.scores = {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr, "num_docs": terms.size}
    bm25.vocab_dict = terms.vocab
    bm25.nonoccurrence_array = None
    return bm25


class CollectionIndex:
    """Both indexes of one collection at one generation, plus what access control and filters need.

    Positions are slots: `live` says which hold a current chunk; a tombstone keeps its vector in
    the dense index (and id -1) until the next compaction, and every search masks it out."""

    def __init__(self, generation: int, ids: np.ndarray, doc_of: np.ndarray, docs: list[tuple[str, list[str], dict[str, Any]]],
                 bm25: Any, dense: Any, *, live: np.ndarray | None = None, terms: Terms | None = None,
                 params: tuple[float, float] | None = None) -> None:
        self.generation = generation
        self.ids = ids  # position -> chunk id (-1: tombstone)
        self.doc_of = doc_of  # position -> index into docs
        self.docs = docs  # (document id, access list, metadata)
        self.bm25 = bm25
        self.dense = dense
        self.live = np.ones(ids.shape[0], dtype=bool) if live is None else live
        self.tombstones = int(self.live.shape[0] - np.count_nonzero(self.live))
        self.terms = terms  # None: cannot be updated, only rebuilt
        self.params = params  # BM25 (k1, b) it was built with
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
        """Positions, tombstones included (the length of every per-position array)."""
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

    # --- building, updating and persistence ---------------------------------------------------

    @classmethod
    def empty(cls, generation: int, *, k1: float, b: float, dense_config: DenseConfig = DEFAULT_DENSE) -> CollectionIndex:
        return cls(generation, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), [], None,
                   _empty_dense(0, dense_config), terms=Terms.empty(), params=(k1, b))

    @classmethod
    def build(cls, generation: int, chunks: list[IndexedChunk], *, k1: float, b: float,
              dense_config: DenseConfig = DEFAULT_DENSE) -> CollectionIndex:
        """Positions in the order of `chunks` (the store gives them by id)."""
        empty = cls.empty(generation, k1=k1, b=b, dense_config=dense_config)
        built = empty.apply(IndexChanges(generation, generation, frozenset(), chunks, {}), k1=k1, b=b,
                            dense_config=dense_config)
        assert built is not None  # an empty index has no order to keep
        return built[0]

    def apply(self, changes: IndexChanges, *, k1: float, b: float, dense_config: DenseConfig = DEFAULT_DENSE
              ) -> tuple[CollectionIndex, bool] | None:
        """A new index at `changes.generation` (this one is left as it is), and whether its dense
        index was rebuilt from the live vectors; None when it cannot be updated (no stored terms, or
        a new chunk id not after every live one): then rebuild it from the database."""
        import faiss

        if self.terms is None:
            return None
        added = changes.chunks
        new_ids = np.array([c.id for c in added], dtype=np.int64)
        live, ids = self.live.copy(), self.ids.copy()
        number = {d: i for i, (d, _, _) in enumerate(self.docs)}
        gone = [number[d] for d in changes.content if d in number]
        if gone:
            dead = live & np.isin(self.doc_of, np.array(gone, dtype=np.int64))
            live[dead] = False
            ids[dead] = -1
        if self.size and new_ids.size and live.any() and (
                new_ids[0] <= ids[live].max() or bool(np.any(np.diff(new_ids) <= 0))):
            return None  # positions must stay in chunk id order, as a build from the store orders them
        docs = list(self.docs)
        for document_id, (acl, metadata) in changes.access.items():
            if document_id in number:
                docs[number[document_id]] = (document_id, list(acl), dict(metadata))
        new_doc_of = np.zeros(len(added), dtype=np.int64)
        for i, chunk in enumerate(added):
            at = number.get(chunk.document_id)
            if at is None:
                at = number[chunk.document_id] = len(docs)
                docs.append((chunk.document_id, list(chunk.acl), dict(chunk.metadata)))
            new_doc_of[i] = at
        ids = np.concatenate([ids, new_ids])
        doc_of = np.concatenate([self.doc_of, new_doc_of])
        live = np.concatenate([live, np.ones(len(added), dtype=bool)])
        terms = self.terms.extended([c.text for c in added])
        vectors = np.zeros((len(added), EMBEDDING_DIM), dtype=np.float32)
        for i, chunk in enumerate(added):
            vectors[i] = np.frombuffer(chunk.embedding, dtype=np.float32)

        n_live = int(np.count_nonzero(live))
        dead_count = live.shape[0] - n_live
        rebuild = ((n_live >= dense_config.hnsw_min_chunks) != self.is_hnsw
                   or dead_count > dense_config.rebuild_tombstone_share * live.shape[0]
                   or (dead_count > 0 and n_live == 0))
        if rebuild:
            kept = np.concatenate([_stored_vectors(self.dense)[live[:self.size]], vectors])
            ids, doc_of, terms = ids[live], doc_of[live], terms.compacted(live)
            live = np.ones(n_live, dtype=bool)
            dense = _empty_dense(n_live, dense_config)
            if n_live:
                dense.add(kept)
        else:
            dense = faiss.clone_index(self.dense)
            if len(added):
                dense.add(vectors)
        used = np.unique(doc_of[live])
        if used.size < len(docs):  # documents left without a live chunk go
            renumber = np.zeros(len(docs), dtype=np.int64)
            renumber[used] = np.arange(used.size, dtype=np.int64)
            docs = [docs[int(i)] for i in used]
            doc_of = renumber[doc_of]
        index = CollectionIndex(changes.generation, ids, doc_of, docs, _bm25(terms, live, k1, b), dense, live=live,
                                terms=terms, params=(k1, b))
        return index, rebuild

    def save(self, folder: Path) -> None:
        """Written to a fresh folder then renamed into place, so a crash leaves the old one or none."""
        import faiss

        if self.terms is None:
            raise ValueError("an index without its terms is not persisted")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays = {"ids": self.ids, "doc_of": self.doc_of, "live": self.live, "terms_ptr": self.terms.ptr,
                  "terms_term": self.terms.term, "terms_count": self.terms.count, "terms_length": self.terms.length}
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "docs.json").write_text(json.dumps(self.docs))
        (tmp / "tokens.json").write_text(json.dumps(self.terms.tokens))
        faiss.write_index(self.dense, str(tmp / "dense.faiss"))
        (tmp / "meta.json").write_text(json.dumps({"format": _FORMAT, "generation": self.generation,
                                                   "params": list(self.params or ())}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    @classmethod
    def load(cls, folder: Path) -> CollectionIndex | None:
        """The persisted index, or None when it is absent, unreadable or inconsistent (then it is rebuilt)."""
        import faiss

        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("format") != _FORMAT:
                return None
            k1, b = (float(v) for v in meta["params"])
            arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in (
                "ids", "doc_of", "live", "terms_ptr", "terms_term", "terms_count", "terms_length")}
            tokens = [str(t) for t in json.loads((folder / "tokens.json").read_text())]
            docs = [(str(d), [str(p) for p in a], dict(m)) for d, a, m in json.loads((folder / "docs.json").read_text())]
            terms = Terms(tokens, {t: i for i, t in enumerate(tokens)}, arrays["terms_ptr"], arrays["terms_term"],
                          arrays["terms_count"], arrays["terms_length"])
            ids, doc_of, live = arrays["ids"], arrays["doc_of"], arrays["live"].astype(bool)
            dense = faiss.read_index(str(folder / "dense.faiss"))
            size = ids.shape[0]
            consistent = (doc_of.shape[0] == live.shape[0] == terms.size == dense.ntotal == size
                          and terms.ptr.shape[0] == size + 1 and int(terms.ptr[-1]) == terms.term.shape[0]
                          and terms.count.shape[0] == terms.term.shape[0]
                          and bool(np.all(terms.term < len(tokens))) and bool(np.all(doc_of[live] < len(docs))))
            if not consistent:
                log.warning("retrieval index inconsistent; rebuilding", folder=str(folder))
                return None
            return cls(int(meta["generation"]), ids, doc_of, docs, _bm25(terms, live, k1, b), dense, live=live,
                       terms=terms, params=(k1, b))
        except FileNotFoundError:
            return None
        except Exception as error:  # derived data: whatever is wrong with it, it is rebuilt from the database
            log.warning("retrieval index unreadable; rebuilding", folder=str(folder), error=repr(error))
            return None

    # --- search -------------------------------------------------------------------------------

    def _live_only(self, allowed: np.ndarray) -> np.ndarray:
        return allowed & self.live if self.tombstones else allowed

    def sparse(self, query: str, allowed: np.ndarray, k: int) -> list[Hit]:
        """BM25 top-k among the allowed positions (a boolean mask); chunks sharing no term score 0 and are left out."""
        if self.bm25 is None or k <= 0:
            return []
        vocab = self.bm25.vocab_dict
        terms = [t for t in query_terms(query) if t in vocab]
        if not terms:
            return []
        scores = np.asarray(self.bm25.get_scores(terms), dtype=np.float64)
        scores = np.where(self._live_only(allowed), scores, 0.0)
        return _top(scores, k)

    @property
    def is_hnsw(self) -> bool:
        import faiss

        return isinstance(self.dense, faiss.IndexHNSW)

    def dense_search(self, vector: np.ndarray, allowed: np.ndarray, k: int) -> list[Hit]:
        with _one_omp_thread():
            return self._dense_search(vector, allowed, k)

    def _dense_search(self, vector: np.ndarray, allowed: np.ndarray, k: int) -> list[Hit]:
        import faiss

        config = self.config
        allowed = self._live_only(allowed)
        n_allowed = int(np.count_nonzero(allowed))
        if n_allowed == 0 or k <= 0:
            return []
        k = min(k, n_allowed)
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        everything = n_allowed == self.size
        if not self.is_hnsw:
            if everything:
                scores, positions = self.dense.search(query, k)
            else:
                selector, _bits = _selector(allowed)
                scores, positions = self.dense.search(query, k, params=faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]
            return _hits(positions[0], scores[0])
        if not everything and n_allowed <= config.exact_below:
            return self._exact_subset(query[0], np.flatnonzero(allowed), k)
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(config.ef_search, k)
        if not everything:
            selector, _bits = _selector(allowed)
            params.sel = selector
        scores, positions = self.dense.search(query, k, params=params)  # type: ignore[call-arg]
        hits = _hits(positions[0], scores[0])
        if len(hits) < k:  # the graph walk ran out of allowed neighbours: exact over the allowed set
            return self._exact_subset(query[0], np.flatnonzero(allowed), k)
        return hits

    def _exact_subset(self, query: np.ndarray, positions: np.ndarray, k: int) -> list[Hit]:
        """Exact inner product over the given positions, from the vectors HNSW keeps in its storage."""
        scores = _stored_vectors(self.dense)[positions] @ query
        if positions.size > k:
            best = np.argpartition(-scores, k - 1)[:k]
            positions, scores = positions[best], scores[best]
        order = np.lexsort((positions, -scores))
        return [Hit(int(positions[i]), float(scores[i])) for i in order]


@contextmanager
def _one_omp_thread() -> Iterator[None]:
    """FAISS runs one query on one thread whatever its OpenMP team: the others only spin, and on a
    small machine they take the CPU from the service's other threads (a flat search of 12k chunks
    took 4 ms with a team of 2 and 0.6 ms with 1). OpenMP's thread count is per calling thread, so
    this leaves index builds on other threads (and this one afterwards) their full team."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _empty_dense(size: int, config: DenseConfig) -> Any:
    """Exact flat below the HNSW threshold, HNSW (inner product) from it on."""
    import faiss

    if size < config.hnsw_min_chunks:
        return faiss.IndexFlatIP(EMBEDDING_DIM)
    index = faiss.IndexHNSWFlat(EMBEDDING_DIM, config.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    return index


def _stored_vectors(dense: Any) -> np.ndarray:
    """The vectors a flat or HNSW index holds, by position (a view of FAISS's memory: copy before it changes)."""
    import faiss

    if dense.ntotal == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    flat: Any = faiss.downcast_index(dense.storage) if isinstance(dense, faiss.IndexHNSW) else dense
    return faiss.rev_swig_ptr(flat.get_xb(), dense.ntotal * EMBEDDING_DIM).reshape(-1, EMBEDDING_DIM)


def _selector(allowed: np.ndarray) -> tuple[Any, np.ndarray]:
    """A FAISS selector of the allowed positions, and the bitmap it reads (keep it alive while searching)."""
    import faiss

    bits = np.packbits(allowed, bitorder="little")
    return faiss.IDSelectorBitmap(allowed.shape[0], faiss.swig_ptr(bits)), bits


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
    """Keeps each searched collection's index current: loaded from disk, updated with the documents
    changed since its generation, else built from the database."""

    def __init__(self, store: RetrievalStore, root: Path, *, k1: float, b: float, cached: int = 64,
                 dense: DenseConfig = DEFAULT_DENSE) -> None:
        self.store, self.root, self.k1, self.b, self.cached, self.dense = store, root, k1, b, cached, dense
        self._indexes: OrderedDict[str, CollectionIndex] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # counters for tests and logs: `builds` = full_builds + updates (each time an index was made
        # current from the database); `compactions`: updates that also rebuilt the dense index
        self.builds = 0
        self.full_builds = 0
        self.updates = 0
        self.compactions = 0

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
                index = self._refresh(collection_pk, uid, index, generation)
                index.config = self.dense
            with self._guard:
                self._indexes[uid] = index
                self._indexes.move_to_end(uid)
                while len(self._indexes) > self.cached:
                    self._indexes.popitem(last=False)
            return index

    def _refresh(self, collection_pk: int, uid: str, cached: CollectionIndex | None,
                 generation: int | None) -> CollectionIndex:
        index = cached if cached is not None else self._load(uid)
        if index is not None and index.generation == generation:
            return index
        if index is not None and generation is not None:
            updated = self._update(collection_pk, uid, index)
            if updated is not None:
                return updated
        return self._build(collection_pk, uid)

    def _load(self, uid: str) -> CollectionIndex | None:
        """The persisted index, when it was built with these BM25 parameters and the dense kind a build would pick."""
        index = CollectionIndex.load(self.folder(uid))
        if index is None:
            return None
        live = index.size - index.tombstones
        if index.params != (self.k1, self.b) or index.is_hnsw != (live >= self.dense.hnsw_min_chunks):
            log.info("retrieval index built with other settings; rebuilding", collection=uid)
            return None
        return index

    def _update(self, collection_pk: int, uid: str, index: CollectionIndex) -> CollectionIndex | None:
        changes = self.store.index_changes(collection_pk, index.generation)
        if changes is None:
            return None
        applied = index.apply(changes, k1=self.k1, b=self.b, dense_config=self.dense)
        if applied is None:
            return None
        updated, compacted = applied
        self.builds += 1
        self.updates += 1
        self.compactions += int(compacted)
        self._save(uid, updated)
        log.info("retrieval index updated", collection=uid, generation=updated.generation, since=changes.since,
                 documents=len(changes.content | changes.access.keys()), added=len(changes.chunks),
                 tombstones=updated.tombstones, compacted=compacted)
        return updated

    def _build(self, collection_pk: int, uid: str) -> CollectionIndex:
        generation, chunks = self.store.indexed_chunks(collection_pk)
        index = CollectionIndex.build(generation, chunks, k1=self.k1, b=self.b, dense_config=self.dense)
        self.builds += 1
        self.full_builds += 1
        self._save(uid, index)
        log.info("retrieval index built", collection=uid, generation=generation, chunks=len(chunks),
                 dense="hnsw" if index.is_hnsw else "flat")
        return index

    def _save(self, uid: str, index: CollectionIndex) -> None:
        try:
            index.save(self.folder(uid))
        except OSError as error:  # a full or read-only disk costs a rebuild next start, not the search
            log.warning("retrieval index not persisted", collection=uid, error=repr(error))

    def drop(self, uid: str) -> None:
        """Forget a deleted collection's index, in memory and on disk."""
        with self._guard:
            self._indexes.pop(uid, None)
            self._locks.pop(uid, None)
        shutil.rmtree(self.folder(uid), ignore_errors=True)
