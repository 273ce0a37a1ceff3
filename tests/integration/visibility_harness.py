"""Shared by the visibility service's integration tests: the service on real gRPC, the local test site
(tests/unit/visibility/site.py) on 127.0.0.1, and local OpenAI-compatible answer engines whose
answers name each brand with a known probability (they stand in for paid answer engines)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from llmo.core.errors import error_info
from llmo.core.settings import PlatformSettings
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc
from llmo.visibility.main import RunningVisibility, start
from llmo.visibility.settings import VisibilitySettings

KEYS = {"ka": "tenantA", "kb": "tenantB", "kadmin": "admin"}
A, B, ADMIN = [("authorization", "Bearer ka")], [("authorization", "Bearer kb")], [("authorization", "Bearer kadmin")]


@dataclass
class EngineBehaviour:
    """How one fake engine (a model name) answers: each brand is named with its probability; `cite`
    maps a brand to the URL its mention cites. `status` != 200 answers every request with that error;
    `hang` never answers; `garbage` answers with a body that is not a chat completion."""

    rates: dict[str, float]
    cite: dict[str, str] = field(default_factory=dict)
    status: int = 200
    hang: bool = False
    garbage: bool = False


@dataclass
class FakeEngines:
    behaviours: dict[str, EngineBehaviour]
    seed: int = 7
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _rng: random.Random = field(default_factory=random.Random)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-")})
        behaviour = self.behaviours.get(str(body.get("model")))
        if behaviour is None:
            return web.json_response({"error": {"message": "unknown model", "code": "model_not_found"}}, status=404)
        if behaviour.hang:
            await asyncio.sleep(3600)
        if behaviour.status != 200:
            return web.json_response({"error": {"message": "engine error"}}, status=behaviour.status)
        if behaviour.garbage:
            return web.Response(text="<html>not json</html>", content_type="text/html")
        named = [brand for brand, rate in behaviour.rates.items() if self._rng.random() < rate]
        parts = ["Here is what I found."]
        for brand in named:
            link = behaviour.cite.get(brand)
            parts.append(f"{brand} is a good option" + (f" (see {link})." if link else "."))
        text = " ".join(parts)
        return web.json_response({
            "id": "x", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
            "llmo": {"cost_micros": 5}})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name} for name in self.behaviours]})

    async def start(self) -> FakeEngines:
        self._rng.seed(self.seed)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def settings(database_url: str, data: Path, nats_url: str = "nats://127.0.0.1:1", **knobs: Any) -> VisibilitySettings:
    knobs.setdefault("engine_url", "")
    knobs.setdefault("fetch_allow", "127.0.0.1")
    knobs.setdefault("min_delay_s", 0.0)
    knobs.setdefault("engine_timeout_s", 5.0)
    knobs.setdefault("sov_resamples", 200)
    return VisibilitySettings(database_url=database_url, metrics_port=-1, platform=PlatformSettings(
        nats_url=nats_url, data_dir=data, drain_seconds=0.5, api_keys=KEYS, admin_tenants="admin"), **knobs)


async def started(config: VisibilitySettings) -> tuple[RunningVisibility, grpc.aio.Channel, pb_grpc.VisibilityServiceStub]:
    running = await start(config, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return running, channel, pb_grpc.VisibilityServiceStub(channel)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = error_info(raised.value)
    return raised.value.code(), info.reason if info else ""


def project(base: str | None = None, **fields: Any) -> pb.Project:
    """The test brand "Acme" on the local site (host 127.0.0.1), competing with Globex and Initech."""
    fields.setdefault("brand", pb.Brand(name="Acme", aliases=["Acme Corp"], description="Acme makes anvils.",
                                        facts={"founded": "1999"}))
    fields.setdefault("domains", ["127.0.0.1"])
    fields.setdefault("competitors", [pb.Competitor(name="Globex", domains=["globex.example"]),
                                      pb.Competitor(name="Initech", domains=["initech.example"])])
    fields.setdefault("queries", [pb.TrackedQuery(text=q, weight=w) for q, w in (
        ("best anvil supplier", 3.0), ("how to choose an anvil", 1.0), ("anvil prices 2025", 1.0),
        ("who makes durable anvils", 1.0), ("anvil maintenance tips", 2.0))])
    return pb.Project(**fields)


async def watch_crawl(stub: pb_grpc.VisibilityServiceStub, name: str,
                      meta: list[tuple[str, str]] = A, timeout: float = 120) -> list[pb.WatchCrawlResponse]:
    replies = []
    async with asyncio.timeout(timeout):
        async for reply in stub.WatchCrawl(pb.WatchCrawlRequest(name=name), metadata=meta):
            replies.append(reply)
    return replies


async def watch_run(stub: pb_grpc.VisibilityServiceStub, name: str,
                    meta: list[tuple[str, str]] = A, timeout: float = 120) -> list[pb.ShareOfVoiceRun]:
    replies = []
    async with asyncio.timeout(timeout):
        async for reply in stub.WatchShareOfVoiceRun(pb.WatchShareOfVoiceRunRequest(name=name), metadata=meta):
            replies.append(reply.share_of_voice_run)
    return replies


async def all_pages(stub: pb_grpc.VisibilityServiceStub, crawl: str, meta: list[tuple[str, str]] = A) -> list[pb.Page]:
    pages: list[pb.Page] = []
    token = ""
    while True:
        reply = await stub.ListPages(pb.ListPagesRequest(parent=crawl, page_size=7, page_token=token), metadata=meta)
        pages += list(reply.pages)
        token = reply.next_page_token
        if not token:
            return pages
