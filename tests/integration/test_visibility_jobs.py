"""Visibility jobs across restarts and their events on a real nats-server: a crawl and a share-of-voice run
interrupted by a stop resume where they stopped (no page fetched twice, no answer asked twice), and
`crawl_completed` / `share_of_voice_changed` reach JetStream once each."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest

from llmo.core.events import EventBus
from llmo.core.natsd import NatsServer
from llmo.protos.events.v1 import events_pb2
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from tests.integration.visibility_harness import (
    A,
    EngineBehaviour,
    FakeEngines,
    project,
    settings,
    started,
    watch_crawl,
    watch_run,
)
from tests.unit.visibility.site import make_site, serve_site

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[EventBus]:
    connected = await EventBus(nats_server.url).connect()
    await connected.ensure_stream("visibility")
    try:
        yield connected
    finally:
        await connected.close()


async def test_a_crawl_interrupted_by_a_restart_resumes_without_fetching_a_page_twice(
        tmp_path: Path, nats_server: NatsServer, bus: EventBus) -> None:
    sub = await bus.js.pull_subscribe("llmo.visibility.v1.crawl_completed", durable="c", stream="LLMO_VISIBILITY")
    app = make_site(pages=8)
    async with serve_site(app) as base:
        config = settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path, nats_server.url)  # polite: 1 page/s
        running, channel, stub = await started(config)
        try:
            await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project()), metadata=A)
            await stub.StartCrawl(pb.StartCrawlRequest(parent="projects/acme", crawl_id="c1", crawl=pb.Crawl(
                seed_urls=[f"{base}/"], config=pb.CrawlConfig(max_pages=30))), metadata=A)
            async with asyncio.timeout(60):
                async for reply in stub.WatchCrawl(pb.WatchCrawlRequest(name="projects/acme/crawls/c1"), metadata=A):
                    if reply.crawl.progress.pages_fetched >= 3:
                        break
        finally:
            await channel.close()
            await running.stop()  # mid-crawl: the crawl stays RUNNING in the store
        running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path, nats_server.url,
                                                        politeness=False))
        try:
            final = (await watch_crawl(stub, "projects/acme/crawls/c1"))[-1].crawl
            assert final.state == pb.JOB_STATE_SUCCEEDED
            assert final.progress.pages_fetched >= 9 and final.progress.pages_queued == 0
            got = await sub.fetch(1, timeout=10)
            await got[0].ack()
            event = events_pb2.CrawlCompleted.FromString(got[0].data)
            assert event.crawl == "projects/acme/crawls/c1" and event.tenant == "tenantA"
            assert event.state == "JOB_STATE_SUCCEEDED" and event.pages_fetched == final.progress.pages_fetched
            with pytest.raises(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=1)
        finally:
            await channel.close()
            await running.stop()
    # A page in flight at the stop may be fetched again; none is fetched more than that once more.
    articles = Counter({path: n for path, n in app["hits"].items() if path.startswith("/articles/")})
    assert articles and max(articles.values()) <= 2
    assert sum(1 for n in articles.values() if n == 2) <= 1


async def test_a_run_interrupted_by_a_restart_asks_only_the_missing_answers_and_announces_a_change(
        tmp_path: Path, nats_server: NatsServer, bus: EventBus) -> None:
    sub = await bus.js.pull_subscribe("llmo.visibility.v1.share_of_voice_changed", durable="s",
                                      stream="LLMO_VISIBILITY")
    engines = await FakeEngines({"engine-a": EngineBehaviour(rates={"Acme": 0.9, "Globex": 0.3})}).start()
    try:
        knobs = {"engine_url": engines.url, "engine_concurrency": 1}
        running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path, nats_server.url,
                                                        **knobs))
        try:
            await stub.CreateProject(pb.CreateProjectRequest(project_id="acme", project=project(
                default_engines=["engine-a"])), metadata=A)
            first = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
                parent="projects/acme", share_of_voice_run_id="r1", share_of_voice_run=pb.ShareOfVoiceRun(
                    samples_per_query=8)), metadata=A)).share_of_voice_run
            assert (await watch_run(stub, first.name))[-1].state == pb.JOB_STATE_SUCCEEDED
            engines.behaviours["engine-a"].rates["Acme"] = 0.1
            engines.requests.clear()
            second = (await stub.CreateShareOfVoiceRun(pb.CreateShareOfVoiceRunRequest(
                parent="projects/acme", share_of_voice_run_id="r2", share_of_voice_run=pb.ShareOfVoiceRun(
                    samples_per_query=8)), metadata=A)).share_of_voice_run
            async with asyncio.timeout(60):
                async for reply in stub.WatchShareOfVoiceRun(pb.WatchShareOfVoiceRunRequest(name=second.name),
                                                             metadata=A):
                    if reply.share_of_voice_run.progress.answers_completed >= 10:
                        break
        finally:
            await channel.close()
            await running.stop()
        asked_before = len(engines.requests)
        running, channel, stub = await started(settings(f"sqlite:///{tmp_path / 'v.db'}", tmp_path, nats_server.url,
                                                        **knobs))
        try:
            done = (await watch_run(stub, second.name))[-1]
            assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.answers_completed == 40
            # Only the answers not stored before the stop were asked again (one may have been in flight).
            assert len(engines.requests) <= 40 + 1 and len(engines.requests) >= 40 - asked_before + 10 - 1
            change = {c.engine: c for c in done.changes}["engine-a"]  # one engine: no separate "all"
            assert change.significant and change.after < change.before
            got = await sub.fetch(1, timeout=10)
            events = [events_pb2.ShareOfVoiceChanged.FromString(m.data) for m in got]
            for message in got:
                await message.ack()
            assert [e.engine for e in events] == ["engine-a"]
            with pytest.raises(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=1)
            assert all(e.run == second.name and e.previous_run == first.name and e.brand == "Acme" for e in events)
        finally:
            await channel.close()
            await running.stop()
    finally:
        await engines.stop()
