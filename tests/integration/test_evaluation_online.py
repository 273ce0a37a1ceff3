"""Online evaluation and drift over a real nats-server: completed events with content are scored once
(redeliveries and replicas agree), the scores are published, and a shift in live answers shows up in
GetDriftReport and as one drift_detected event per window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats.errors
import pytest

from llmo.core.content import completion_content
from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer
from llmo.core.resources import timestamp
from llmo.protos.common.v1 import common_pb2
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.events.v1 import events_pb2
from tests.integration.evaluation_harness import ADMIN, A, B, code_of, settings, started

GOOD = "The capital of France is Paris, a city on the Seine."
JUNK = "zx-w0 zx-w1 zx-w2 zx-w3 zx-w4"


def completed(i: int, output: str, *, occurred_s: float | None = None, content: bool = True,
              tenant: str = "tenantA") -> events_pb2.RouterCompleted:
    event = events_pb2.RouterCompleted(event_id=f"ev-{i}-{occurred_s}", request_id=f"req-{i}", model="m1",
                                       attribution=common_pb2.Attribution(tenant=tenant), status="ok")
    if content:
        event.content.CopyFrom(completion_content("What is the capital of France?", output))
    event.occurred_at.CopyFrom(timestamp(int((occurred_s or time.time()) * 1e6)))
    return event


async def _scored(sub: object, want: int) -> list[events_pb2.EvaluationScored]:
    got: list[events_pb2.EvaluationScored] = []
    async with asyncio.timeout(60):
        while len(got) < want:
            try:
                messages = await sub.fetch(want - len(got), timeout=2)  # type: ignore[attr-defined]
            except nats.errors.TimeoutError:
                continue
            for m in messages:
                got.append(events_pb2.EvaluationScored.FromString(m.data))
                await m.ack()
    return got


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[EventBus]:
    connected = await EventBus(nats_server.url).connect()
    await connected.ensure_stream("router")
    await connected.ensure_stream("evaluation")
    try:
        yield connected
    finally:
        await connected.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_live_completions_are_scored_once_and_announced(database_url: str, tmp_path: Path,
                                                             nats_server: NatsServer, bus: EventBus) -> None:
    sub = await bus.js.pull_subscribe("llmo.evaluation.v1.scored", durable="t", stream="LLMO_EVALUATION")
    running, channel, _ = await started(settings(database_url, tmp_path, nats_server.url, online_sources="router",
                                                 online_metrics="answer_relevancy"))
    try:
        await bus.publish(completed(1, GOOD))
        await bus.publish(completed(2, JUNK))
        await bus.publish(completed(3, GOOD, content=False))  # nothing to score
        again = completed(1, GOOD)
        again.event_id = "ev-1-redelivered"  # the same request, seen twice
        await bus.publish(again)
        scores = {s.request_id: s for s in await _scored(sub, 2)}
        assert set(scores) == {"req-1", "req-2"}
        good, junk = scores["req-1"], scores["req-2"]
        assert good.metric == "answer_relevancy" and good.source == "online" and good.model == "m1"
        assert good.attribution.tenant == "tenantA" and good.judged_by.startswith("embedding:")
        assert good.score > junk.score + 0.3
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=2)  # neither the contentless event nor the repeat was scored
    finally:
        await channel.close()
        await running.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_shift_in_live_answers_is_reported_as_drift_once_per_window(
        database_url: str, tmp_path: Path, nats_server: NatsServer, bus: EventBus) -> None:
    window, baseline = 600.0, 3000.0
    now = time.time()
    end = now // window * window
    start = end - window
    running, channel, stub = await started(settings(
        database_url, tmp_path, nats_server.url, online_sources="router", online_metrics="answer_relevancy",
        drift_window_s=window, drift_baseline_s=baseline, drift_min_samples=10, drift_check_interval_s=0))
    sub = await bus.js.pull_subscribe("llmo.evaluation.v1.drift_detected", durable="d", stream="LLMO_EVALUATION")
    try:
        for i in range(20):  # yesterday's answers were good, this window's are junk
            await bus.publish(completed(i, GOOD + f" ({i})", occurred_s=start - baseline + 60 + i))
            await bus.publish(completed(100 + i, JUNK + f" {i}", occurred_s=start + 60 + i))
        store = running.store
        async with asyncio.timeout(120):
            while len(await asyncio.to_thread(store.score_values, tenant="tenantA", metric="answer_relevancy",
                                              start_us=0, end_us=int(now * 1e6) + 1)) < 40:
                await asyncio.sleep(0.2)
        request = pb.GetDriftReportRequest(
            metric="answer_relevancy", model="m1", min_samples=10, baseline_start_time=timestamp(int((start - baseline) * 1e6)),
            baseline_end_time=timestamp(int(start * 1e6)), current_start_time=timestamp(int(start * 1e6)),
            current_end_time=timestamp(int(end * 1e6)))
        report = (await stub.GetDriftReport(request, metadata=A)).report
        assert report.baseline.count == 20 and report.current.count == 20
        assert report.mean_delta < -0.3 and report.severity == pb.DRIFT_SEVERITY_SEVERE and report.ks_p_value < 0.01
        feature = pb.GetDriftReportRequest()
        feature.CopyFrom(request)
        feature.metric = "feature:output_chars"
        assert (await stub.GetDriftReport(feature, metadata=A)).report.current.mean < (
            await stub.GetDriftReport(feature, metadata=A)).report.baseline.mean
        # another tenant has no live traffic; an admin may read across tenants
        assert await code_of(stub.GetDriftReport(request, metadata=B)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_DATA")
        assert (await stub.GetDriftReport(request, metadata=ADMIN)).report.current.count == 20
        bad = pb.GetDriftReportRequest(metric="answer_relevancy", baseline_start_time=timestamp(2_000_000),
                                       baseline_end_time=timestamp(1_000_000))
        assert await code_of(stub.GetDriftReport(bad, metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_WINDOW")
        found = await running.drift.check_once(now)
        assert "answer_relevancy" in {e.metric for e in found}
        assert await running.drift.check_once(now) == []  # once per group and window
        published = []
        async with asyncio.timeout(30):
            while len(published) < len(found):
                try:
                    published += await sub.fetch(len(found), timeout=2)
                except nats.errors.TimeoutError:
                    continue
        events = [events_pb2.EvaluationDriftDetected.FromString(m.data) for m in published]
        drift = next(e for e in events if e.metric == "answer_relevancy")
        assert drift.tenant == "tenantA" and drift.model == "m1" and drift.severity == "severe"
        assert drift.current_mean < drift.baseline_mean
    finally:
        await channel.close()
        await running.stop()
