"""The search's row cache (llmo.retrieval.search.RowCache) over real gRPC, SQLite and PostgreSQL and
the real MiniLM model: rows read for one search are served to the next from memory, and never once
their document changed: new content (SQLite hands a replaced last chunk its old id again), new
display name or metadata, a revoked access list, a deletion."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from llmo.protos.retrieval.v1 import retrieval_service_pb2 as pb
from tests.integration.test_retrieval_access import _service, _update
from tests.integration.test_retrieval_service import A, _create, _doc, _ingest, _search, _settings

OLD = "The Nightingale merger price is ninety million pounds, agreed in London."
NEW = "The Nightingale merger price is forty million euros, agreed in Paris."
OTHER = "Charles Babbage designed the Difference Engine in London."
ALICE = pb.Principal(subject="user:alice")


def _tier(value: str) -> pb.MetadataFilter:
    return pb.MetadataFilter(key="tier", operator=pb.FILTER_OPERATOR_EQUAL, values=[struct_pb2.Value(string_value=value)])


async def test_cached_rows_never_outlive_a_change(database_url: str, tmp_path: Path) -> None:
    async with _service(_settings(database_url, tmp_path)) as (running, stub):
        cache = running.searcher.row_cache
        await _create(stub, "rc")
        await _ingest(stub, "rc", [_doc("other", OTHER), _doc("deal", OLD, tier="gold")])  # "deal": the last chunk id

        async def deal(principal: pb.Principal = ALICE, **kw: object) -> list[pb.SearchResult]:
            reply = await _search(stub, "rc", "nightingale merger price", mode=pb.SEARCH_MODE_SPARSE,
                                  principal=principal, **kw)
            return [r for r in reply.results if r.chunk.document.endswith("/documents/deal")]

        first = await deal()
        assert [r.chunk.text for r in first] == [OLD]
        hits = cache.hits
        assert [r.chunk.text for r in await deal()] == [OLD]
        assert cache.hits > hits  # the second search read its rows from the cache

        # same content, new display name and metadata: an update of the document row only
        changed = _doc("deal", OLD, tier="silver")
        changed.display_name = "Project Nightingale"
        await _ingest(stub, "rc", [changed])
        (result,) = await deal()
        assert (result.chunk.document_display_name, dict(result.chunk.metadata)) == (
            "Project Nightingale", {"tier": "silver"})
        assert await deal(filters=[_tier("gold")]) == []
        assert [r.chunk.metadata["tier"] for r in await deal(filters=[_tier("silver")])] == ["silver"]

        # new content: the old chunk is deleted and the new one inserted (on SQLite, under the same id)
        await _ingest(stub, "rc", [_doc("deal", NEW, tier="silver")])
        texts = [r.chunk.text for r in await deal()]
        assert texts == [NEW] and not any("ninety" in t for t in texts)

        # a revoked access list, then a deletion
        assert [r.chunk.text for r in await deal()] == [NEW]
        await _update(stub, "collections/rc/documents/deal", ["user:ceo"])
        assert await deal() == []
        assert [r.chunk.text for r in await deal(pb.Principal(subject="user:ceo"))] == [NEW]
        await stub.DeleteDocument(pb.DeleteDocumentRequest(name="collections/rc/documents/deal"),
                                  metadata=A)
        assert await deal(pb.Principal(subject="user:ceo")) == []
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetDocument(pb.GetDocumentRequest(name="collections/rc/documents/deal"),
                                   metadata=A)


async def test_the_cache_is_bounded(database_url: str, tmp_path: Path) -> None:
    async with _service(_settings(database_url, tmp_path)) as (running, stub):
        cache = running.searcher.row_cache
        cache.entries = 2
        await _create(stub, "rc")
        await _ingest(stub, "rc", [_doc(f"d{i}", f"Nightingale merger note number {i}.") for i in range(5)])
        reply = await _search(stub, "rc", "nightingale merger", mode=pb.SEARCH_MODE_SPARSE, top_k=5)
        assert len(reply.results) == 5 and len(cache._rows) == 2
        again = await _search(stub, "rc", "nightingale merger", mode=pb.SEARCH_MODE_SPARSE, top_k=5)
        assert [r.chunk.name for r in again.results] == [r.chunk.name for r in reply.results]
