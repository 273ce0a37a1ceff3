"""The visibility service, declared on the service kit: gRPC VisibilityService over a SQL store of
record, crawls and share-of-voice runs executed in the background, and `crawl_completed` /
`share_of_voice_changed` events through the outbox."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from llmo.chat_client import chat_completions_url
from llmo.core import kit as service_kit
from llmo.core.kit import Kit, ServiceSpec
from llmo.core.logging import get_logger
from llmo.embedding import Embedder
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc
from llmo.visibility.crawl import CrawlExecutor
from llmo.visibility.events import EventAnnouncer
from llmo.visibility.extract_pool import ExtractionPool, auto_processes
from llmo.visibility.fetcher import Fetcher
from llmo.visibility.netguard import AddressPolicy
from llmo.visibility.robots import RobotsCache
from llmo.visibility.servicer import VisibilityServicer
from llmo.visibility.settings import DEFAULT_USER_AGENT, VisibilitySettings
from llmo.visibility.sov_runs import EngineClients, RunExecutor
from llmo.visibility.storage import VisibilityStore

SERVICE_NAME = "llmo.visibility.v1.VisibilityService"
log = get_logger(__name__)


class RouterModels:
    """The model names the router lists (`GET /v1/models`), cached for a minute; None when unreachable,
    so a run is not refused because the router could not be asked."""

    def __init__(self, settings: VisibilitySettings, ttl_s: float = 60.0) -> None:
        self.settings, self.ttl_s = settings, ttl_s
        self._cached: tuple[float, set[str] | None] | None = None

    async def __call__(self) -> set[str] | None:
        if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl_s:
            return self._cached[1]
        url = chat_completions_url(self.settings.engine_url).rsplit("/chat/completions", 1)[0] + "/models"
        headers = {"authorization": f"Bearer {self.settings.engine_api_key}"} if self.settings.engine_api_key else {}
        names: set[str] | None = None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                    session.get(url, headers=headers) as response:
                if response.status == 200:
                    body = await response.json()
                    names = {str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)}
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.warning("router models unavailable", url=url, error=repr(error))
        self._cached = (time.monotonic(), names)
        return names


async def build(kit: Kit[VisibilitySettings]) -> None:
    settings = kit.settings
    database_url = settings.resolved_database_url()
    store = await kit.storage(lambda: VisibilityStore.open(database_url), VisibilityStore.close)
    publisher = kit.outbox_publisher() if settings.publish_events else None
    policy = AddressPolicy([item.strip() for item in settings.fetch_allow.split(",") if item.strip()])
    fetcher = Fetcher(user_agent=DEFAULT_USER_AGENT, policy=policy, timeout_s=settings.fetch_timeout_s,
                      max_bytes=settings.max_page_bytes)
    kit.on_stop(fetcher.close)
    robots = RobotsCache(fetcher, ttl_s=settings.robots_ttl_s)
    # MiniLM loads on first use (seconds), not at start. 128 tokens is the window all-MiniLM-L6-v2 was
    # trained with; passages are 40-200 words, so a longer window costs time and adds little.
    embedder = Embedder(max_seq_length=128, precision=settings.embed_precision)
    announcer = EventAnnouncer(store, publisher)
    engines = EngineClients(settings)
    kit.on_stop(engines.close)
    extraction = ExtractionPool(auto_processes() if settings.extract_processes < 0 else settings.extract_processes)
    crawls = CrawlExecutor(store, settings, fetcher, robots, embedder, announcer, extraction=extraction)
    runs = RunExecutor(store, settings, engines, announcer)
    servicer = VisibilityServicer(store, settings, crawls, runs, fetcher, robots, embedder,
                                  RouterModels(settings) if settings.engine_url else None)
    kit.task("crawls", crawls.run)
    kit.on_stop(crawls.close)
    kit.task("runs", runs.run)
    kit.on_stop(runs.close)
    kit.task("events", announcer.run)
    kit.on_stop(announcer.close)
    kit.grpc(visibility_service_pb2_grpc.add_VisibilityServiceServicer_to_server, servicer, SERVICE_NAME)
    kit.expose(store=store, servicer=servicer, crawls=crawls, runs=runs, announcer=announcer, fetcher=fetcher)


SERVICE = ServiceSpec("visibility", VisibilitySettings, build)
RunningVisibility = Kit[VisibilitySettings]


async def start(settings: VisibilitySettings, *, port: int | None = None, metrics: bool = True) -> RunningVisibility:
    """Start the visibility service and return its handle; ``port=0`` binds a free port."""
    return await service_kit.start_service(SERVICE, settings, port=port, metrics=metrics)


async def serve(settings: VisibilitySettings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    await service_kit.serve(SERVICE, settings)


if __name__ == "__main__":
    asyncio.run(serve())
