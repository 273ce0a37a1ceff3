"""The learned reranker: serve-time features, the index signals it reads, training determinism,
the versioned artifact, and the cross-validation helpers (no model weights: random vectors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmo.embedding import EMBEDDING_DIM
from llmo.retrieval.indexes import CollectionIndex
from llmo.retrieval.ranking import Candidate, Fused
from llmo.retrieval.rerank import BUILTIN_DIR, ArtifactError, LearnedReranker, load_reranker, rerank_input
from llmo.retrieval.rerank import data as judged
from llmo.retrieval.rerank.crossval import folds_of, ndcg_at
from llmo.retrieval.rerank.features import FEATURE_NAMES, RerankInput, feature_matrix
from llmo.retrieval.rerank.model import FORMAT, META_FILE, MODEL_FILE, TrainingSet, fit
from llmo.retrieval.settings import RetrievalSettings
from llmo.retrieval.storage import ChunkRow, DocumentRow, IndexedChunk

TEXTS = [
    "Penguins are flightless birds of the southern hemisphere; penguins swim very well.",
    "Volcanoes erupt when magma rises through cracks in the crust.",
    "Some birds cannot fly: the ostrich and the emu are flightless too.",
    "Bake the cake for forty minutes with flour, butter and sugar.",
]
QUERY = "flightless birds swim"


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, EMBEDDING_DIM)))


def _index(vectors: np.ndarray) -> CollectionIndex:
    chunks = [IndexedChunk(id=100 + i, document_id=f"d{i}", text=t, embedding=v.tobytes(), acl=(), metadata={})
              for i, (t, v) in enumerate(zip(TEXTS, vectors, strict=True))]
    return CollectionIndex.build(1, chunks, k1=1.2, b=0.75)


def _candidate(i: int, position: int, score: float, title: str = "", idx: int = 0) -> Candidate:
    chunk = ChunkRow(idx=idx, text=TEXTS[i], heading_path=[], start_offset=0, end_offset=len(TEXTS[i]),
                     token_count=len(TEXTS[i].split()), id=100 + i)
    document = DocumentRow(document_id=f"d{i}", content_sha256="", size_bytes=0, mime_type="text/plain",
                           display_name=title, source_uri="", metadata={}, acl=[])
    return Candidate(Fused(position, score), chunk, document)


def _column(name: str, matrix: np.ndarray) -> np.ndarray:
    return matrix[:, FEATURE_NAMES.index(name)]


def test_features_are_relative_to_the_list_and_read_the_query_terms() -> None:
    vectors = _vectors(4)
    query_vector = vectors[2]
    candidates = [_candidate(0, 0, 0.03, title="Penguins"), _candidate(1, 1, 0.02), _candidate(2, 2, 0.01, idx=3)]
    batch = RerankInput(QUERY, query_vector, candidates, vectors[:3], np.array([4.0, 0.0, 2.0]))
    x = feature_matrix(batch)
    assert x.shape == (3, len(FEATURE_NAMES))
    assert _column("first_stage_rank", x).tolist() == [1, 2, 3]
    assert _column("first_stage_score_ratio", x).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert _column("bm25_ratio", x).tolist() == [1.0, 0.0, 0.5]
    assert _column("bm25_rank", x).tolist() == [1, 3, 2]
    cosines = vectors[:3] @ query_vector
    assert _column("dense_cosine", x).tolist() == pytest.approx(cosines.tolist(), abs=1e-6)
    assert _column("dense_rank", x).tolist()[2] == 1 and _column("dense_gap", x)[2] == pytest.approx(0.0)
    # "flightless birds swim": the first chunk has all three terms and the pair "flightless birds"
    assert _column("term_coverage", x).tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    assert _column("bigram_overlap", x).tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert _column("idf_coverage", x)[0] == pytest.approx(1.0) and 0 < _column("idf_coverage", x)[2] < 2 / 3
    assert _column("title_overlap", x).tolist() == pytest.approx([0.0, 0.0, 0.0])  # "Penguins" is no query term
    assert _column("first_match", x)[1] == 1.0 and _column("first_match", x)[0] < 0.5
    assert _column("chunk_index", x).tolist() == [0, 0, 3]
    assert set(_column("query_terms", x).tolist()) == {3}


def test_the_index_signals_are_found_by_chunk_id_even_without_a_position() -> None:
    vectors = _vectors(4)
    index = _index(vectors)
    query_vector = _vectors(1, seed=5)[0]
    # positions 0 are wrong hints for all but the first (a graph candidate has no index position)
    candidates = [_candidate(2, 0, 0.5), _candidate(0, 0, 0.4), _candidate(3, 0, 0.3)]
    encoded: list[list[str]] = []
    batch = rerank_input(index, QUERY, query_vector, candidates, lambda texts: encoded.append(texts) or _vectors(0))
    assert not encoded  # every candidate was in the index
    np.testing.assert_allclose(batch.vectors, vectors[[2, 0, 3]], atol=1e-6)
    sparse = {h.position: h.score for h in index.sparse(QUERY, np.ones(4, dtype=bool), 4)}
    assert batch.bm25.tolist() == pytest.approx([sparse.get(2, 0.0), sparse.get(0, 0.0), 0.0])
    assert batch.bm25[1] > batch.bm25[0] > 0


def test_a_chunk_missing_from_the_index_is_embedded_from_its_text() -> None:
    vectors = _vectors(4)
    index = _index(vectors)
    stranger = _candidate(1, 7, 0.1)
    stranger.chunk.id = 999
    fallback = _vectors(1, seed=9)
    seen: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.append(texts)
        return fallback

    batch = rerank_input(index, QUERY, vectors[0], [_candidate(0, 0, 0.2), stranger], encode)
    assert seen == [[TEXTS[1]]]
    np.testing.assert_allclose(batch.vectors[1], fallback[0])
    assert batch.bm25[1] == 0.0


def _synthetic(queries: int = 60, per_query: int = 12, seed: int = 0) -> TrainingSet:
    """Relevance follows term coverage and cosine; the other features are noise."""
    rng = np.random.default_rng(seed)
    rows = rng.random((queries * per_query, len(FEATURE_NAMES)))
    signal = rows[:, FEATURE_NAMES.index("term_coverage")] + rows[:, FEATURE_NAMES.index("dense_cosine")]
    labels = np.zeros(len(rows))
    for q in range(queries):
        block = slice(q * per_query, (q + 1) * per_query)
        labels[block][np.argsort(-signal[block])[:2]] = 1
    return TrainingSet(rows, labels, [per_query] * queries)


def test_training_learns_the_signal_and_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    data = _synthetic()
    first = fit(data, rounds=40, summary={"collections": ["synthetic"]}).save(tmp_path / "a")
    second = fit(data, rounds=40, summary={"collections": ["synthetic"]}).save(tmp_path / "b")
    for name in (META_FILE, MODEL_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    model = LearnedReranker.load(first)
    meta = json.loads((first / META_FILE).read_text())
    assert meta["format"] == FORMAT and meta["features"] == list(FEATURE_NAMES) and meta["version"] == model.version
    assert model.version.startswith("lambdarank-") and meta["training"]["queries"] == 60
    held_out = _synthetic(queries=20, seed=1)
    scores = model.predict(held_out.features)
    hits = 0
    for q in range(20):
        block = slice(q * 12, (q + 1) * 12)
        hits += int(held_out.labels[block][int(np.argmax(scores[block]))] == 1)
    assert hits >= 16  # random choice would find a relevant one about 1 time in 6


def test_queries_without_a_relevant_candidate_are_left_out_and_an_empty_set_is_refused() -> None:
    data = _synthetic(queries=10)
    data.labels[:12] = 0
    model = fit(data, rounds=5)
    assert model.metadata["training"]["queries_with_relevant"] == 9
    with pytest.raises(ValueError):
        fit(TrainingSet(data.features, np.zeros_like(data.labels), data.groups), rounds=5)


def test_broken_artifacts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        LearnedReranker.load(tmp_path)
    good = fit(_synthetic(queries=10), rounds=5).save(tmp_path / "good")
    meta = json.loads((good / META_FILE).read_text())
    for change, folder in (({"format": "other/v0"}, "format"), ({"features": ["x"]}, "features")):
        bad = tmp_path / folder
        bad.mkdir()
        (bad / MODEL_FILE).write_bytes((good / MODEL_FILE).read_bytes())
        (bad / META_FILE).write_text(json.dumps({**meta, **change}))
        with pytest.raises(ArtifactError):
            LearnedReranker.load(bad)
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / META_FILE).write_text(json.dumps(meta))
    (garbled / MODEL_FILE).write_text("not a model")
    with pytest.raises(ArtifactError):
        LearnedReranker.load(garbled)


def test_the_setting_picks_builtin_a_directory_or_none(tmp_path: Path) -> None:
    builtin = load_reranker(RetrievalSettings())
    assert builtin is not None
    assert builtin.version == json.loads((BUILTIN_DIR / META_FILE).read_text())["version"]
    own = fit(_synthetic(queries=10), rounds=5, version="test-7").save(tmp_path / "own")
    chosen = load_reranker(RetrievalSettings(reranker=str(own)))
    assert chosen is not None and chosen.version == "test-7"
    assert load_reranker(RetrievalSettings(reranker="")) is None
    with pytest.raises(ArtifactError):
        load_reranker(RetrievalSettings(reranker=str(tmp_path / "missing")))


def test_the_builtin_artifact_scores_a_real_candidate_list() -> None:
    builtin = load_reranker(RetrievalSettings())
    assert builtin is not None
    vectors = _vectors(4)
    batch = RerankInput(QUERY, vectors[0], [_candidate(i, i, 1 / (60 + i)) for i in range(4)], vectors,
                        np.array([3.0, 0.0, 1.0, 0.0]))
    scores = builtin.score(batch)
    assert len(scores) == 4 and all(np.isfinite(scores)) and len(set(scores)) > 1
    assert builtin.score(RerankInput(QUERY, vectors[0], [], vectors[:0], np.zeros(0))) == []


def test_ndcg_and_folds() -> None:
    assert ndcg_at(["a", "b"], {"a": 1}) == 1.0
    assert ndcg_at(["b", "a"], {"a": 1}) == pytest.approx(1 / np.log2(3))
    assert ndcg_at(["x"], {"a": 1}) == 0.0
    ids = [str(i) for i in range(23)]
    folds = folds_of(ids, 5, seed=0)
    assert folds == folds_of(list(reversed(ids)), 5, seed=0)
    assert sorted(q for f in folds for q in f) == sorted(ids) and {len(f) for f in folds} <= {4, 5}
    assert folds != folds_of(ids, 5, seed=1)
    with pytest.raises(ValueError):
        folds_of(ids, 1, seed=0)


def test_judged_collections_in_beir_and_smart_layouts(tmp_path: Path) -> None:
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "1", "title": "T", "text": "alpha"}\n{"_id": "2", "text": "beta"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "alpha?"}\n{"_id": "q2", "text": "unjudged"}\n')
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\t1\nq1\t2\t0\n")
    ds = judged.load(beir, "train")
    assert ds.corpus["1"] == ("T", "alpha") and ds.queries == {"q1": "alpha?"} and ds.qrels == {"q1": {"1": 1}}
    with pytest.raises(FileNotFoundError):
        judged.load(beir, "test")
    smart = tmp_path / "smart"
    smart.mkdir()
    (smart / "X.ALL").write_text(".I 1\n.T\nFirst title\n.A\nSomeone\n.W\n  Body one\ncontinues.\n.X\n1 5 1\n"
                                 ".I 2\n.T\nSecond\n.W\nBody two\n")
    (smart / "X.QRY").write_text(".I 1\n.W\nWhat about\nbodies?\n.I 2\n.W\nNever judged\n")
    (smart / "X.REL").write_text("     1     2\t0\t0.000000\n     1     1\t0\t0.000000\n")
    ds = judged.load(smart, "anything")
    assert ds.corpus == {"1": ("First title", "Body one continues."), "2": ("Second", "Body two")}
    assert ds.queries == {"1": "What about bodies?"} and ds.qrels == {"1": {"2": 1, "1": 1}}
