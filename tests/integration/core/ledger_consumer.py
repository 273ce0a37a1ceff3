"""A consumer process for the exactly-once test: writes event ids into SQLite.

With `--crash-after-commit` it commits its first batch and then dies with
os._exit before acking, as a process killed mid-batch would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3

from llmo.core.events import Delivery, EventBus
from llmo.protos.events.v1 import events_pb2


def open_ledger(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS ledger (event_id TEXT PRIMARY KEY, tokens INTEGER NOT NULL)")
    return db


async def main(url: str, db_path: str, crash_after_commit: bool, expected: int) -> None:
    db = open_ledger(db_path)

    async def handle(batch: list[Delivery[events_pb2.InferenceCompleted]]) -> None:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO ledger (event_id, tokens) VALUES (?, ?) ON CONFLICT (event_id) DO NOTHING",
            [(d.event_id, d.event.usage.output_tokens) for d in batch],
        )
        db.execute("COMMIT")
        if crash_after_commit:
            os._exit(3)

    async with EventBus(url) as bus:
        consumer = bus.consumer(events_pb2.InferenceCompleted, "ledger-test", handle, batch=50, ack_wait=1.0)
        task = consumer.start()
        while db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] < expected:
            await asyncio.sleep(0.1)
        # Let the last batch's acks go out before stopping.
        await consumer.stop()
        await task


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("db")
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--crash-after-commit", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.db, args.crash_after_commit, args.expected))
