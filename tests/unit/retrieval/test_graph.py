"""Knowledge-graph mode without the service: the local extractor on tricky sentences, graph rows in a
real SQLite store (written with the chunks, replaced and deleted with them), hop expansion, scoring
and access control inside the traversal."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from llmo.core.errors import ServiceError
from llmo.retrieval.graph import DECAY, RELATION_WEIGHT, GraphRetriever, link, query_keys
from llmo.retrieval.graph.extract import RELATED_TO, chunk_graphs, extract, normalise, sentences
from llmo.retrieval.storage import ChunkGraph, ChunkRow, CollectionRow, DocumentRow, RetrievalStore, now_us


def _relations(text: str) -> set[tuple[str, str, str]]:
    return {(r.subject, r.predicate, r.object) for r in extract(text).relations}


# --- extractor -------------------------------------------------------------------------------


def test_sentences_skip_abbreviations_initials_and_dotted_acronyms() -> None:
    text = "Dr. Smith met J. K. Rowling at the U.S. Embassy. Then they left!\n\n# Heading\nNext line here."
    assert [text[s:e] for s, e in sentences(text)] == [
        "Dr. Smith met J. K. Rowling at the U.S. Embassy.", "Then they left!", "# Heading", "Next line here."]


def test_proper_nouns_titles_initials_connectors_and_acronyms() -> None:
    found = extract("Dr. Smith met J. K. Rowling at the Bank of England. NASA launched Apollo with IBM and AT&T. "
                    "Johnson & Johnson sells soap to the U.S. Army.")
    assert found.entities == {
        "smith": "Smith", "j. k. rowling": "J. K. Rowling", "bank of england": "Bank of England", "nasa": "NASA",
        "apollo": "Apollo", "ibm": "IBM", "at&t": "AT&T", "johnson & johnson": "Johnson & Johnson",
        "us army": "U.S. Army"}


def test_sentence_start_needs_repetition_and_stop_words_never_join() -> None:
    # "Paris" opens its sentence once: not an entity; "Acme" opens one but is written capitalised twice
    found = extract("Paris is lovely. Acme builds rockets. The engineers of Acme are proud. However Zeta Labs won.")
    assert set(found.entities) == {"acme", "zeta labs"}
    # a sentence-initial word also written in lower case is a common noun, even when repeated
    assert "researchers" not in extract("Researchers agree. Researchers disagree. Many researchers left.").entities
    assert "researchers" in extract("Researchers agree. Researchers disagree.").entities
    # months, weekdays and capitalised stop words split runs
    assert set(extract("We met Alice In Wonderland on Monday in March.").entities) == {"alice", "wonderland"}


def test_possessives_are_stripped_and_end_runs() -> None:
    found = extract("Acme Corp's CEO joined Acme Corp in May. The CEO's office is at Acme Corp.")
    assert found.entities == {"acme corp": "Acme Corp", "ceo": "CEO"}
    assert normalise("Acme’s") == "acme" and normalise("The  Hague") == "hague" and normalise("U.S.") == "us"


def test_multiword_noun_phrases_need_repetition() -> None:
    found = extract("A knowledge graph stores facts. We query the knowledge graph daily. Vector search is fast.")
    assert found.entities == {"knowledge graph": "knowledge graph"}


def test_display_name_is_the_most_frequent_surface_form() -> None:
    found = extract("We use ACME tools. Acme ships them. Buy from Acme today.")
    assert found.entities == {"acme": "Acme"}


def test_predicates_are_the_verb_phrase_before_the_object() -> None:
    assert _relations("We know Acme Corp acquired Widgets Inc in 2019.") == {("acme corp", "acquired", "widgets inc")}
    assert _relations("We saw that Paris is the capital of France.") == {("paris", "is capital of", "france")}
    assert _relations("Yesterday Acme employs Bob.") == {("acme", "employs", "bob")}
    # no verb between: related_to; a verb in another gap than the one before the object: related_to
    assert _relations("We met Alice and Bob founded Zeta Labs.") == {
        ("alice", RELATED_TO, "bob"), ("bob", "founded", "zeta labs"), ("alice", "founded", "zeta labs")}
    assert _relations("We know Alice founded Acme with Bob.") == {
        ("alice", "founded", "acme"), ("acme", RELATED_TO, "bob"), ("alice", RELATED_TO, "bob")}
    # a possessive subject's next word is not taken for a verb
    assert _relations("We like Acme's products with Roadrunner.") == {("acme", RELATED_TO, "roadrunner")}
    # relations stay inside one sentence
    assert _relations("We met Alice there. Then Bob stayed home with Carol.") == {("bob", "stayed home with", "carol")}


def test_long_gaps_keep_only_the_verb_group_and_its_preposition() -> None:
    assert _relations("We hear Alice was quietly working for many long years at Acme.") == {
        ("alice", "was quietly working at", "acme")}


def test_chunks_hold_only_what_lies_wholly_inside_them() -> None:
    text = "We know Alice founded Acme. Acme hired Bob Stone."
    cut = text.index(" Acme hired")
    first, second, whole = chunk_graphs(text, [(0, cut), (cut + 1, len(text)), (0, len(text))])
    assert first == ChunkGraph({"alice": "Alice", "acme": "Acme"}, [("alice", "founded", "acme")])
    assert second == ChunkGraph({"acme": "Acme", "bob stone": "Bob Stone"}, [("acme", "hired", "bob stone")])
    assert set(whole.relations) == {("alice", "founded", "acme"), ("acme", "hired", "bob stone")}
    # a chunk cutting a sentence keeps no relation whose object lies outside it
    half = text.index("Acme.")
    assert chunk_graphs(text, [(0, half)]) == [ChunkGraph({"alice": "Alice"}, [])]


def test_query_spans_link_to_the_longest_known_entity() -> None:
    spans = query_keys("who did marie curie work with")
    assert (13, 24, "curie work") not in spans and (8, 19, "marie curie") in spans
    known = {"marie curie": 1, "curie": 2, "work": 3}
    assert link(spans, known) == [1, 3]
    assert link(query_keys("the of and"), known) == []


# --- store and retriever -----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RetrievalStore]:
    s = RetrievalStore.open(f"sqlite:///{tmp_path / 'graph.db'}")
    try:
        yield s
    finally:
        s.close()


def _collection(store: RetrievalStore, *, graph: bool = True) -> int:
    stamp = now_us()
    return store.create_collection(CollectionRow(
        pk=0, uid=uuid.uuid4().hex, tenant="t", collection_id=uuid.uuid4().hex[:8], display_name="", description="",
        labels={}, embedding_model="all-MiniLM-L6-v2", chunk_size=256, chunk_overlap=32, strategy=3, etag="e",
        create_request_id="", generation=1, create_us=stamp, update_us=stamp, knowledge_graph_enabled=graph,
        entity_extractor="local" if graph else "")).pk


def _ingest(store: RetrievalStore, pk: int, did: str, texts: list[str], *, acl: list[str] | None = None,
            **metadata: object) -> None:
    text = "\n\n".join(texts)
    spans, at = [], 0
    for t in texts:
        spans.append((at, at + len(t)))
        at += len(t) + 2
    chunks = [ChunkRow(idx=i, text=t, heading_path=[], start_offset=s, end_offset=e, token_count=1,
                       embedding=b"\0" * 1536, graph=g)
              for i, (t, (s, e), g) in enumerate(zip(texts, spans, chunk_graphs(text, spans), strict=True))]
    store.replace_document(pk, DocumentRow(document_id=did, content_sha256=uuid.uuid4().hex * 2, size_bytes=len(text),
                                           mime_type="text/plain", display_name="", source_uri="",
                                           metadata=dict(metadata), acl=acl or [], chunks=chunks))


def _texts(store: RetrievalStore, pk: int, hits: list) -> list[str]:  # type: ignore[type-arg]
    rows = store.chunks_by_id(pk, [h.chunk_id for h in hits])
    return [rows[h.chunk_id][0].text for h in hits]


def _search(store: RetrievalStore, pk: int, query: str, *, principals: frozenset[str] = frozenset(),
            hops: int = 1, k: int = 10, keep: object = None) -> list:  # type: ignore[type-arg]
    matches = (lambda m: m.get("tier") == keep) if keep else (lambda m: True)
    return GraphRetriever(store).search(pk, query, principals=principals, matches=matches, max_hops=hops, k=k)


CHAIN = ["We know Alice Smith founded Acme Corp.", "Later Acme Corp acquired Widget Works.",
         "Then Widget Works hired Bob Jones.", "Meanwhile Bob Jones married Carol King."]


def test_hops_expand_the_reached_entities_and_scores_decay(store: RetrievalStore) -> None:
    pk = _collection(store)
    _ingest(store, pk, "chain", CHAIN)
    one = _search(store, pk, "what did alice smith do", hops=1)
    assert _texts(store, pk, one) == [CHAIN[0], CHAIN[1]]
    # chunk 0: Alice (d0) + Acme (d1) + the relation between them (min distance 0)
    assert one[0].score == pytest.approx(1 + DECAY + RELATION_WEIGHT)
    assert one[0].matched_entities == ["Alice Smith", "Acme Corp"]
    assert one[0].relations == [("Alice Smith", "founded", "Acme Corp")]
    # chunk 1 only mentions Acme at distance 1; its relation leads to distance 2, beyond one hop
    assert one[1].score == pytest.approx(DECAY) and one[1].relations == []
    three = _search(store, pk, "what did alice smith do", hops=3)
    assert _texts(store, pk, three) == CHAIN
    assert [h.score for h in three] == pytest.approx([
        1 + DECAY + RELATION_WEIGHT, DECAY + DECAY**2 + RELATION_WEIGHT * DECAY,
        DECAY**2 + DECAY**3 + RELATION_WEIGHT * DECAY**2, DECAY**3])
    assert three[3].relations == [] and three[3].matched_entities == ["Bob Jones"]
    assert _texts(store, pk, _search(store, pk, "alice smith", hops=3, k=2)) == CHAIN[:2]
    assert _search(store, pk, "nothing known here") == []


def test_denied_documents_neither_surface_nor_shorten_paths(store: RetrievalStore) -> None:
    pk = _collection(store)
    _ingest(store, pk, "chain", CHAIN)
    # a secret shortcut from Alice straight to Carol, readable by the board only
    _ingest(store, pk, "secret", ["We know Alice Smith secretly funds Carol King and Project Falcon."],
            acl=["group:board"])
    public = _search(store, pk, "alice smith", hops=1, principals=frozenset({"user:ann"}))
    assert _texts(store, pk, public) == CHAIN[:2]
    assert all("Carol King" not in h.matched_entities and "Project Falcon" not in h.matched_entities for h in public)
    assert all(r[1] != "secretly funds" for h in public for r in h.relations)
    assert _search(store, pk, "project falcon", principals=frozenset({"user:ann"})) == []
    board = _search(store, pk, "alice smith", hops=1, principals=frozenset({"group:board"}))
    assert _texts(store, pk, board)[0].startswith("We know Alice Smith secretly")
    assert CHAIN[3] in _texts(store, pk, board)  # Carol at distance 1 through the secret relation


def test_filters_apply_inside_the_traversal_before_k(store: RetrievalStore) -> None:
    pk = _collection(store)
    _ingest(store, pk, "gold", ["We know Alice Smith founded Acme Corp."], tier="gold")
    _ingest(store, pk, "free", ["We know Alice Smith advises Zeta Labs.", "We know Alice Smith likes Zeta Labs."],
            tier="free")
    hits = _search(store, pk, "alice smith", k=1, keep="gold")
    assert _texts(store, pk, hits) == ["We know Alice Smith founded Acme Corp."]


def test_graph_rows_are_replaced_and_deleted_with_the_document(store: RetrievalStore) -> None:
    pk = _collection(store)
    _ingest(store, pk, "a", ["We know Alice Smith founded Acme Corp."])
    _ingest(store, pk, "b", ["We know Bob Jones joined Acme Corp."])
    assert store.graph_counts(pk) == (3, 4, 2)
    _ingest(store, pk, "a", ["We know Dana Scott runs Acme Corp."])
    assert store.graph_counts(pk) == (3, 4, 2)  # Alice is gone with her only mention
    assert store.entities_by_key(pk, ["alice smith", "dana scott", "acme corp"]).keys() == {"dana scott", "acme corp"}
    assert _search(store, pk, "alice smith") == []
    assert store.delete_document(pk, "a")
    assert store.graph_counts(pk) == (2, 2, 1)
    store.delete_collection("t", _collection_id(store, pk), force=True, etag="")
    assert store.graph_counts(pk) == (0, 0, 0)


def _collection_id(store: RetrievalStore, pk: int) -> str:
    with store.engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT collection_id FROM collections WHERE pk = :pk"), {"pk": pk}).scalar())


def test_a_failed_replacement_leaves_the_previous_graph_whole(store: RetrievalStore) -> None:
    pk = _collection(store)
    _ingest(store, pk, "a", ["We know Alice Smith founded Acme Corp."])
    before = store.graph_counts(pk)
    # the second chunk names an entity it does not mention: refused after the first chunk's rows went in
    bad = [ChunkRow(idx=0, text="x", heading_path=[], start_offset=0, end_offset=1, token_count=1,
                    embedding=b"\0" * 1536, graph=ChunkGraph({"dana scott": "Dana Scott"}, [])),
           ChunkRow(idx=1, text="y", heading_path=[], start_offset=2, end_offset=3, token_count=1,
                    embedding=b"\0" * 1536, graph=ChunkGraph({"zed": "Zed"}, [("zed", "knows", "nobody")]))]
    with pytest.raises(ValueError, match="does not mention"):
        store.replace_document(pk, DocumentRow(document_id="a", content_sha256="0" * 64, size_bytes=3,
                                               mime_type="text/plain", display_name="", source_uri="", metadata={},
                                               acl=[], chunks=bad))
    assert store.graph_counts(pk) == before
    assert _texts(store, pk, _search(store, pk, "alice smith")) == ["We know Alice Smith founded Acme Corp."]
    assert store.entities_by_key(pk, ["dana scott", "zed"]) == {}


def test_collections_without_a_graph_refuse_graph_search(store: RetrievalStore) -> None:
    pk = _collection(store, graph=False)
    with pytest.raises(ServiceError) as raised:
        _search(store, pk, "alice")
    assert raised.value.reason == "KNOWLEDGE_GRAPH_DISABLED"
