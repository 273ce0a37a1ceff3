"""The visibility store on SQLite and PostgreSQL: the migration matches the tables the code uses, a crawl's
frontier and pages are written once however often a resumed crawl repeats a fetch, answers are stored once,
visits are idempotent, and deleting a project removes everything under it."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from llmo.visibility.storage import (
    AlreadyExists,
    AlreadyRunning,
    AnswerRow,
    CrawlRow,
    EventRow,
    JobsActive,
    PageOutcome,
    PageRow,
    ProjectRow,
    RunRow,
    TooManyActive,
    UrlVersion,
    VisibilityStore,
    VisitRow,
    metadata,
    now_us,
)

SUCCEEDED = 3


def _project(store: VisibilityStore, project_id: str = "p1", tenant: str = "t1") -> ProjectRow:
    stamp = now_us()
    return store.create_project(ProjectRow(0, tenant, project_id, b"", "e1", 1, "", stamp, stamp))


def _crawl(project_pk: int, crawl_id: str, request_id: str = "") -> CrawlRow:
    return CrawlRow(0, project_pk, crawl_id, b"", 1, 0, 0, 0, 0, 0, 0, b"", "", "", False, request_id, now_us(), 0, 0)


def _run(project_pk: int, run_id: str) -> RunRow:
    return RunRow(0, project_pk, run_id, b"", {"engines": []}, 1, 4, 0, 0, 0, 0, 0, b"", "", "", False, "", now_us(),
                  0, 0)


def _page(crawl_pk: int, page_id: str, overall: float) -> PageRow:
    return PageRow(crawl_pk, page_id, f"https://a.example/{page_id}", overall, False, b"", ["p"], b"", {}, now_us())


def test_the_migration_creates_exactly_the_tables_the_code_uses(database_url: str) -> None:
    store = VisibilityStore.open(database_url)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        store.close()


def test_crawls_record_each_url_once_and_resume_from_their_frontier(database_url: str) -> None:
    store = VisibilityStore.open(database_url)
    try:
        project = _project(store)
        with pytest.raises(AlreadyExists):
            _project(store)
        crawl = store.create_crawl(_crawl(project.pk, "c1", "req-1"), [("h0", "https://a.example/", 0)])
        assert (crawl.discovered, crawl.queued) == (1, 1)
        assert store.create_crawl(_crawl(project.pk, "c1", "req-1"), []).pk == crawl.pk  # a retry
        with pytest.raises(AlreadyRunning):
            store.create_crawl(_crawl(project.pk, "c2"), [])
        links = [("h1", "https://a.example/1", 1), ("h2", "https://a.example/2", 1), ("h0", "https://a.example/", 1)]
        version = UrlVersion("h0", "https://a.example/", 1, "hash", '"etag"', "", crawl.pk, "0000000000000000")
        outcome = PageOutcome("h0", "fetched", _page(crawl.pk, "0000000000000000", 50.0), version, links)
        store.record_page(crawl.pk, project.pk, outcome)
        store.record_page(crawl.pk, project.pk, outcome)  # a resumed crawl repeating the fetch: no effect
        row = store.crawl_by_pk(crawl.pk)
        assert row is not None and (row.discovered, row.fetched, row.queued) == (3, 1, 2)
        assert [u.url_hash for u in store.queued_urls(crawl.pk, 10)] == ["h1", "h2"]
        assert [u.url_hash for u in store.queued_urls(crawl.pk, 10, exclude=["h1"])] == ["h2"]
        store.record_page(crawl.pk, project.pk, PageOutcome("h1", "disallowed"))
        store.record_page(crawl.pk, project.pk, PageOutcome("h2", "failed", _page(crawl.pk, "1111111111111111", 0.0)))
        row = store.crawl_by_pk(crawl.pk)
        assert row is not None and (row.fetched, row.failed, row.disallowed, row.queued) == (1, 1, 1, 0)
        assert store.url_version(project.pk, "h0") == version
        event = EventRow("crawl_completed/t1/c1", "CrawlCompleted", b"x")
        store.finish_crawl(crawl.pk, SUCCEEDED, b"", event=event)
        store.finish_crawl(crawl.pk, SUCCEEDED, b"", event=event)
        assert [e.event_id for _, e in store.unpublished_events(10)] == ["crawl_completed/t1/c1"]
        assert store.latest_succeeded_crawl(project.pk) is not None
        pages = store.list_pages(crawl.pk, "score_desc", None, 1)
        assert [p.overall for p in pages] == [50.0]
        assert [p.overall for p in store.list_pages(crawl.pk, "score_desc", (50.0, pages[0].page_id), 5)] == [0.0]
    finally:
        store.close()


def test_answers_are_stored_once_and_projects_delete_with_everything(database_url: str) -> None:
    store = VisibilityStore.open(database_url)
    try:
        project = _project(store)
        run = store.create_run(_run(project.pk, "r1"), [project.pk], max_active=1)
        with pytest.raises(TooManyActive):
            store.create_run(_run(project.pk, "r2"), [project.pk], max_active=1)
        answer = AnswerRow(0, "engine-a", 0, False, b"a", {"mentioned": {"Acme": True}})
        assert store.record_answer(run.pk, answer, 10, 20, 5)
        assert not store.record_answer(run.pk, answer, 10, 20, 5)
        store.record_answer(run.pk, AnswerRow(0, "engine-b", 0, True, b"b", {}), 0, 0, 0)
        row = store.run_by_pk(run.pk)
        assert row is not None and (row.answers_completed, row.answers_failed, row.output_tokens, row.cost_micros) == (
            1, 1, 20, 5)
        assert store.answer_keys(run.pk) == {(0, "engine-a", 0), (0, "engine-b", 0)}
        assert [a.engine for a in store.run_answers(run.pk, after=(0, "engine-a", 0))] == ["engine-b"]
        visits = [VisitRow("v1", now_us(), "https://a.example/", "chatgpt", "", 1),
                  VisitRow("v2", now_us(), "https://a.example/", "", "GPTBot", 2)]
        assert store.record_visits(project.pk, visits) == (2, 0)
        assert store.record_visits(project.pk, visits) == (0, 2)
        with pytest.raises(JobsActive):
            store.delete_project("t1", "p1", "")
        store.finish_run(run.pk, SUCCEEDED, b"")
        assert store.delete_project("t1", "p1", "")
        assert store.get_project("t1", "p1") is None and store.run_by_pk(run.pk) is None
        assert store.run_answers(run.pk) == [] and store.visits_between(project.pk, 0, now_us() + 1) == []
    finally:
        store.close()
