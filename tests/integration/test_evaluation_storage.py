"""The evaluation store on SQLite and PostgreSQL: the migration matches the tables the code uses,
retries are recognised, a run's examples are a snapshot, and nothing scored is recorded twice."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from llmo.evaluation.storage import (
    DatasetRow,
    EvaluationStore,
    ExampleOutcome,
    ExampleRow,
    RunRow,
    ScoredRequest,
    ScoreRow,
    metadata,
    now_us,
)


def _dataset(dataset_id: str = "d1", request_id: str = "") -> DatasetRow:
    stamp = now_us()
    return DatasetRow(0, "t1", dataset_id, "", "", {}, "e1", 1, request_id, stamp, stamp)


def _run(run_id: str, request_id: str = "", fingerprint: str = "") -> RunRow:
    return RunRow(0, "t1", run_id, "d1", b"", 1, 2, 0, 0, 0, 0, 0, b"", "", "", False, request_id, fingerprint,
                  now_us(), 0, 0)


def _score(event_id: str) -> ScoreRow:
    return ScoreRow(event_id, "t1", "online", "answer_relevancy", 0.5, "m", "", "r1", now_us(), b"")


def test_the_migration_creates_exactly_the_tables_the_code_uses(database_url: str) -> None:
    store = EvaluationStore.open(database_url)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        store.close()


def test_runs_snapshot_examples_resume_where_they_stopped_and_never_record_twice(database_url: str) -> None:
    store = EvaluationStore.open(database_url)
    try:
        store.create_dataset(_dataset(request_id="req-1"))
        assert store.create_dataset(_dataset(request_id="req-1")).dataset_id == "d1"  # a retry
        store.add_examples("t1", "d1", [ExampleRow("a", b"A"), ExampleRow("b", b"B")], "e2", max_examples=10)
        items = store.list_examples("t1", "d1", "", None)
        assert items is not None
        run, created = store.create_run(_run("r1", "req-9", "fp"), items, max_active=4)
        again, created_again = store.create_run(_run("r1-retry", "req-9", "fp"), items, max_active=4)
        assert created and not created_again and again.pk == run.pk
        store.delete_example("t1", "d1", "a", "e3")  # the run keeps its snapshot
        assert [i.example_id for i in store.pending_items(run.pk)] == ["a", "b"]
        outcome = ExampleOutcome("a", b"result", failed=False, flagged=False, input_tokens=3, cost_micros=7,
                                 scores=[_score("run/r1/a/m")])
        assert store.record_example(run.pk, outcome)
        assert not store.record_example(run.pk, outcome)  # a resumed run does not score an example twice
        assert [i.example_id for i in store.pending_items(run.pk)] == ["b"]
        row = store.run_by_pk(run.pk)
        assert row is not None and (row.examples_completed, row.input_tokens, row.cost_micros) == (1, 3, 7)
        assert [e for _, e, _ in store.unpublished(10)] == ["run/r1/a/m"]
        store.mark_published([i for i, _, _ in store.unpublished(10)])
        assert store.unpublished(10) == []
        # online scoring: a redelivered completion is recorded once
        request = ScoredRequest("t1", "router", "r1", "m", "", 3, 4, b"\x00" * 4, now_us())
        assert store.record_scores([_score("online/x")], request)
        assert not store.record_scores([_score("online/x2")], request)
        assert store.was_scored("t1", "router", "r1") and not store.was_scored("t2", "router", "r1")
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("select count(*) from scores")).scalar_one() == 2
    finally:
        store.close()
