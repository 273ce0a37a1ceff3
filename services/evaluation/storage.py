"""Store of record of the evaluation service (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Datasets and their examples, rubric versions (with the G-Eval steps generated once per rubric
content), gates, runs, the snapshot of a dataset each run evaluates (`run_items`: a run survives
its dataset being edited or deleted, and resumes on the same examples after a restart), per-example
run results, and every score the service produced (`scores`) with the event that announces it.

Nothing scored is lost on a crash: a run's example result, its counters and its scores are written
in one transaction; a score's `scored` event is published from the `scores` row afterwards and the
row marked published, so a crash in between republishes it on the next start with the same event
id (JetStream's duplicate window and the consumers' idempotency drop the repeat). Online scoring
records the request it scored in `scored_requests` in the same transaction, so a redelivered
completion event is not scored twice. Every method blocks; callers run them off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from llmo.core import storage as core_storage

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("dataset_id", sa.String(63), nullable=False),
    sa.Column("display_name", sa.String(1024), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("etag", sa.String(64), nullable=False),
    # Bumped by every change to the dataset's examples (the etag changes with it).
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("create_request_id", sa.String(128), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("tenant", "dataset_id", name="uq_datasets_tenant_id"),
)

examples = sa.Table(
    "examples",
    metadata,
    sa.Column("dataset_pk", _ID, sa.ForeignKey("datasets.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("example_id", sa.String(63), primary_key=True),
    # evaluation_pb2.Example without name and timestamps.
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
)

rubrics = sa.Table(
    "rubrics",
    metadata,
    sa.Column("tenant", sa.String(256), primary_key=True),
    sa.Column("rubric_id", sa.String(63), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # evaluation_pb2.Rubric
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
)

rubric_steps = sa.Table(
    "rubric_steps",
    metadata,
    sa.Column("tenant", sa.String(256), primary_key=True),
    sa.Column("rubric_hash", sa.String(64), primary_key=True),
    sa.Column("steps", sa.JSON, nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
)

gates = sa.Table(
    "gates",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("gate_id", sa.String(63), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # evaluation_pb2.Gate: display_name and conditions
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("update_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("tenant", "gate_id", name="uq_gates_tenant_id"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("pk", _ID, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("run_id", sa.String(63), nullable=False),
    sa.Column("dataset_id", sa.String(63), nullable=False),
    # evaluation_pb2.Run with what the caller set (display name, dataset, metrics, judge, target, gates, labels).
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("examples_total", sa.BigInteger, nullable=False),
    sa.Column("examples_completed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("examples_failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, server_default="0"),
    # evaluation_pb2.Run holding only summaries and gate_results.
    sa.Column("outcome", sa.LargeBinary, nullable=False, server_default=""),
    sa.Column("error_reason", sa.String(128), nullable=False, server_default=""),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("create_request_id", sa.String(128), nullable=False),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
    sa.Column("start_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("end_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.UniqueConstraint("tenant", "run_id", name="uq_runs_tenant_id"),
    sa.Index("ix_runs_tenant_created", "tenant", "create_us"),
    sa.Index("ix_runs_state", "state"),
)

run_items = sa.Table(
    "run_items",
    metadata,
    sa.Column("run_pk", _ID, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("example_id", sa.String(63), primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # the Example as it was when the run was created
)

run_results = sa.Table(
    "run_results",
    metadata,
    sa.Column("run_pk", _ID, sa.ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True),
    sa.Column("example_id", sa.String(63), primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # evaluation_pb2.RunResult
    sa.Column("failed", sa.Boolean, nullable=False),
    # Failed a metric, or a metric with a pass threshold did not pass.
    sa.Column("flagged", sa.Boolean, nullable=False),
)

scores = sa.Table(
    "scores",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(256), nullable=False, unique=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # online, run, evaluate
    sa.Column("metric", sa.String(128), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("prompt_version", sa.String(256), nullable=False),
    sa.Column("request_id", sa.String(256), nullable=False),
    sa.Column("occurred_us", sa.BigInteger, nullable=False),
    sa.Column("published", sa.Boolean, nullable=False),
    sa.Column("event", sa.LargeBinary, nullable=False),  # events_pb2.EvaluationScored
    sa.Index("ix_scores_drift", "tenant", "source", "metric", "occurred_us"),
    sa.Index("ix_scores_unpublished", "published", "id"),
)

scored_requests = sa.Table(
    "scored_requests",
    metadata,
    sa.Column("tenant", sa.String(256), primary_key=True),
    sa.Column("source", sa.String(16), primary_key=True),  # router, inference
    sa.Column("request_id", sa.String(256), primary_key=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("prompt_version", sa.String(256), nullable=False),
    sa.Column("input_chars", sa.Integer, nullable=False),
    sa.Column("output_chars", sa.Integer, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),  # float32 MiniLM vector of the input
    sa.Column("occurred_us", sa.BigInteger, nullable=False),
    sa.Index("ix_scored_requests_time", "tenant", "occurred_us"),
)

drift_alerts = sa.Table(
    "drift_alerts",
    metadata,
    sa.Column("tenant", sa.String(256), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("prompt_version", sa.String(256), primary_key=True),
    sa.Column("metric", sa.String(128), primary_key=True),
    sa.Column("window_start_us", sa.BigInteger, primary_key=True),
    sa.Column("event_id", sa.String(256), nullable=False),
    sa.Column("create_us", sa.BigInteger, nullable=False),
)

_IN_BATCH = 500
ACTIVE_STATES = (1, 2)  # RUN_STATE_PENDING, RUN_STATE_RUNNING
TERMINAL_STATES = (3, 4, 5)


def now_us() -> int:
    return time.time_ns() // 1000


class AlreadyExists(Exception):
    pass


class EtagMismatch(Exception):
    pass


class InUse(Exception):
    pass


class Full(Exception):
    pass


@dataclass
class DatasetRow:
    pk: int
    tenant: str
    dataset_id: str
    display_name: str
    description: str
    labels: dict[str, str]
    etag: str
    version: int
    create_request_id: str
    create_us: int
    update_us: int
    example_count: int = 0


@dataclass
class ExampleRow:
    example_id: str
    body: bytes
    create_us: int = 0
    update_us: int = 0


@dataclass
class GateRow:
    gate_id: str
    body: bytes
    etag: str
    create_us: int
    update_us: int


@dataclass
class RubricRow:
    rubric_id: str
    version: int
    body: bytes
    content_hash: str
    create_us: int


@dataclass
class RunRow:
    pk: int
    tenant: str
    run_id: str
    dataset_id: str
    spec: bytes
    state: int
    examples_total: int
    examples_completed: int
    examples_failed: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    outcome: bytes
    error_reason: str
    error_message: str
    cancel_requested: bool
    create_request_id: str
    fingerprint: str
    create_us: int
    start_us: int
    end_us: int


@dataclass(frozen=True)
class ScoreRow:
    """A score to record with the `scored` event announcing it."""

    event_id: str
    tenant: str
    source: str
    metric: str
    score: float
    model: str
    prompt_version: str
    request_id: str
    occurred_us: int
    event: bytes


@dataclass(frozen=True)
class ScoredRequest:
    """What online scoring keeps of a live request for input-feature drift."""

    tenant: str
    source: str
    request_id: str
    model: str
    prompt_version: str
    input_chars: int
    output_chars: int
    embedding: bytes
    occurred_us: int


@dataclass
class ExampleOutcome:
    """One scored example of a run: its result and what it spent, written in one transaction."""

    example_id: str
    body: bytes
    failed: bool
    flagged: bool
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    scores: list[ScoreRow] = field(default_factory=list)


def _dataset(row: Any, example_count: int = 0) -> DatasetRow:
    m = row._mapping
    return DatasetRow(pk=m["pk"], tenant=m["tenant"], dataset_id=m["dataset_id"], display_name=m["display_name"],
                      description=m["description"], labels=dict(m["labels"] or {}), etag=m["etag"],
                      version=m["version"], create_request_id=m["create_request_id"], create_us=m["create_us"],
                      update_us=m["update_us"], example_count=example_count)


def _run(row: Any) -> RunRow:
    return RunRow(**{c.name: row._mapping[c.name] for c in runs.columns})


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _IN_BATCH):
        yield values[start:start + _IN_BATCH]


class EvaluationStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> EvaluationStore:
        engine = core_storage.create_engine(url)
        core_storage.migrate(engine, MIGRATIONS)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- datasets ------------------------------------------------------------------------------

    def create_dataset(self, row: DatasetRow) -> DatasetRow:
        """Insert; an existing id raises AlreadyExists unless `create_request_id` matches (a retry)."""
        values = {c.name: getattr(row, c.name) for c in datasets.columns if c.name != "pk"}
        try:
            with self.engine.begin() as conn:
                key = conn.execute(datasets.insert().values(**values)).inserted_primary_key
                assert key is not None
                row.pk = int(key[0])
                return row
        except sa.exc.IntegrityError:
            existing = self.get_dataset(row.tenant, row.dataset_id)
            if existing is not None and row.create_request_id and existing.create_request_id == row.create_request_id:
                return existing
            raise AlreadyExists(row.dataset_id) from None

    def _example_counts(self, conn: Connection, pks: Sequence[int]) -> dict[int, int]:
        if not pks:
            return {}
        q = sa.select(examples.c.dataset_pk, sa.func.count()).where(
            examples.c.dataset_pk.in_(pks)).group_by(examples.c.dataset_pk)
        return {int(pk): int(n) for pk, n in conn.execute(q)}

    def _dataset_row(self, conn: Connection, tenant: str, dataset_id: str, *, lock: bool = False) -> Any:
        q = sa.select(datasets).where(datasets.c.tenant == tenant, datasets.c.dataset_id == dataset_id)
        return conn.execute(q.with_for_update() if lock else q).first()

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRow | None:
        with self.engine.connect() as conn:
            row = self._dataset_row(conn, tenant, dataset_id)
            if row is None:
                return None
            return _dataset(row, self._example_counts(conn, [row.pk]).get(row.pk, 0))

    def list_datasets(self, tenant: str, after: str, limit: int) -> list[DatasetRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(datasets).where(
                datasets.c.tenant == tenant, datasets.c.dataset_id > after
            ).order_by(datasets.c.dataset_id).limit(limit)).all()
            counts = self._example_counts(conn, [r.pk for r in rows])
            return [_dataset(r, counts.get(r.pk, 0)) for r in rows]

    def update_dataset(self, tenant: str, dataset_id: str, changes: dict[str, Any], etag: str,
                       new_etag: str) -> DatasetRow | None:
        with self.engine.begin() as conn:
            row = self._dataset_row(conn, tenant, dataset_id, lock=True)
            if row is None:
                return None
            if etag and etag != row.etag:
                raise EtagMismatch(row.etag)
            conn.execute(datasets.update().where(datasets.c.pk == row.pk).values(
                **changes, etag=new_etag, update_us=now_us()))
            updated = self._dataset_row(conn, tenant, dataset_id)
            return _dataset(updated, self._example_counts(conn, [row.pk]).get(row.pk, 0))

    def delete_dataset(self, tenant: str, dataset_id: str, etag: str) -> bool:
        """False when absent; EtagMismatch; InUse while a PENDING or RUNNING run reads it."""
        with self.engine.begin() as conn:
            row = self._dataset_row(conn, tenant, dataset_id, lock=True)
            if row is None:
                return False
            if etag and etag != row.etag:
                raise EtagMismatch(row.etag)
            active = conn.execute(sa.select(sa.func.count()).select_from(runs).where(
                runs.c.tenant == tenant, runs.c.dataset_id == dataset_id, runs.c.state.in_(ACTIVE_STATES))).scalar_one()
            if active:
                raise InUse(dataset_id)
            conn.execute(examples.delete().where(examples.c.dataset_pk == row.pk))
            conn.execute(datasets.delete().where(datasets.c.pk == row.pk))
            return True

    def _touch(self, conn: Connection, dataset_pk: int, new_etag: str) -> None:
        conn.execute(datasets.update().where(datasets.c.pk == dataset_pk).values(
            version=datasets.c.version + 1, etag=new_etag, update_us=now_us()))

    # --- examples ------------------------------------------------------------------------------

    def add_examples(self, tenant: str, dataset_id: str, rows: Sequence[ExampleRow], new_etag: str, *,
                     max_examples: int) -> list[ExampleRow] | None:
        """Insert all or none; None when the dataset is absent; AlreadyExists(example id) on a taken id;
        Full past `max_examples`."""
        with self.engine.begin() as conn:
            dataset = self._dataset_row(conn, tenant, dataset_id, lock=True)
            if dataset is None:
                return None
            have = self._example_counts(conn, [dataset.pk]).get(dataset.pk, 0)
            if have + len(rows) > max_examples:
                raise Full(str(max_examples))
            ids = [r.example_id for r in rows]
            taken: list[str] = []
            for part in _chunks(ids):
                taken += conn.execute(sa.select(examples.c.example_id).where(
                    examples.c.dataset_pk == dataset.pk, examples.c.example_id.in_(part))).scalars().all()
            if taken:
                raise AlreadyExists(sorted(taken)[0])
            stamp = now_us()
            for r in rows:
                r.create_us = r.update_us = stamp
            conn.execute(examples.insert(), [{"dataset_pk": dataset.pk, "example_id": r.example_id, "body": r.body,
                                              "create_us": stamp, "update_us": stamp} for r in rows])
            self._touch(conn, dataset.pk, new_etag)
            return list(rows)

    def get_example(self, tenant: str, dataset_id: str, example_id: str) -> ExampleRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(examples).join(datasets, datasets.c.pk == examples.c.dataset_pk).where(
                datasets.c.tenant == tenant, datasets.c.dataset_id == dataset_id,
                examples.c.example_id == example_id)).first()
            return None if row is None else ExampleRow(row.example_id, row.body, row.create_us, row.update_us)

    def list_examples(self, tenant: str, dataset_id: str, after: str, limit: int | None) -> list[ExampleRow] | None:
        """Ordered by id; None when the dataset is absent."""
        with self.engine.connect() as conn:
            dataset = self._dataset_row(conn, tenant, dataset_id)
            if dataset is None:
                return None
            q = sa.select(examples).where(examples.c.dataset_pk == dataset.pk, examples.c.example_id > after
                                          ).order_by(examples.c.example_id)
            if limit is not None:
                q = q.limit(limit)
            return [ExampleRow(r.example_id, r.body, r.create_us, r.update_us) for r in conn.execute(q)]

    def update_example(self, tenant: str, dataset_id: str, example_id: str, body: bytes,
                       new_etag: str) -> ExampleRow | None:
        with self.engine.begin() as conn:
            dataset = self._dataset_row(conn, tenant, dataset_id, lock=True)
            if dataset is None:
                return None
            stamp = now_us()
            done = conn.execute(examples.update().where(
                examples.c.dataset_pk == dataset.pk, examples.c.example_id == example_id
            ).values(body=body, update_us=stamp)).rowcount
            if not done:
                return None
            self._touch(conn, dataset.pk, new_etag)
            row = conn.execute(sa.select(examples).where(
                examples.c.dataset_pk == dataset.pk, examples.c.example_id == example_id)).one()
            return ExampleRow(row.example_id, row.body, row.create_us, row.update_us)

    def delete_example(self, tenant: str, dataset_id: str, example_id: str, new_etag: str) -> bool:
        with self.engine.begin() as conn:
            dataset = self._dataset_row(conn, tenant, dataset_id, lock=True)
            if dataset is None:
                return False
            done = conn.execute(examples.delete().where(
                examples.c.dataset_pk == dataset.pk, examples.c.example_id == example_id)).rowcount
            if done:
                self._touch(conn, dataset.pk, new_etag)
            return bool(done)

    # --- rubrics -------------------------------------------------------------------------------

    def publish_rubric(self, tenant: str, rubric_id: str, body: bytes, content_hash: str) -> tuple[RubricRow, bool]:
        """The next version, or the latest one unchanged when its content hash equals `content_hash`."""
        for _ in range(3):  # a concurrent publish of the same rubric takes the version: read again
            latest = self.get_rubric(tenant, rubric_id, 0)
            if latest is not None and latest.content_hash == content_hash:
                return latest, False
            row = RubricRow(rubric_id, (latest.version if latest else 0) + 1, body, content_hash, now_us())
            try:
                with self.engine.begin() as conn:
                    conn.execute(rubrics.insert().values(tenant=tenant, rubric_id=rubric_id, version=row.version,
                                                         body=body, content_hash=content_hash,
                                                         create_us=row.create_us))
                return row, True
            except sa.exc.IntegrityError:
                continue
        raise RuntimeError(f"rubric {rubric_id} kept changing while it was published")

    def get_rubric(self, tenant: str, rubric_id: str, version: int) -> RubricRow | None:
        """`version` 0 means the latest."""
        q = sa.select(rubrics).where(rubrics.c.tenant == tenant, rubrics.c.rubric_id == rubric_id)
        q = q.where(rubrics.c.version == version) if version else q.order_by(rubrics.c.version.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else RubricRow(row.rubric_id, row.version, row.body, row.content_hash, row.create_us)

    def list_rubrics(self, tenant: str, after: str, limit: int) -> list[RubricRow]:
        """The latest version of each rubric, by id."""
        latest = sa.select(rubrics.c.rubric_id, sa.func.max(rubrics.c.version).label("version")).where(
            rubrics.c.tenant == tenant, rubrics.c.rubric_id > after).group_by(rubrics.c.rubric_id).subquery()
        q = sa.select(rubrics).join(latest, sa.and_(rubrics.c.rubric_id == latest.c.rubric_id,
                                                    rubrics.c.version == latest.c.version)).where(
            rubrics.c.tenant == tenant).order_by(rubrics.c.rubric_id).limit(limit)
        with self.engine.connect() as conn:
            return [RubricRow(r.rubric_id, r.version, r.body, r.content_hash, r.create_us) for r in conn.execute(q)]

    def get_steps(self, tenant: str, rubric_hash: str) -> list[str] | None:
        with self.engine.connect() as conn:
            steps = conn.execute(sa.select(rubric_steps.c.steps).where(
                rubric_steps.c.tenant == tenant, rubric_steps.c.rubric_hash == rubric_hash)).scalar()
        return None if steps is None else [str(s) for s in steps]

    def put_steps(self, tenant: str, rubric_hash: str, steps: list[str]) -> list[str]:
        """Store the steps unless some are stored already; returns the stored ones (first writer wins)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(rubric_steps.insert().values(tenant=tenant, rubric_hash=rubric_hash, steps=steps,
                                                          create_us=now_us()))
            return steps
        except sa.exc.IntegrityError:
            return self.get_steps(tenant, rubric_hash) or steps

    # --- gates ---------------------------------------------------------------------------------

    def create_gate(self, tenant: str, row: GateRow) -> GateRow:
        try:
            with self.engine.begin() as conn:
                conn.execute(gates.insert().values(tenant=tenant, gate_id=row.gate_id, body=row.body, etag=row.etag,
                                                   create_us=row.create_us, update_us=row.update_us))
            return row
        except sa.exc.IntegrityError:
            raise AlreadyExists(row.gate_id) from None

    def get_gate(self, tenant: str, gate_id: str) -> GateRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(gates).where(gates.c.tenant == tenant, gates.c.gate_id == gate_id)).first()
        return None if row is None else GateRow(row.gate_id, row.body, row.etag, row.create_us, row.update_us)

    def list_gates(self, tenant: str, after: str, limit: int) -> list[GateRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(gates).where(gates.c.tenant == tenant, gates.c.gate_id > after)
                                .order_by(gates.c.gate_id).limit(limit)).all()
        return [GateRow(r.gate_id, r.body, r.etag, r.create_us, r.update_us) for r in rows]

    def update_gate(self, tenant: str, gate_id: str, body: bytes, etag: str, new_etag: str) -> GateRow | None:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(gates).where(gates.c.tenant == tenant, gates.c.gate_id == gate_id)
                               .with_for_update()).first()
            if row is None:
                return None
            if etag and etag != row.etag:
                raise EtagMismatch(row.etag)
            stamp = now_us()
            conn.execute(gates.update().where(gates.c.pk == row.pk).values(body=body, etag=new_etag, update_us=stamp))
            return GateRow(gate_id, body, new_etag, row.create_us, stamp)

    def delete_gate(self, tenant: str, gate_id: str, etag: str) -> bool:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(gates).where(gates.c.tenant == tenant, gates.c.gate_id == gate_id)
                               .with_for_update()).first()
            if row is None:
                return False
            if etag and etag != row.etag:
                raise EtagMismatch(row.etag)
            conn.execute(gates.delete().where(gates.c.pk == row.pk))
            return True

    # --- runs ----------------------------------------------------------------------------------

    def create_run(self, row: RunRow, items: Sequence[ExampleRow], *, max_active: int) -> tuple[RunRow, bool]:
        """Insert the run and its snapshot of examples; returns (run, created). A retry with the same
        request id and fingerprint returns the first call's run; AlreadyExists for a taken id; Full
        when the tenant has `max_active` PENDING or RUNNING runs."""
        values = {c.name: getattr(row, c.name) for c in runs.columns if c.name != "pk"}
        try:
            with self.engine.begin() as conn:
                if row.create_request_id:
                    again = conn.execute(sa.select(runs).where(
                        runs.c.tenant == row.tenant, runs.c.create_request_id == row.create_request_id,
                        runs.c.fingerprint == row.fingerprint)).first()
                    if again is not None:
                        return _run(again), False
                active = conn.execute(sa.select(sa.func.count()).select_from(runs).where(
                    runs.c.tenant == row.tenant, runs.c.state.in_(ACTIVE_STATES))).scalar_one()
                if active >= max_active:
                    raise Full(str(max_active))
                key = conn.execute(runs.insert().values(**values)).inserted_primary_key
                assert key is not None
                row.pk = int(key[0])
                for part in _chunks(list(items)):
                    conn.execute(run_items.insert(), [{"run_pk": row.pk, "example_id": i.example_id, "body": i.body}
                                                      for i in part])
                return row, True
        except sa.exc.IntegrityError:
            raise AlreadyExists(row.run_id) from None

    def get_run(self, tenant: str, run_id: str) -> RunRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.tenant == tenant, runs.c.run_id == run_id)).first()
        return None if row is None else _run(row)

    def run_by_pk(self, pk: int) -> RunRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.pk == pk)).first()
        return None if row is None else _run(row)

    def list_runs(self, tenant: str, *, before: tuple[int, int] | None, limit: int, dataset_id: str = "",
                  state: int = 0) -> list[RunRow]:
        """Newest first; `before` is the (create_us, pk) of the last run of the previous page."""
        q = sa.select(runs).where(runs.c.tenant == tenant)
        if dataset_id:
            q = q.where(runs.c.dataset_id == dataset_id)
        if state:
            q = q.where(runs.c.state == state)
        if before is not None:
            q = q.where(sa.or_(runs.c.create_us < before[0],
                               sa.and_(runs.c.create_us == before[0], runs.c.pk < before[1])))
        with self.engine.connect() as conn:
            return [_run(r) for r in conn.execute(q.order_by(runs.c.create_us.desc(), runs.c.pk.desc()).limit(limit))]

    def active_runs(self) -> list[RunRow]:
        """Every PENDING or RUNNING run, oldest first (resumed after a restart)."""
        with self.engine.connect() as conn:
            return [_run(r) for r in conn.execute(sa.select(runs).where(runs.c.state.in_(ACTIVE_STATES))
                                                  .order_by(runs.c.create_us, runs.c.pk))]

    def request_cancel(self, tenant: str, run_id: str) -> RunRow | None:
        """Flag an active run for cancellation (a PENDING one is cancelled at once)."""
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.tenant == tenant, runs.c.run_id == run_id,
                                             runs.c.state == 1).values(state=5, cancel_requested=True,
                                                                       end_us=now_us()))
            conn.execute(runs.update().where(runs.c.tenant == tenant, runs.c.run_id == run_id,
                                             runs.c.state == 2).values(cancel_requested=True))
        return self.get_run(tenant, run_id)

    def mark_running(self, pk: int) -> bool:
        """PENDING -> RUNNING (start time kept from a previous start); False when no longer PENDING or RUNNING."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(runs.c.state, runs.c.start_us).where(runs.c.pk == pk)).first()
            if row is None or row.state not in ACTIVE_STATES:
                return False
            conn.execute(runs.update().where(runs.c.pk == pk).values(state=2, start_us=row.start_us or now_us()))
            return True

    def finish_run(self, pk: int, state: int, outcome: bytes, error_reason: str = "", error_message: str = "") -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.pk == pk, runs.c.state.in_(ACTIVE_STATES)).values(
                state=state, outcome=outcome, error_reason=error_reason, error_message=error_message,
                end_us=now_us()))

    def set_outcome(self, pk: int, outcome: bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.pk == pk).values(outcome=outcome))

    def pending_items(self, run_pk: int) -> list[ExampleRow]:
        """The run's examples that have no result yet, by id."""
        done = sa.select(run_results.c.example_id).where(run_results.c.run_pk == run_pk)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(run_items).where(
                run_items.c.run_pk == run_pk, run_items.c.example_id.not_in(done)).order_by(run_items.c.example_id))
            return [ExampleRow(r.example_id, r.body) for r in rows]

    def record_example(self, run_pk: int, outcome: ExampleOutcome) -> bool:
        """Write one example's result, the run's counters and the scores in one transaction; False
        when the example already has a result (a resumed run scored it before the crash)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(run_results.insert().values(run_pk=run_pk, example_id=outcome.example_id,
                                                         body=outcome.body, failed=outcome.failed,
                                                         flagged=outcome.flagged))
                conn.execute(runs.update().where(runs.c.pk == run_pk).values(
                    examples_completed=runs.c.examples_completed + (0 if outcome.failed else 1),
                    examples_failed=runs.c.examples_failed + (1 if outcome.failed else 0),
                    input_tokens=runs.c.input_tokens + outcome.input_tokens,
                    output_tokens=runs.c.output_tokens + outcome.output_tokens,
                    cost_micros=runs.c.cost_micros + outcome.cost_micros))
                self._insert_scores(conn, outcome.scores)
            return True
        except sa.exc.IntegrityError:
            return False

    def results(self, run_pk: int, *, after: str = "", limit: int | None = None,
                only_flagged: bool = False) -> list[tuple[str, bytes]]:
        q = sa.select(run_results.c.example_id, run_results.c.body).where(
            run_results.c.run_pk == run_pk, run_results.c.example_id > after)
        if only_flagged:
            q = q.where(sa.or_(run_results.c.failed, run_results.c.flagged))
        q = q.order_by(run_results.c.example_id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [(r.example_id, r.body) for r in conn.execute(q)]

    # --- scores and events ---------------------------------------------------------------------

    def _insert_scores(self, conn: Connection, rows: Sequence[ScoreRow]) -> None:
        if rows:
            conn.execute(scores.insert(), [{**row.__dict__, "published": False} for row in rows])

    def record_scores(self, rows: Sequence[ScoreRow], request: ScoredRequest | None = None) -> bool:
        """Record scores (and the live request they score) at once; False when `request` was scored
        before (a redelivered event) or a score's event id exists."""
        try:
            with self.engine.begin() as conn:
                if request is not None:
                    conn.execute(scored_requests.insert().values(**request.__dict__))
                self._insert_scores(conn, rows)
            return True
        except sa.exc.IntegrityError:
            return False

    def was_scored(self, tenant: str, source: str, request_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(scored_requests.c.request_id).where(
                scored_requests.c.tenant == tenant, scored_requests.c.source == source,
                scored_requests.c.request_id == request_id)).first() is not None

    def unpublished(self, limit: int) -> list[tuple[int, str, bytes]]:
        """(id, event id, EvaluationScored bytes) of the oldest scores whose event is not yet in the outbox."""
        with self.engine.connect() as conn:
            return [(r.id, r.event_id, r.event) for r in conn.execute(
                sa.select(scores.c.id, scores.c.event_id, scores.c.event).where(scores.c.published == sa.false())
                .order_by(scores.c.id).limit(limit))]

    def mark_published(self, ids: Sequence[int]) -> None:
        with self.engine.begin() as conn:
            for part in _chunks(list(ids)):
                conn.execute(scores.update().where(scores.c.id.in_(part)).values(published=True))

    def score_values(self, *, tenant: str, metric: str, start_us: int, end_us: int, model: str = "",
                     prompt_version: str = "", source: str = "online") -> list[float]:
        """Scores of live traffic in [start, end), all tenants when `tenant` is empty."""
        q = sa.select(scores.c.score).where(scores.c.source == source, scores.c.metric == metric,
                                            scores.c.occurred_us >= start_us, scores.c.occurred_us < end_us)
        if tenant:
            q = q.where(scores.c.tenant == tenant)
        if model:
            q = q.where(scores.c.model == model)
        if prompt_version:
            q = q.where(scores.c.prompt_version == prompt_version)
        with self.engine.connect() as conn:
            return [float(v) for v in conn.execute(q).scalars()]

    def scored_inputs(self, *, tenant: str, start_us: int, end_us: int, model: str = "",
                      prompt_version: str = "") -> list[tuple[int, int, bytes]]:
        """(input chars, output chars, input embedding) of live requests scored in [start, end)."""
        q = sa.select(scored_requests.c.input_chars, scored_requests.c.output_chars, scored_requests.c.embedding
                      ).where(scored_requests.c.occurred_us >= start_us, scored_requests.c.occurred_us < end_us)
        if tenant:
            q = q.where(scored_requests.c.tenant == tenant)
        if model:
            q = q.where(scored_requests.c.model == model)
        if prompt_version:
            q = q.where(scored_requests.c.prompt_version == prompt_version)
        with self.engine.connect() as conn:
            return [(int(a), int(b), bytes(e)) for a, b, e in conn.execute(q)]

    def drift_groups(self, start_us: int) -> list[tuple[str, str, str, str]]:
        """(tenant, model, prompt version, metric) of live scores since `start_us`."""
        q = sa.select(scores.c.tenant, scores.c.model, scores.c.prompt_version, scores.c.metric).where(
            scores.c.source == "online", scores.c.occurred_us >= start_us).distinct()
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]

    def claim_drift_alert(self, tenant: str, model: str, prompt_version: str, metric: str, window_start_us: int,
                          event_id: str, *, dry_run: bool = False) -> bool:
        """True the first time a drift of this group and window is claimed; `dry_run` only checks."""
        key = dict(tenant=tenant, model=model, prompt_version=prompt_version, metric=metric,
                   window_start_us=window_start_us)
        if dry_run:
            with self.engine.connect() as conn:
                return conn.execute(sa.select(drift_alerts.c.event_id).where(
                    *(drift_alerts.c[k] == v for k, v in key.items()))).first() is None
        try:
            with self.engine.begin() as conn:
                conn.execute(drift_alerts.insert().values(**key, event_id=event_id, create_us=now_us()))
            return True
        except sa.exc.IntegrityError:
            return False
