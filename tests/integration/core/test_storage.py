"""Storage helpers on both backends: engines, WAL for SQLite, Alembic migrations."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from llmo.core.storage import WalCheckpointer, create_engine, migrate, normalize_url

ENV = """
from llmo.core.storage import run_alembic_env

run_alembic_env()
"""

REVISION = '''
"""create things"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table("things", sa.Column("id", sa.String(64), primary_key=True), sa.Column("n", sa.BigInteger))


def downgrade() -> None:
    op.drop_table("things")
'''


def write_migrations(root: Path) -> Path:
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(ENV)
    (root / "script.py.mako").write_text("")
    (root / "versions" / "0001_things.py").write_text(REVISION)
    return root


def test_migrations_apply_once_and_are_idempotent(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    scripts = write_migrations(tmp_path / "migrations")
    migrate(engine, scripts)
    migrate(engine, scripts)  # a restart migrates again: nothing to do, nothing lost
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO things (id, n) VALUES ('a', 9000000000)"))
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT n FROM things")).scalar_one() == 9_000_000_000
        version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == "0001"
    engine.dispose()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    with engine.connect() as connection:
        assert connection.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
    engine.dispose()


def test_background_checkpoints_keep_the_wal_small_and_close_folds_it_in(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.db"
    engine = create_engine(f"sqlite:///{path}", background_checkpoint=True)
    checkpointer = WalCheckpointer(engine, interval_s=0.05)
    with engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 65536
        conn.exec_driver_sql("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB)")
    for _ in range(20):  # ~8 MiB of commits: with auto-checkpoints deferred, only the thread folds them in
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO blobs (body) VALUES " + ", ".join(["(randomblob(4096))"] * 100))
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 7 * 1024 * 1024  # ~8 MiB: no writer checkpointed (by default one would at ~4 MiB)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.checkpoints >= 2
        with engine.connect() as conn:
            busy, frames, done = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        assert busy == 0 and frames == done  # every WAL frame is already in the database file
    finally:
        checkpointer.stop()
    assert wal.stat().st_size == 0  # stop() truncates the WAL
    engine.dispose()
    with create_engine(f"sqlite:///{path}").connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM blobs").scalar_one() == 2000


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
