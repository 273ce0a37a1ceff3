"""`llmo bench cost`: ledger ingest throughput and CheckBudget latency, SQLite and PostgreSQL.

For each backend a fresh database and a real cost service (gRPC + NATS consumers)
run in this process; a separate publisher process sends N InferenceCompleted
events into the JetStream stream (serialised before the clock starts, then raw
core-NATS HPUB frames with the bus's headers in large writes, so the load
generator takes little of the machine's CPU). Two numbers per backend:
- events_per_s: N / (first publish -> last ledger commit) with the publisher
  running alongside the service (both share this machine's cores);
- backlog_events_per_s: N events already in the stream when the service starts
  -> all committed (the consumer's capacity, e.g. catching up after an outage).
The peer, measured in the same run on the same events: the stock nats-py pull
consumer (`fetch()` + ack) doing no work at all, published -> acked.

CheckBudget p50/p99 is measured over gRPC with real reservations against three
matching budgets; its peer is grpc.health.v1 Check on the same server (the
cost of one gRPC round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from llmo.core.events import EventBus
from llmo.core.logging import configure_logging
from llmo.core.natsd import NatsServer
from llmo.cost.main import start
from llmo.cost.settings import CostSettings
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb
from llmo.protos.cost.v1 import cost_service_pb2_grpc as pb_grpc

PUBLISHER = r"""
# The load generator: N events serialised up front, then written to nats-server
# as raw HPUB frames (the same headers the EventBus sets) in large socket writes,
# so that on a 2-core machine it takes as little CPU as possible from the server
# and the service under test.
import json, socket, sys, time
from urllib.parse import urlsplit
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

def frames(subject: str, n: int, run: str) -> list[bytes]:
    models = ["gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "llmo-demo"]
    out, chunk = [], []
    for i in range(n):
        e = events_pb2.InferenceCompleted(
            event_id=f"{run}-{i}", request_id=f"{run}-r{i}", model=models[i % 4],
            attribution=common_pb2.Attribution(tenant=f"tenant-{i % 8}", application="bench"),
            usage=common_pb2.Usage(input_tokens=500 + i % 977, output_tokens=100 + i % 301),
            latency=common_pb2.Latency(ttft_ms=50 + i % 100, e2e_ms=400 + i % 500))
        e.occurred_at.GetCurrentTime()
        payload = e.SerializeToString()
        headers = f"NATS/1.0\r\nNats-Msg-Id: {e.event_id}\r\nllmo-type: llmo.events.v1.InferenceCompleted\r\n\r\n".encode()
        chunk.append(f"HPUB {subject} {len(headers)} {len(headers) + len(payload)}\r\n".encode() + headers + payload + b"\r\n")
        if len(chunk) == 500:
            out.append(b"".join(chunk)); chunk = []
    if chunk:
        out.append(b"".join(chunk))
    return out

def await_pong(sock: socket.socket, reader) -> None:
    while True:
        line = reader.readline()
        if line.startswith(b"PONG"):
            return
        if line.startswith(b"PING"):
            sock.sendall(b"PONG\r\n")
        elif not line.startswith(b"INFO"):
            raise SystemExit(f"nats-server: {line!r}")

def main(url: str, subject: str, n: int, run: str) -> None:
    blobs = frames(subject, n, run)
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    reader = sock.makefile("rb")
    reader.readline()  # INFO
    sock.sendall(b"CONNECT " + json.dumps({"verbose": False, "pedantic": False, "headers": True, "protocol": 1}).encode() + b"\r\nPING\r\n")
    await_pong(sock, reader)
    print(time.time(), flush=True)
    for blob in blobs:
        sock.sendall(blob)
    sock.sendall(b"PING\r\n")
    await_pong(sock, reader)  # the server has read every frame
    sock.close()

main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
"""


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def _create_pg(admin_url: str) -> str:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"llmo_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_pg(admin_url: str, url: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.engine.make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def _spawn_publisher(url: str, n: int, run: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, url, "llmo.inference.v1.completed", str(n), run],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "LLMO_LOG_LEVEL": "warning"},
    )


async def _wait_publisher(proc: subprocess.Popen[str]) -> float:
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    return float(line)


async def _purge(url: str) -> None:
    async with EventBus(url) as bus:
        stream = await bus.ensure_stream("inference")
        await bus.js.purge_stream(stream)


async def _raw_consume(url: str, n: int, batch: int) -> dict[str, float]:
    """Peer: publish n events, pull them with nats-py fetch() and ack, no processing at all."""
    run = uuid.uuid4().hex[:8]
    await _purge(url)
    async with EventBus(url) as bus:
        stream = await bus.ensure_stream("inference")
        sub = await bus.js.pull_subscribe("llmo.inference.v1.completed", durable=f"raw-{run}", stream=stream)
        proc = _spawn_publisher(url, n, run)
        t0 = await _wait_publisher(proc)
        seen = 0
        while seen < n:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except Exception:
                continue
            for msg in msgs:
                await msg.ack()
            seen += len(msgs)
        elapsed = time.time() - t0
        await asyncio.to_thread(proc.wait)
    return {"events_per_s": round(n / elapsed), "seconds": round(elapsed, 3)}


async def _wait_committed(engine: Any, target: int, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while engine.records_committed < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: only {engine.records_committed} of {target} events committed after {timeout}s")
        await asyncio.sleep(0.005)


async def _bench_backend(name: str, db_url: str, nats_url: str, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = CostSettings(
        database_url=db_url,
        metrics_port=-1,
        ingest_batch=args.batch,
        consumer_name=f"bench-{name}-{uuid.uuid4().hex[:6]}",
        platform={"nats_url": nats_url, "data_dir": data_dir, "log_level": "warning", "drain_seconds": 1},
    )
    await _purge(nats_url)
    # 1. backlog: N events already in the stream when the service starts (consumer capacity)
    backlog = _spawn_publisher(nats_url, args.events, uuid.uuid4().hex[:8])
    await _wait_publisher(backlog)
    await asyncio.to_thread(backlog.wait)
    running = await start(settings, port=0, metrics=False)
    store = running.engine.store
    engine = running.engine
    try:
        # timed from the end of start-up (migrations, connections); what was
        # committed during start-up is left out of the count
        t0, early, cpu0 = time.time(), engine.records_committed, time.process_time()
        await _wait_committed(engine, args.events, args.timeout, name)
        drain = time.time() - t0
        drained = args.events - early
        # CPU this process (service threads included) spent per event while draining:
        # on a loaded shared machine, the rate one free core could sustain
        cpu_us = (time.process_time() - cpu0) * 1e6 / max(drained, 1)
        # 2. end to end: N more events published while the service consumes them
        proc = _spawn_publisher(nats_url, args.events, uuid.uuid4().hex[:8])
        t0 = await _wait_publisher(proc)
        await _wait_committed(engine, 2 * args.events, args.timeout, name)
        elapsed = time.time() - t0
        await asyncio.to_thread(proc.wait)
        count, cost = await asyncio.to_thread(store.ledger_totals)
        ingest = {
            "events": args.events,
            "published_to_committed_s": round(elapsed, 3),
            "events_per_s": round(args.events / elapsed),
            "backlog_drain_s": round(drain, 3),
            "backlog_events_per_s": round(drained / drain),
            "backlog_cpu_us_per_event": round(cpu_us, 1),
            "backlog_events_per_cpu_s": round(1e6 / cpu_us) if cpu_us else None,
            "ledger_records": count,
            "ledger_cost_micros": cost,
        }

        checks = await _bench_checks(running.port, args.checks)
    finally:
        await running.stop()
    return {"ingest": ingest, **checks}


CHECKER = r"""
import asyncio, json, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmo.protos.common.v1 import common_pb2
from llmo.protos.cost.v1 import cost_service_pb2 as pb, cost_service_pb2_grpc as pb_grpc

async def main(port: int, n: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CostServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check_ms, health_ms, decisions = [], [], set()
        for i in range(n + 200):
            request = pb.CheckBudgetRequest(tenant="tenant-0", application="bench", model="gpt-4o",
                                            estimated_cost=common_pb2.Money(micros=5000), request_id=f"chk-{i}")
            t = time.perf_counter()
            response = await stub.CheckBudget(request)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            dh = time.perf_counter() - t
            if i >= 200:
                check_ms.append(dt * 1000)
                health_ms.append(dh * 1000)
                decisions.add(pb.BudgetDecision.Name(response.decision))
    print(json.dumps({"check_ms": check_ms, "health_ms": health_ms, "decisions": sorted(decisions)}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def _bench_checks(port: int, n: int) -> dict[str, Any]:
    """CheckBudget from a separate client process (as the router calls it), against three matching budgets."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CostServiceStub(channel)
        scopes = (("t0-day", pb.BUDGET_WINDOW_DAILY, ""), ("t0-month", pb.BUDGET_WINDOW_MONTHLY, ""), ("t0-bench", pb.BUDGET_WINDOW_DAILY, "bench"))
        for budget_id, window, app in scopes:
            budget = pb.Budget(
                tenant="tenant-0",
                application=app,
                window=window,
                soft_limit=common_pb2.Money(micros=10**12),
                hard_limit=common_pb2.Money(micros=2 * 10**12),
            )
            await stub.CreateBudget(pb.CreateBudgetRequest(budget_id=budget_id, budget=budget))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHECKER, str(port), str(n), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    data = json.loads(out)
    check_lat, health_lat = data["check_ms"], data["health_ms"]
    p50, p99 = _percentile(check_lat, 50), _percentile(check_lat, 99)
    h50, h99 = _percentile(health_lat, 50), _percentile(health_lat, 99)
    return {
        "check_budget": {
            "calls": n,
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "mean_ms": round(statistics.fmean(check_lat), 3),
            "decisions": data["decisions"],
        },
        "grpc_health_peer": {"p50_ms": round(h50, 3), "p99_ms": round(h99, 3)},
        "check_budget_vs_health_p50_ratio": round(p50 / h50, 2),
        "check_budget_vs_health_p99_ratio": round(p99 / h99, 2),
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"events": args.events, "batch": args.batch, "checks": args.checks}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server = None
        nats_url = args.nats_url
        if not nats_url:
            server = NatsServer(tmp_path / "nats")
            server.start()
            nats_url = server.url
        try:
            result["raw_jetstream_peer"] = await _raw_consume(nats_url, args.events, args.batch)
            for backend in args.backends.split(","):
                if backend == "sqlite":
                    url = f"sqlite:///{tmp_path / 'bench-cost.db'}"
                    result["sqlite"] = await _bench_backend("sqlite", url, nats_url, tmp_path, args)
                elif backend == "postgres":
                    try:
                        url = _create_pg(args.postgres_url)
                    except Exception as error:
                        result["postgres"] = {"skipped": f"PostgreSQL not reachable: {error.__class__.__name__}"}
                        continue
                    try:
                        result["postgres"] = await _bench_backend("postgres", url, nats_url, tmp_path, args)
                    finally:
                        _drop_pg(args.postgres_url, url)
                else:
                    raise SystemExit(f"unknown backend {backend!r}")
                raw = result["raw_jetstream_peer"]["events_per_s"]
                result[backend]["ingest_vs_raw_jetstream_ratio"] = round(result[backend]["ingest"]["events_per_s"] / raw, 3)
                result[backend]["backlog_vs_raw_jetstream_ratio"] = round(result[backend]["ingest"]["backlog_events_per_s"] / raw, 3)
        finally:
            if server is not None:
                server.stop()
    return result


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="llmo bench cost", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000, help="usage events to publish per backend")
    parser.add_argument("--batch", type=int, default=1000, help="events per fetch / ledger transaction")
    parser.add_argument("--checks", type=int, default=5000, help="CheckBudget calls to time")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=os.environ.get("LLMO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--nats-url", default="", help="use a running nats-server instead of starting one")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one backend's ingest")
    args = parser.parse_args(argv)
    configure_logging("cost", level="warning")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
