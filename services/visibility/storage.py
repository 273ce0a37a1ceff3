"""Store of record of the visibility service (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Projects; crawls with their frontier (the URLs found and whether each was fetched, so a crawl
resumes after a restart where it stopped) and their scored pages; the latest version of every URL a
project's crawls fetched (`url_versions`: content hash, ETag and Last-Modified for conditional
re-crawls, and where the latest page body lives); share-of-voice runs with every answer stored;
referral visits; and the events to announce (`events`), written in the same transaction as the
state they announce and moved to the outbox afterwards, so a crash never loses or invents one.

A page, its frontier row and its crawl's counters are written in one transaction, as are an answer
and its run's counters: a crash loses at most the fetches and answers in flight, which a resumed
job repeats. Every method blocks; callers run them off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from llmo.core import storage as core_storage

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("project_id", sa.String(63), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # visibility_pb2.Project without name, times, etag
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("query_set_version", sa.BigInteger, nullable=False),
    sa.Column("create_request_id", sa.String(128), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("tenant", "project_id", name="uq_projects_tenant_id"),
)

crawls = sa.Table(
    "crawls",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    sa.Column("project_pk", _ID, sa.ForeignKey("projects.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("crawl_id", sa.String(63), nullable=False),
    sa.Column("spec", sa.LargeBinary, nullable=False),  # visibility_pb2.Crawl: seed_urls and merged config
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("discovered", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("fetched", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("disallowed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("trapped", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unchanged", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("summary", sa.LargeBinary, nullable=False, server_default=""),  # visibility_pb2.CrawlSummary
    sa.Column("error_reason", sa.String(128), nullable=False, server_default=""),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("create_request_id", sa.String(128), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("start_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("end_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.UniqueConstraint("project_pk", "crawl_id", name="uq_crawls_project_id"),
    sa.Index("ix_crawls_state", "state"),
)

frontier = sa.Table(
    "frontier",
    metadata,
    sa.Column("crawl_pk", _ID, sa.ForeignKey("crawls.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("url_hash", sa.String(32), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),  # discovery order: the crawl is breadth-first
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("depth", sa.Integer, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False, server_default=""),  # fetched, failed, disallowed, ...
    sa.Index("ix_frontier_queue", "crawl_pk", "done", "seq"),
)

pages = sa.Table(
    "pages",
    metadata,
    sa.Column("crawl_pk", _ID, sa.ForeignKey("crawls.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("page_id", sa.String(16), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("overall", sa.Float, nullable=False),
    sa.Column("failed", sa.Boolean, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # visibility_pb2.Page with main_text
    # Self-contained passages of the main text and their float32 MiniLM vectors (rows of 384).
    sa.Column("passages", sa.JSON, nullable=False),
    sa.Column("embeddings", sa.LargeBinary, nullable=False),
    # Organization JSON-LD and brand mentions, for entity consistency and authority.
    sa.Column("entity", sa.JSON, nullable=False),
    sa.Column("fetch_us", sa.BigInteger, nullable=False),
    sa.Index("ix_pages_score", "crawl_pk", "overall", "page_id"),
)

url_versions = sa.Table(
    "url_versions",
    metadata,
    sa.Column("project_pk", _ID, sa.ForeignKey("projects.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("url_hash", sa.String(32), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("etag", sa.String(512), nullable=False),
    sa.Column("last_modified", sa.String(128), nullable=False),
    sa.Column("crawl_pk", _ID, nullable=False),
    sa.Column("page_id", sa.String(16), nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
)

runs = sa.Table(
    "sov_runs",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    sa.Column("project_pk", _ID, sa.ForeignKey("projects.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("run_id", sa.String(63), nullable=False),
    # visibility_pb2.ShareOfVoiceRun with the resolved engines, queries, samples and query_set_version.
    sa.Column("spec", sa.LargeBinary, nullable=False),
    # JSON: the resolved engines (name, model, base_url, surface, api_key_env) and query weights.
    sa.Column("plan", sa.JSON, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("answers_total", sa.BigInteger, nullable=False),
    sa.Column("answers_completed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("answers_failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, server_default="0"),
    # visibility_pb2.ShareOfVoiceRun with engine_shares, overall, changes and previous_run.
    sa.Column("outcome", sa.LargeBinary, nullable=False, server_default=""),
    sa.Column("error_reason", sa.String(128), nullable=False, server_default=""),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("create_request_id", sa.String(128), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("start_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("end_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.UniqueConstraint("project_pk", "run_id", name="uq_sov_runs_project_id"),
    sa.Index("ix_sov_runs_state", "state"),
)

answers = sa.Table(
    "answers",
    metadata,
    sa.Column("run_pk", _ID, sa.ForeignKey("sov_runs.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("query_index", sa.Integer, primary_key=True),
    sa.Column("engine", sa.String(63), primary_key=True),
    sa.Column("sample", sa.Integer, primary_key=True),
    sa.Column("failed", sa.Boolean, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # visibility_pb2.Answer without name
    # JSON of the mention analysis (mentioned, positions, cited per brand; citations).
    sa.Column("analysis", sa.JSON, nullable=False),
)

visits = sa.Table(
    "visits",
    metadata,
    sa.Column("project_pk", _ID, sa.ForeignKey("projects.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("visit_id", sa.String(128), primary_key=True),
    sa.Column("visit_us", sa.BigInteger, nullable=False),
    sa.Column("landing_url", sa.Text, nullable=False),
    sa.Column("engine", sa.String(32), nullable=False),  # referring answer engine, "" when none
    sa.Column("crawler", sa.String(64), nullable=False),  # AI crawler user-agent token, "" when none
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Index("ix_visits_time", "project_pk", "visit_us"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(256), nullable=False, unique=True),
    sa.Column("kind", sa.String(64), nullable=False),  # the events_pb2 message name
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("published", sa.Boolean, nullable=False),
    sa.Index("ix_events_unpublished", "published", "id"),
)

ACTIVE_STATES = (1, 2)  # JOB_STATE_PENDING, JOB_STATE_RUNNING
PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = 1, 2, 3, 4, 5


def now_us() -> int:
    return time.time_ns() // 1000


class AlreadyExists(Exception):
    pass


class EtagMismatch(Exception):
    pass


class JobsActive(Exception):
    pass


class AlreadyRunning(Exception):
    pass


class TooManyActive(Exception):
    pass


@dataclass
class ProjectRow:
    pk: int
    tenant: str
    project_id: str
    body: bytes
    etag: str
    query_set_version: int
    create_request_id: str
    create_us: int
    update_us: int


@dataclass
class CrawlRow:
    pk: int
    project_pk: int
    crawl_id: str
    spec: bytes
    state: int
    discovered: int
    fetched: int
    failed: int
    disallowed: int
    trapped: int
    unchanged: int
    summary: bytes
    error_reason: str
    error_message: str
    cancel_requested: bool
    create_request_id: str
    create_us: int
    start_us: int
    end_us: int
    queued: int = 0


@dataclass
class FrontierUrl:
    url_hash: str
    url: str
    depth: int


@dataclass
class PageRow:
    crawl_pk: int
    page_id: str
    url: str
    overall: float
    failed: bool
    body: bytes
    passages: list[str]
    embeddings: bytes
    entity: dict[str, Any]
    fetch_us: int


@dataclass
class UrlVersion:
    url_hash: str
    url: str
    version: int
    content_hash: str
    etag: str
    last_modified: str
    crawl_pk: int
    page_id: str


@dataclass
class RunRow:
    pk: int
    project_pk: int
    run_id: str
    spec: bytes
    plan: dict[str, Any]
    state: int
    answers_total: int
    answers_completed: int
    answers_failed: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    outcome: bytes
    error_reason: str
    error_message: str
    cancel_requested: bool
    create_request_id: str
    create_us: int
    start_us: int
    end_us: int


@dataclass
class AnswerRow:
    query_index: int
    engine: str
    sample: int
    failed: bool
    body: bytes
    analysis: dict[str, Any]


@dataclass
class VisitRow:
    visit_id: str
    visit_us: int
    landing_url: str
    engine: str
    crawler: str
    count: int


@dataclass(frozen=True)
class EventRow:
    event_id: str
    kind: str
    payload: bytes


@dataclass
class PageOutcome:
    """One fetched (or failed) URL of a crawl: the page, its frontier row, the URLs it links to and the
    counters it moves, written in one transaction."""

    url_hash: str
    outcome: str  # fetched, failed, disallowed, trapped, unchanged, skipped
    page: PageRow | None = None
    version: UrlVersion | None = None
    links: Sequence[tuple[str, str, int]] = ()  # (url_hash, url, depth)


def _row(cls: type[Any], table: sa.Table, row: Any, **extra: Any) -> Any:
    return cls(**{c.name: row._mapping[c.name] for c in table.columns}, **extra)


class VisibilityStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> VisibilityStore:
        engine = core_storage.create_engine(url)
        core_storage.migrate(engine, MIGRATIONS)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- projects ------------------------------------------------------------------------------

    def create_project(self, row: ProjectRow) -> ProjectRow:
        """Insert; an existing id raises AlreadyExists unless `create_request_id` matches (a retry)."""
        values = {c.name: getattr(row, c.name) for c in projects.columns if c.name != "pk"}
        try:
            with self.engine.begin() as conn:
                key = conn.execute(projects.insert().values(**values)).inserted_primary_key
                assert key is not None
                row.pk = int(key[0])
                return row
        except sa.exc.IntegrityError:
            existing = self.get_project(row.tenant, row.project_id)
            if existing is not None and row.create_request_id and existing.create_request_id == row.create_request_id:
                return existing
            raise AlreadyExists(row.project_id) from None

    def _project(self, conn: Connection, tenant: str, project_id: str, *, lock: bool = False) -> Any:
        q = sa.select(projects).where(projects.c.tenant == tenant, projects.c.project_id == project_id)
        return conn.execute(q.with_for_update() if lock else q).first()

    def get_project(self, tenant: str, project_id: str) -> ProjectRow | None:
        with self.engine.connect() as conn:
            row = self._project(conn, tenant, project_id)
            return None if row is None else _row(ProjectRow, projects, row)

    def project_by_pk(self, pk: int) -> ProjectRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(projects).where(projects.c.pk == pk)).first()
            return None if row is None else _row(ProjectRow, projects, row)

    def list_projects(self, tenant: str, after: str, limit: int) -> list[ProjectRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(projects).where(
                projects.c.tenant == tenant, projects.c.project_id > after
            ).order_by(projects.c.project_id).limit(limit)).all()
            return [_row(ProjectRow, projects, r) for r in rows]

    def update_project(self, tenant: str, project_id: str, body: bytes, etag: str, new_etag: str,
                       queries_changed: bool) -> ProjectRow | None:
        with self.engine.begin() as conn:
            row = self._project(conn, tenant, project_id, lock=True)
            if row is None:
                return None
            if etag and etag != row.etag:
                raise EtagMismatch(row.etag)
            version = row.query_set_version + (1 if queries_changed else 0)
            conn.execute(projects.update().where(projects.c.pk == row.pk).values(
                body=body, etag=new_etag, query_set_version=version, update_us=now_us()))
            return _row(ProjectRow, projects, self._project(conn, tenant, project_id))

    def delete_project(self, tenant: str, project_id: str, etag: str) -> bool:
        """False when absent; EtagMismatch; JobsActive while a crawl or run is PENDING or RUNNING."""
        with self.engine.begin() as conn:
            row = self._project(conn, tenant, project_id, lock=True)
            if row is None:
                return False
            if etag and etag != row.etag:
                raise EtagMismatch(row.etag)
            for table in (crawls, runs):
                active = conn.execute(sa.select(sa.func.count()).select_from(table).where(
                    table.c.project_pk == row.pk, table.c.state.in_(ACTIVE_STATES))).scalar_one()
                if active:
                    raise JobsActive(project_id)
            crawl_pks = sa.select(crawls.c.pk).where(crawls.c.project_pk == row.pk).scalar_subquery()
            run_pks = sa.select(runs.c.pk).where(runs.c.project_pk == row.pk).scalar_subquery()
            # Explicit deletes: SQLite enforces ON DELETE CASCADE only with its foreign-key pragma.
            conn.execute(frontier.delete().where(frontier.c.crawl_pk.in_(crawl_pks)))
            conn.execute(pages.delete().where(pages.c.crawl_pk.in_(crawl_pks)))
            conn.execute(answers.delete().where(answers.c.run_pk.in_(run_pks)))
            for table in (crawls, runs, url_versions, visits):
                conn.execute(table.delete().where(table.c.project_pk == row.pk))
            conn.execute(projects.delete().where(projects.c.pk == row.pk))
            return True

    # --- crawls --------------------------------------------------------------------------------

    def create_crawl(self, row: CrawlRow, seeds: Sequence[tuple[str, str, int]]) -> CrawlRow:
        """Insert with its seed URLs; AlreadyRunning when the project has an active crawl, AlreadyExists
        for a taken id (unless the request id matches: a retry returns the first crawl)."""
        with self.engine.begin() as conn:
            if row.create_request_id:
                same = conn.execute(sa.select(crawls).where(
                    crawls.c.project_pk == row.project_pk, crawls.c.create_request_id == row.create_request_id)).first()
                if same is not None:
                    return self._crawl_row(conn, same)
            taken = conn.execute(sa.select(crawls.c.pk).where(
                crawls.c.project_pk == row.project_pk, crawls.c.crawl_id == row.crawl_id)).first()
            if taken is not None:
                raise AlreadyExists(row.crawl_id)
            active = conn.execute(sa.select(sa.func.count()).select_from(crawls).where(
                crawls.c.project_pk == row.project_pk, crawls.c.state.in_(ACTIVE_STATES))).scalar_one()
            if active:
                raise AlreadyRunning(row.crawl_id)
            values = {c.name: getattr(row, c.name) for c in crawls.columns if c.name != "pk"}
            key = conn.execute(crawls.insert().values(**values)).inserted_primary_key
            assert key is not None
            row.pk = int(key[0])
            added = self._add_urls(conn, row.pk, seeds)
            conn.execute(crawls.update().where(crawls.c.pk == row.pk).values(discovered=added))
            row.discovered, row.queued = added, added
            return row

    def _crawl_row(self, conn: Connection, row: Any) -> CrawlRow:
        # Every frontier URL is discovered once and done once with one outcome, counted on the crawl (an
        # unchanged page is also a fetched one): what is neither is queued. Skipped URLs exist only once
        # the crawl has ended, when nothing is queued. No count over the frontier, however large.
        m = row._mapping
        queued = 0 if m["state"] not in ACTIVE_STATES else max(
            0, m["discovered"] - m["fetched"] - m["failed"] - m["disallowed"] - m["trapped"])
        return _row(CrawlRow, crawls, row, queued=queued)

    def get_crawl(self, project_pk: int, crawl_id: str) -> CrawlRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(crawls).where(
                crawls.c.project_pk == project_pk, crawls.c.crawl_id == crawl_id)).first()
            return None if row is None else self._crawl_row(conn, row)

    def crawl_by_pk(self, pk: int) -> CrawlRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(crawls).where(crawls.c.pk == pk)).first()
            return None if row is None else self._crawl_row(conn, row)

    def list_crawls(self, project_pk: int, before: tuple[int, str] | None, limit: int) -> list[CrawlRow]:
        """Newest first; `before` is the (create_us, crawl_id) of the last crawl of the previous page."""
        with self.engine.connect() as conn:
            q = sa.select(crawls).where(crawls.c.project_pk == project_pk)
            if before is not None:
                q = q.where(sa.or_(crawls.c.create_us < before[0], sa.and_(
                    crawls.c.create_us == before[0], crawls.c.crawl_id < before[1])))
            rows = conn.execute(q.order_by(crawls.c.create_us.desc(), crawls.c.crawl_id.desc()).limit(limit)).all()
            return [self._crawl_row(conn, r) for r in rows]

    def crawl_cancel_requested(self, pk: int) -> bool | None:
        """Whether a cancel was asked for (None: the crawl is gone), without counting its frontier."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(crawls.c.cancel_requested).where(crawls.c.pk == pk)).scalar_one_or_none()
            return None if value is None else bool(value)

    def latest_succeeded_crawl(self, project_pk: int) -> CrawlRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(crawls).where(
                crawls.c.project_pk == project_pk, crawls.c.state == SUCCEEDED,
            ).order_by(crawls.c.end_us.desc()).limit(1)).first()
            return None if row is None else self._crawl_row(conn, row)

    # --- job lifecycle, the same for crawls and runs -----------------------------------------------

    def _runnable(self, jobs: sa.Table) -> list[int]:
        """Pks of jobs to execute: RUNNING ones (interrupted by a restart) first, then PENDING, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.pk).where(jobs.c.state.in_(ACTIVE_STATES)).order_by(
                jobs.c.state.desc(), jobs.c.create_us)).all()
            return [int(r[0]) for r in rows]

    def _start(self, jobs: sa.Table, pk: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.pk == pk, jobs.c.state == PENDING).values(
                state=RUNNING, start_us=now_us()))

    def _request_cancel(self, jobs: sa.Table, pk: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.pk == pk, jobs.c.state.in_(ACTIVE_STATES)).values(
                cancel_requested=True))
            # A job nobody executes yet ends at once.
            conn.execute(jobs.update().where(jobs.c.pk == pk, jobs.c.state == PENDING).values(
                state=CANCELLED, end_us=now_us()))

    def runnable_crawls(self) -> list[int]:
        return self._runnable(crawls)

    def start_crawl(self, pk: int) -> None:
        self._start(crawls, pk)

    def request_crawl_cancel(self, pk: int) -> None:
        self._request_cancel(crawls, pk)

    def _add_urls(self, conn: Connection, crawl_pk: int, urls: Iterable[tuple[str, str, int]]) -> int:
        urls = list({h: (h, u, d) for h, u, d in urls}.values())
        if not urls:
            return 0
        known: set[str] = set()
        hashes = [h for h, _, _ in urls]
        for start in range(0, len(hashes), 500):
            known.update(r[0] for r in conn.execute(sa.select(frontier.c.url_hash).where(
                frontier.c.crawl_pk == crawl_pk, frontier.c.url_hash.in_(hashes[start:start + 500]))))
        fresh = [(h, u, d) for h, u, d in urls if h not in known]
        if not fresh:
            return 0
        seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(frontier.c.seq), 0)).where(
            frontier.c.crawl_pk == crawl_pk)).scalar_one()
        conn.execute(frontier.insert(), [
            {"crawl_pk": crawl_pk, "url_hash": h, "seq": seq + i + 1, "url": u, "depth": d, "done": False,
             "outcome": ""} for i, (h, u, d) in enumerate(fresh)])
        return len(fresh)

    def add_urls(self, crawl_pk: int, urls: Iterable[tuple[str, str, int]]) -> int:
        with self.engine.begin() as conn:
            added = self._add_urls(conn, crawl_pk, urls)
            if added:
                conn.execute(crawls.update().where(crawls.c.pk == crawl_pk).values(
                    discovered=crawls.c.discovered + added))
            return added

    def queued_urls(self, crawl_pk: int, limit: int, exclude: Sequence[str] = ()) -> list[FrontierUrl]:
        with self.engine.connect() as conn:
            q = sa.select(frontier.c.url_hash, frontier.c.url, frontier.c.depth).where(
                frontier.c.crawl_pk == crawl_pk, frontier.c.done == sa.false())
            if exclude:
                q = q.where(frontier.c.url_hash.notin_(list(exclude)))
            rows = conn.execute(q.order_by(frontier.c.seq).limit(limit)).all()
            return [FrontierUrl(url_hash=r[0], url=r[1], depth=r[2]) for r in rows]

    def fetched_hashes(self, crawl_pk: int) -> set[str]:
        """URL hashes of the crawl's frontier already done (any outcome)."""
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(frontier.c.url_hash).where(
                frontier.c.crawl_pk == crawl_pk, frontier.c.done == sa.true()))}

    def record_page(self, crawl_pk: int, project_pk: int, result: PageOutcome) -> None:
        """The URL's outcome, its page and version, its links and the crawl's counters, atomically."""
        self.record_pages(crawl_pk, project_pk, [result])

    def record_pages(self, crawl_pk: int, project_pk: int, results: Sequence[PageOutcome]) -> None:
        """`record_page` for several URLs in one transaction (all or none)."""
        with self.engine.begin() as conn:
            for result in results:
                self._record_page(conn, crawl_pk, project_pk, result)

    def _record_page(self, conn: Connection, crawl_pk: int, project_pk: int, result: PageOutcome) -> None:
        counter = {"fetched": "fetched", "unchanged": "fetched", "failed": "failed", "disallowed": "disallowed",
                   "trapped": "trapped"}.get(result.outcome)
        done = conn.execute(frontier.update().where(
            frontier.c.crawl_pk == crawl_pk, frontier.c.url_hash == result.url_hash,
            frontier.c.done == sa.false()).values(done=True, outcome=result.outcome)).rowcount
        if not done:
            return  # already recorded (a resumed crawl repeating a fetch)
        if result.page is not None:
            values = {c.name: getattr(result.page, c.name) for c in pages.columns}
            exists = conn.execute(sa.select(pages.c.page_id).where(
                pages.c.crawl_pk == crawl_pk, pages.c.page_id == result.page.page_id)).first()
            if exists is None:  # two URLs canonicalising to one page keep the first
                conn.execute(pages.insert().values(**values))
        if result.version is not None:
            v = result.version
            conn.execute(url_versions.delete().where(
                url_versions.c.project_pk == project_pk, url_versions.c.url_hash == v.url_hash))
            conn.execute(url_versions.insert().values(
                project_pk=project_pk, url_hash=v.url_hash, url=v.url, version=v.version,
                content_hash=v.content_hash, etag=v.etag, last_modified=v.last_modified, crawl_pk=v.crawl_pk,
                page_id=v.page_id, update_us=now_us()))
        added = self._add_urls(conn, crawl_pk, result.links)
        changes: dict[str, Any] = {}
        if counter:
            changes[counter] = getattr(crawls.c, counter) + 1
        if result.outcome == "unchanged":
            changes["unchanged"] = crawls.c.unchanged + 1
        if added:
            changes["discovered"] = crawls.c.discovered + added
        if changes:
            conn.execute(crawls.update().where(crawls.c.pk == crawl_pk).values(**changes))

    def skip_queued(self, crawl_pk: int) -> None:
        """Mark what is left in the frontier as not fetched (page limit reached)."""
        with self.engine.begin() as conn:
            conn.execute(frontier.update().where(frontier.c.crawl_pk == crawl_pk, frontier.c.done == sa.false()).values(
                done=True, outcome="skipped"))

    def url_version(self, project_pk: int, url_hash: str) -> UrlVersion | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(url_versions).where(
                url_versions.c.project_pk == project_pk, url_versions.c.url_hash == url_hash)).first()
            if row is None:
                return None
            m = row._mapping
            return UrlVersion(url_hash=m["url_hash"], url=m["url"], version=m["version"],
                              content_hash=m["content_hash"], etag=m["etag"], last_modified=m["last_modified"],
                              crawl_pk=m["crawl_pk"], page_id=m["page_id"])

    def finish_crawl(self, pk: int, state: int, summary: bytes, error_reason: str = "", error_message: str = "",
                     event: EventRow | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(crawls.update().where(crawls.c.pk == pk, crawls.c.state.in_(ACTIVE_STATES)).values(
                state=state, summary=summary, error_reason=error_reason, error_message=error_message,
                end_us=now_us()))
            if event is not None:
                self._add_event(conn, event)

    def set_crawl_summary(self, pk: int, summary: bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(crawls.update().where(crawls.c.pk == pk).values(summary=summary))

    # --- pages ---------------------------------------------------------------------------------

    def get_page(self, crawl_pk: int, page_id: str) -> PageRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(pages).where(pages.c.crawl_pk == crawl_pk, pages.c.page_id == page_id)).first()
            return None if row is None else _row(PageRow, pages, row)

    def list_pages(self, crawl_pk: int, order: str, after: tuple[Any, str] | None, limit: int) -> list[PageRow]:
        """`order` is url, score_asc or score_desc; `after` the (key, page_id) of the last row seen."""
        with self.engine.connect() as conn:
            q = sa.select(pages).where(pages.c.crawl_pk == crawl_pk)
            key = pages.c.url if order == "url" else pages.c.overall
            if after is not None:
                if order == "score_desc":
                    q = q.where(sa.or_(key < after[0], sa.and_(key == after[0], pages.c.page_id > after[1])))
                else:
                    q = q.where(sa.or_(key > after[0], sa.and_(key == after[0], pages.c.page_id > after[1])))
            q = q.order_by(key.desc() if order == "score_desc" else key, pages.c.page_id)
            return [_row(PageRow, pages, r) for r in conn.execute(q.limit(limit))]

    def set_page_embeddings(self, crawl_pk: int, vectors: dict[str, bytes]) -> None:
        """Store the passage vectors of pages crawled without them (page id -> float32 rows)."""
        with self.engine.begin() as conn:
            for page_id, blob in vectors.items():
                conn.execute(pages.update().where(pages.c.crawl_pk == crawl_pk, pages.c.page_id == page_id).values(
                    embeddings=blob))

    def crawl_pages(self, crawl_pk: int) -> list[PageRow]:
        with self.engine.connect() as conn:
            return [_row(PageRow, pages, r) for r in conn.execute(
                sa.select(pages).where(pages.c.crawl_pk == crawl_pk).order_by(pages.c.page_id))]

    # --- share-of-voice runs -------------------------------------------------------------------

    def create_run(self, row: RunRow, tenant_pks: Sequence[int], max_active: int) -> RunRow:
        with self.engine.begin() as conn:
            if row.create_request_id:
                same = conn.execute(sa.select(runs).where(
                    runs.c.project_pk == row.project_pk, runs.c.create_request_id == row.create_request_id)).first()
                if same is not None:
                    return _row(RunRow, runs, same)
            taken = conn.execute(sa.select(runs.c.pk).where(
                runs.c.project_pk == row.project_pk, runs.c.run_id == row.run_id)).first()
            if taken is not None:
                raise AlreadyExists(row.run_id)
            active = conn.execute(sa.select(sa.func.count()).select_from(runs).where(
                runs.c.project_pk.in_(list(tenant_pks)), runs.c.state.in_(ACTIVE_STATES))).scalar_one()
            if active >= max_active:
                raise TooManyActive(row.run_id)
            values = {c.name: getattr(row, c.name) for c in runs.columns if c.name != "pk"}
            key = conn.execute(runs.insert().values(**values)).inserted_primary_key
            assert key is not None
            row.pk = int(key[0])
            return row

    def tenant_project_pks(self, tenant: str) -> list[int]:
        with self.engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(sa.select(projects.c.pk).where(projects.c.tenant == tenant))]

    def get_run(self, project_pk: int, run_id: str) -> RunRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.project_pk == project_pk, runs.c.run_id == run_id)).first()
            return None if row is None else _row(RunRow, runs, row)

    def run_by_pk(self, pk: int) -> RunRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.pk == pk)).first()
            return None if row is None else _row(RunRow, runs, row)

    def list_runs(self, project_pk: int, before: tuple[int, str] | None, limit: int) -> list[RunRow]:
        with self.engine.connect() as conn:
            q = sa.select(runs).where(runs.c.project_pk == project_pk)
            if before is not None:
                q = q.where(sa.or_(runs.c.create_us < before[0], sa.and_(
                    runs.c.create_us == before[0], runs.c.run_id < before[1])))
            rows = conn.execute(q.order_by(runs.c.create_us.desc(), runs.c.run_id.desc()).limit(limit)).all()
            return [_row(RunRow, runs, r) for r in rows]

    def succeeded_runs(self, project_pk: int, start_us: int = 0, end_us: int | None = None) -> list[RunRow]:
        """Succeeded runs ordered by end time (oldest first)."""
        with self.engine.connect() as conn:
            q = sa.select(runs).where(runs.c.project_pk == project_pk, runs.c.state == SUCCEEDED,
                                      runs.c.end_us >= start_us)
            if end_us is not None:
                q = q.where(runs.c.end_us < end_us)
            return [_row(RunRow, runs, r) for r in conn.execute(q.order_by(runs.c.end_us, runs.c.pk))]

    def runnable_runs(self) -> list[int]:
        return self._runnable(runs)

    def start_run(self, pk: int) -> None:
        self._start(runs, pk)

    def request_run_cancel(self, pk: int) -> None:
        self._request_cancel(runs, pk)

    def answer_keys(self, run_pk: int) -> set[tuple[int, str, int]]:
        with self.engine.connect() as conn:
            return {(int(r[0]), str(r[1]), int(r[2])) for r in conn.execute(sa.select(
                answers.c.query_index, answers.c.engine, answers.c.sample).where(answers.c.run_pk == run_pk))}

    def record_answer(self, run_pk: int, answer: AnswerRow, input_tokens: int, output_tokens: int,
                      cost_micros: int) -> bool:
        """Store the answer and move the run's counters; False when it was already stored."""
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(answers.insert().values(
                        run_pk=run_pk, query_index=answer.query_index, engine=answer.engine, sample=answer.sample,
                        failed=answer.failed, body=answer.body, analysis=answer.analysis))
            except sa.exc.IntegrityError:
                return False
            counter = runs.c.answers_failed if answer.failed else runs.c.answers_completed
            conn.execute(runs.update().where(runs.c.pk == run_pk).values(
                **{counter.name: counter + 1}, input_tokens=runs.c.input_tokens + input_tokens,
                output_tokens=runs.c.output_tokens + output_tokens, cost_micros=runs.c.cost_micros + cost_micros))
            return True

    def run_answers(self, run_pk: int, after: tuple[int, str, int] | None = None,
                    limit: int | None = None) -> list[AnswerRow]:
        with self.engine.connect() as conn:
            q = sa.select(answers).where(answers.c.run_pk == run_pk)
            if after is not None:
                qi, engine, sample = after
                q = q.where(sa.or_(answers.c.query_index > qi, sa.and_(answers.c.query_index == qi, sa.or_(
                    answers.c.engine > engine, sa.and_(answers.c.engine == engine, answers.c.sample > sample)))))
            q = q.order_by(answers.c.query_index, answers.c.engine, answers.c.sample)
            if limit is not None:
                q = q.limit(limit)
            return [AnswerRow(query_index=r.query_index, engine=r.engine, sample=r.sample, failed=r.failed,
                              body=r.body, analysis=dict(r.analysis)) for r in conn.execute(q)]

    def finish_run(self, pk: int, state: int, outcome: bytes, error_reason: str = "", error_message: str = "",
                   events_: Sequence[EventRow] = ()) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.pk == pk, runs.c.state.in_(ACTIVE_STATES)).values(
                state=state, outcome=outcome, error_reason=error_reason, error_message=error_message,
                end_us=now_us()))
            for event in events_:
                self._add_event(conn, event)

    # --- referral visits -----------------------------------------------------------------------

    def record_visits(self, project_pk: int, rows: Sequence[VisitRow]) -> tuple[int, int]:
        """Insert visits whose id is new; returns (accepted, duplicates)."""
        rows = list({r.visit_id: r for r in rows}.values())
        in_call_duplicates = 0
        with self.engine.begin() as conn:
            known: set[str] = set()
            ids = [r.visit_id for r in rows]
            for start in range(0, len(ids), 500):
                known.update(r[0] for r in conn.execute(sa.select(visits.c.visit_id).where(
                    visits.c.project_pk == project_pk, visits.c.visit_id.in_(ids[start:start + 500]))))
            fresh = [r for r in rows if r.visit_id not in known]
            if fresh:
                conn.execute(visits.insert(), [
                    {"project_pk": project_pk, "visit_id": r.visit_id, "visit_us": r.visit_us,
                     "landing_url": r.landing_url, "engine": r.engine, "crawler": r.crawler, "count": r.count}
                    for r in fresh])
            return len(fresh), len(known) + in_call_duplicates

    def visits_between(self, project_pk: int, start_us: int, end_us: int) -> list[VisitRow]:
        with self.engine.connect() as conn:
            q = sa.select(visits).where(visits.c.project_pk == project_pk, visits.c.visit_us >= start_us,
                                        visits.c.visit_us < end_us).order_by(visits.c.visit_us)
            return [VisitRow(visit_id=r.visit_id, visit_us=r.visit_us, landing_url=r.landing_url, engine=r.engine,
                             crawler=r.crawler, count=r._mapping["count"]) for r in conn.execute(q)]

    # --- events --------------------------------------------------------------------------------

    def _add_event(self, conn: Connection, event: EventRow) -> None:
        exists = conn.execute(sa.select(events.c.id).where(events.c.event_id == event.event_id)).first()
        if exists is None:
            conn.execute(events.insert().values(event_id=event.event_id, kind=event.kind, payload=event.payload,
                                                published=False))

    def unpublished_events(self, limit: int) -> list[tuple[int, EventRow]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events).where(events.c.published == sa.false()).order_by(
                events.c.id).limit(limit)).all()
            return [(r.id, EventRow(event_id=r.event_id, kind=r.kind, payload=r.payload)) for r in rows]

    def mark_events_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(events.update().where(events.c.id.in_(list(ids))).values(published=True))
