"""SQL storage: SQLAlchemy 2 engines for SQLite (WAL, the embedded default) and
PostgreSQL (by URL), and Alembic migrations run at start-up.

Each service keeps its migrations in its own folder (`services/<name>/migrations`)
with an `env.py` that calls `run_alembic_env()`.
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine

from llmo.core.logging import get_logger

log = get_logger(__name__)


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain `postgresql://` / `postgres://` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, *, background_checkpoint: bool = False, **kwargs: Any) -> Engine:
    """An engine tuned per backend: WAL + busy timeout for SQLite, a pool for PostgreSQL.

    ``background_checkpoint`` (SQLite): committing transactions no longer copy the
    WAL into the database themselves (which costs a write burst and an fsync every
    few commits); run a :class:`WalCheckpointer` beside the engine instead. A
    committing writer still checkpoints if the WAL passes 256 MiB, so a stalled
    checkpointer cannot let it grow without bound.
    """
    url = normalize_url(url)
    if is_sqlite(url):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        if background_checkpoint:
            event.listen(engine, "connect", _defer_checkpoints)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # index pages of a busy ledger stay in memory (the 2 MiB default thrashes past ~100k rows)
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def _defer_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=65536")


class WalCheckpointer:
    """Checkpoints a SQLite database's WAL from a background thread.

    ``PASSIVE`` checkpoints never block readers or writers; the fsync they end
    with runs without the GIL, beside the service's own work.
    """

    def __init__(self, engine: Engine, *, interval_s: float = 0.5) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and fold what is left of the WAL into the database."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.checkpoint("TRUNCATE")

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")
        self.checkpoints += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.checkpoint()
            except Exception as error:  # a locked or vanished database: try again next time
                log.warning("sqlite checkpoint failed", error=repr(error))


def alembic_config(script_location: Path, engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine, script_location: Path, revision: str = "head") -> None:
    """Upgrade the database to `revision` (blocking: call it off the event loop).

    On PostgreSQL a transaction-scoped advisory lock serialises replicas that
    start together, so only one of them runs each migration.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            key = zlib.crc32(str(script_location.resolve()).encode())
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        config = alembic_config(script_location, engine)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    log.info("database migrated", url=engine.url.render_as_string(hide_password=True), revision=revision)


def run_alembic_env(target_metadata: sa.MetaData | None = None) -> None:
    """Body of a service's `migrations/env.py`."""
    from alembic import context

    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            _run(context, conn, target_metadata)
    else:
        _run(context, connection, target_metadata)


def _run(context: Any, connection: sa.Connection, metadata: sa.MetaData | None) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
