"""The retrieval service with `backend=pgvector` over a real PostgreSQL with pgvector (pgserver, a
server in a temp dir, requirements/dev.txt), real gRPC and the real MiniLM model: the three search
modes, metadata filters decided exactly as the local backend decides them, the access-control
canary (also after access lists change through UpdateDocumentAccess), writes visible to the next
search without any rebuild, two replicas sharing one index, and a database written by the local
backend taken over by pgvector."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2

from llmo.core.storage import create_engine
from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from llmo.retrieval.main import start
from llmo.retrieval.settings import RetrievalSettings
from tests.integration.test_retrieval_access import _service, access_canary
from tests.integration.test_retrieval_service import (
    A,
    _code,
    _create,
    _doc,
    _docs_of,
    _ingest,
    _search,
    _settings,
)
from tests.unit.retrieval.corpus import PLAIN

MODES = (pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID)


@pytest.fixture(scope="session")
def pgvector_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        with warnings.catch_warnings():  # platformdirs warns that XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
        server = pgserver.get_server(tmp_path_factory.mktemp("pgvector") / "pgdata", cleanup_mode="delete")
    except Exception as error:  # no wheel for this platform, or the server cannot run here
        pytest.skip(f"pgserver (PostgreSQL with pgvector) cannot start on this machine: {error!r}")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(pgvector_server: Any) -> str:
    """A fresh database on the pgvector server (no extension installed yet)."""
    name = f"t{uuid.uuid4().hex[:12]}"
    admin = create_engine(pgvector_server.get_uri(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return str(pgvector_server.get_uri(name))


def _pg_settings(url: str, data: Path, **knobs: Any) -> RetrievalSettings:
    return _settings(url, data).model_copy(update={"backend": "pgvector", **knobs})


def _rows(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() or 0)
    finally:
        engine.dispose()


def _value(v: Any) -> struct_pb2.Value:
    if isinstance(v, bool):
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, int | float):
        return struct_pb2.Value(number_value=v)
    return struct_pb2.Value(string_value=v)


def _filter(key: str, op: int, *values: Any) -> pb.MetadataFilter:
    return pb.MetadataFilter(key=key, operator=op, values=[_value(v) for v in values])  # type: ignore[arg-type]


async def test_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LLMO_RETRIEVAL_BACKEND='faiss' is not a backend"):
        await start(_settings("", tmp_path).model_copy(update={"backend": "faiss"}), port=0, metrics=False)
    with pytest.raises(ValueError, match="pgvector needs a PostgreSQL database"):
        await start(_settings("", tmp_path).model_copy(update={"backend": "pgvector"}), port=0, metrics=False)


async def test_modes_acl_canary_and_unsupported_rerank(pg_url: str, tmp_path: Path) -> None:
    secret = "Project nightingale merger: the acquisition price is ninety million for nightingale"
    eng = "Nightingale build pipeline notes for engineers"
    async with _service(_pg_settings(pg_url, tmp_path)) as (running, stub):
        for cid in ("acl", "control"):
            await _create(stub, cid)
        public = [_doc(f"pub{i}", t) for i, t in enumerate(PLAIN)]
        await _ingest(stub, "acl", [*public, _doc("secret", secret, acl=["user:ceo", "group:board"]),
                                    _doc("eng", eng, acl=["group:eng"])])
        await _ingest(stub, "control", [*public, _doc("eng", eng, acl=["group:eng"])])
        for mode in MODES:
            assert _docs_of(await _search(stub, "control", "flightless birds of the south", mode=mode))[0] == "pub1"
            assert _docs_of(await _search(stub, "control", "baking a cake with eggs", mode=mode))[0] == "pub2"
        reply = await _search(stub, "control", "penguins", mode=pb.SEARCH_MODE_HYBRID)
        assert reply.results[0].dense_rank >= 1 and reply.results[0].sparse_rank == 1
        assert [s.stage for s in reply.stages][:5] == ["index", "embed", "dense", "sparse", "fusion"]

        query = "nightingale acquisition price merger"
        alice = pb.Principal(subject="user:alice", groups=["group:eng"])
        for mode in MODES:
            for principal in (alice, pb.Principal(), pb.Principal(subject="user:ceo-assistant", groups=["group:boards"])):
                denied = await _search(stub, "acl", query, mode=mode, top_k=100, principal=principal)
                control = await _search(stub, "control", query, mode=mode, top_k=100, principal=principal)
                assert "secret" not in _docs_of(denied)
                assert all("ninety million" not in r.chunk.text for r in denied.results)
                assert denied.candidates_considered == control.candidates_considered
                assert _docs_of(denied) == _docs_of(control), mode
                assert [r.score for r in denied.results] == pytest.approx([r.score for r in control.results])
            for principal in (pb.Principal(subject="user:ceo"), pb.Principal(subject="user:bob", groups=["group:board"])):
                allowed = await _search(stub, "acl", query, mode=mode, principal=principal)
                assert _docs_of(allowed)[0] == "secret", (mode, principal)
        assert _docs_of(await _search(stub, "acl", "nightingale", top_k=100, mode=pb.SEARCH_MODE_SPARSE)) == []

        code = await _code(_search(stub, "acl", "nightingale", rerank=pb.RerankOptions(enabled=True)))
        assert code == (grpc.StatusCode.FAILED_PRECONDITION, "RERANKER_UNAVAILABLE")
        assert running.indexes.builds == 0  # no local index was ever built


async def test_filters_decide_as_the_local_backend(pg_url: str, tmp_path: Path) -> None:
    """Every filter kind, through SQL (and, for the ones SQL cannot say exactly, through the
    predicate): DENSE with top_k 100 returns every allowed chunk, so the documents and counts must
    equal the local backend's. `hnsw_exact_below=0` sends every dense search through the HNSW path
    (and its exact fallback), which must lose nothing either."""
    docs = [
        _doc("d0", PLAIN[0], team="ops", year=2019, tags=["science", "earth"], author={"team": "geo"}, rating=4.5,
             title="Alpha"),
        _doc("d1", PLAIN[1], team="eng", year=2021, tags=["birds"], author={"team": "bio"}, flag=True, title="beta"),
        _doc("d2", PLAIN[2], team="ops", year=2023, tags=[], codes=[1, 2], title="Gamma"),
        _doc("d3", PLAIN[3], year="2020", team=None),
        _doc("d4", "Penguin colonies of the ops team", acl=["group:x"], team="ops", year=2024, tags=["birds"]),
    ]
    eq, ne, in_, not_in = (pb.FILTER_OPERATOR_EQUAL, pb.FILTER_OPERATOR_NOT_EQUAL, pb.FILTER_OPERATOR_IN,
                           pb.FILTER_OPERATOR_NOT_IN)
    lt, lte, gt, exists = (pb.FILTER_OPERATOR_LESS_THAN, pb.FILTER_OPERATOR_LESS_THAN_OR_EQUAL,
                           pb.FILTER_OPERATOR_GREATER_THAN, pb.FILTER_OPERATOR_EXISTS)
    cases = [
        [], [_filter("team", eq, "ops")], [_filter("team", ne, "ops")], [_filter("tags", in_, "science", "birds")],
        [_filter("tags", not_in, "science")], [_filter("year", gt, 2020)], [_filter("rating", lte, 4.5)],
        [_filter("author.team", exists)], [_filter("author.team", eq, "bio")], [_filter("flag", eq, True)],
        [_filter("year", eq, 2021)], [_filter("codes", eq, 1)], [_filter("flag", eq, 1)], [_filter("team", exists)],
        [_filter("title", lt, "Beta")],  # strings in order: decided by the predicate
        [_filter("codes.0", exists)],  # a numeric path part: decided by the predicate (not an array index)
        [_filter("team", eq, "ops"), _filter("year", gt, 2020)], [_filter("missing", not_in, "x")],
    ]
    principals = [pb.Principal(), pb.Principal(subject="user:y", groups=["group:x"])]
    results: dict[str, dict[tuple[int, int], tuple[list[str], int]]] = {}
    for backend, url, data in (("local", "", tmp_path / "local"), ("pgvector", pg_url, tmp_path / "pg")):
        settings = _settings(url, data).model_copy(update={"backend": backend, "hnsw_exact_below": 0})
        async with _service(settings) as (_, stub):
            await _create(stub, "f")
            await _ingest(stub, "f", docs)
            out = results.setdefault(backend, {})
            for i, filters in enumerate(cases):
                for j, principal in enumerate(principals):
                    reply = await _search(stub, "f", "animals and science", mode=pb.SEARCH_MODE_DENSE, top_k=100,
                                          filters=filters, principal=principal)
                    out[i, j] = (sorted(_docs_of(reply)), reply.candidates_considered)
    assert results["pgvector"] == results["local"]
    assert results["pgvector"][1, 1] == (["d0", "d2", "d4"], 3)  # team == ops, with group:x
    assert results["pgvector"][5, 0] == (["d1", "d2"], 2)  # year > 2020: "2020" is no number
    assert results["pgvector"][0, 0][1] == 4 and results["pgvector"][0, 1][1] == 5


async def test_writes_are_visible_at_once_without_rebuild(pg_url: str, tmp_path: Path) -> None:
    async with _service(_pg_settings(pg_url, tmp_path)) as (running, stub):
        await _create(stub, "live")
        await _ingest(stub, "live", [_doc(f"p{i}", t) for i, t in enumerate(PLAIN)])
        assert _docs_of(await _search(stub, "live", "penguins", mode=pb.SEARCH_MODE_SPARSE)) == ["p1"]
        # new content replaces the old chunks and their search rows in one transaction
        await _ingest(stub, "live", [_doc("p1", "Glaciers carve valleys slowly over thousands of years")])
        assert _docs_of(await _search(stub, "live", "penguins", mode=pb.SEARCH_MODE_SPARSE)) == []
        assert _docs_of(await _search(stub, "live", "glaciers valleys", mode=pb.SEARCH_MODE_SPARSE)) == ["p1"]
        assert _docs_of(await _search(stub, "live", "ice carving valleys", mode=pb.SEARCH_MODE_DENSE, top_k=1)) == ["p1"]
        # a new access list alone (same content: no re-embedding) applies to the next search
        await _ingest(stub, "live", [_doc("p1", "Glaciers carve valleys slowly over thousands of years",
                                          acl=["group:geo"])])
        assert _docs_of(await _search(stub, "live", "glaciers valleys", mode=pb.SEARCH_MODE_SPARSE)) == []
        assert (await _search(stub, "live", "glaciers", mode=pb.SEARCH_MODE_DENSE, top_k=100)).candidates_considered == 3
        await stub.DeleteDocument(pb.DeleteDocumentRequest(name="collections/live/documents/p0"), metadata=A)
        assert "p0" not in _docs_of(await _search(stub, "live", "volcanoes magma", top_k=100))
        assert _rows(pg_url, "chunk_vectors") == _rows(pg_url, "chunks") == 3
        await stub.DeleteCollection(pb.DeleteCollectionRequest(name="collections/live", force=True), metadata=A)
        assert _rows(pg_url, "chunk_vectors") == 0
        assert running.indexes.builds == 0


async def test_two_replicas_share_one_index(pg_url: str, tmp_path: Path) -> None:
    async with _service(_pg_settings(pg_url, tmp_path / "a")) as (_, one), \
            _service(_pg_settings(pg_url, tmp_path / "b")) as (_, two):
        await _create(one, "shared")
        await _ingest(one, "shared", [_doc(f"p{i}", t) for i, t in enumerate(PLAIN)])
        for mode in MODES:
            assert _docs_of(await _search(two, "shared", "penguins flightless birds", mode=mode))[0] == "p1"
        await _ingest(two, "shared", [_doc("p4", "Penguins huddle together in the antarctic winter")])
        found = await _search(one, "shared", "penguins", mode=pb.SEARCH_MODE_SPARSE)
        assert sorted(_docs_of(found)) == ["p1", "p4"]
        await two.DeleteDocument(pb.DeleteDocumentRequest(name="collections/shared/documents/p1"), metadata=A)
        assert _docs_of(await _search(one, "shared", "penguins", mode=pb.SEARCH_MODE_SPARSE)) == ["p4"]


async def test_a_local_database_is_taken_over(pg_url: str, tmp_path: Path) -> None:
    """Written by the local backend (migration 0003 was a no-op: no extension yet), then served by
    pgvector: the table is created and filled from the stored vectors at start."""
    async with _service(_settings(pg_url, tmp_path / "local")) as (_, stub):
        await _create(stub, "old")
        await _ingest(stub, "old", [_doc(f"p{i}", t) for i, t in enumerate(PLAIN)])
    async with _service(_pg_settings(pg_url, tmp_path / "pg")) as (running, stub):
        assert _rows(pg_url, "chunk_vectors") == _rows(pg_url, "chunks") == len(PLAIN)
        for mode in MODES:
            assert _docs_of(await _search(stub, "old", "penguins flightless birds", mode=mode))[0] == "p1"
        assert running.indexes.builds == 0


async def test_access_update_canary(pg_url: str, tmp_path: Path) -> None:
    """UpdateDocumentAccess on pgvector: access lists are read from `documents` at query time, so a
    revoke or grant applies to the next search with nothing else written (scores compared too: no
    IDF here)."""
    await access_canary(_pg_settings(pg_url, tmp_path), exact_scores=True)
