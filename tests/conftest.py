"""Fixtures shared by every test: a real nats-server and real databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmo.core.natsd import NatsServer

POSTGRES_URL = os.environ.get("LLMO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True, scope="session")
def _data_dir_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Services a test starts without a data_dir keep their state (outboxes, SQLite) in a temp
    dir, never in ./.llmo of the checkout, where a stale outbox from an earlier run would
    publish old events into a new test."""
    previous = os.environ.get("LLMO_DATA_DIR")
    os.environ["LLMO_DATA_DIR"] = str(tmp_path_factory.mktemp("llmo-data"))
    yield
    if previous is None:
        os.environ.pop("LLMO_DATA_DIR", None)
    else:
        os.environ["LLMO_DATA_DIR"] = previous


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a random port, storing in a temp dir.

    `stop()` then `start()` restarts it on the same port with the same store.
    """
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _postgres_admin_url() -> str:
    return POSTGRES_URL


def _create_postgres_database() -> str:
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
        name = f"llmo_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as error:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {error.__class__.__name__}: {error}")
    return sa.engine.make_url(_postgres_admin_url()).set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(url: str) -> None:
    import sqlalchemy as sa

    name = sa.engine.make_url(url).database
    admin = sa.create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    url = _create_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(url)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
