"""Knobs of the visibility service (`LLMO_VISIBILITY_*`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from llmo.core.settings import ServiceSettings, platform_fallback

DEFAULT_USER_AGENT = "LLMO-Visibility/1 (+https://github.com/llmo)"


class VisibilitySettings(ServiceSettings):
    service: ClassVar[str] = "visibility"

    engine_url: str = Field(default="", json_schema_extra=platform_fallback("router_http_url"))
    """OpenAI-compatible base URL of the answer engines a run names by router model (`/v1` is appended
    when missing). Unset: the router's (`LLMO_ROUTER_HTTP_URL`, set by `llmo up`), so every answer is
    routed and charged to the tenant who started the run; empty everywhere: only project engines with
    their own `base_url` can be asked."""
    engine_api_key: str = ""
    """Bearer key of this service at the router. It should be an admin tenant's key: the service names
    the tenant who started the run in `x-llmo-tenant`, so answers are charged to that tenant."""
    engine_timeout_s: float = Field(default=60.0, gt=0)
    """Deadline of one answer; a slower engine fails that answer with ENGINE_TIMEOUT, not the run."""
    engine_retries: int = Field(default=1, ge=0, le=5)
    """Retries of an answer whose engine timed out or was unavailable."""
    engine_concurrency: int = Field(default=8, ge=1, le=256)
    """Answers in flight at once, over every run."""
    engine_max_tokens: int = Field(default=700, ge=16)
    """Most tokens one answer may write."""
    fetch_allow: str = ""
    """Comma-separated CIDRs, addresses or host names the crawler may fetch although they are private,
    loopback or otherwise internal (for tests and intranet crawls). Empty: only public addresses."""
    fetch_timeout_s: float = Field(default=15.0, gt=0)
    """Deadline of one page fetch."""
    max_page_bytes: int = Field(default=5 * 2**20, ge=1024)
    """Largest page (after decompression) the crawler reads; larger ones fail with TOO_LARGE."""
    politeness: bool = True
    """Honour the per-host rate (at least `min_delay_s` between fetches, robots.txt Crawl-delay when
    slower) with latency-adaptive backoff. Off only for benchmarks against sites you own; robots.txt
    allow/disallow rules are obeyed either way."""
    min_delay_s: float = Field(default=1.0, ge=0.0)
    """Least delay between two fetches from one host while politeness is on."""
    robots_ttl_s: float = Field(default=86_400.0, gt=0)
    """How long a robots.txt is cached (RFC 9309 asks for at most 24 hours)."""
    embed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """MiniLM precision for passage and query embeddings: "auto" is bf16 on CPUs with native bf16
    (AVX512-BF16, AMX; about 2.4x faster, cosine >= 0.9999 to fp32), fp32 elsewhere."""
    extract_processes: int = Field(default=-1, ge=-1, le=64)
    """Worker processes that extract pages' main content for every crawl (spawned on a crawl's first
    page). -1: one per CPU but one (at least one, at most 4); 0: in a thread of the service."""
    crawl_workers: int = Field(default=2, ge=1)
    """Crawls executed at once (the others wait in PENDING)."""
    run_workers: int = Field(default=2, ge=1)
    """Share-of-voice runs executed at once."""
    max_active_runs: int = Field(default=4, ge=1)
    """PENDING or RUNNING share-of-voice runs one tenant may have (TOO_MANY_ACTIVE_RUNS past it)."""
    sov_resamples: int = Field(default=1000, ge=100, le=20_000)
    """Bootstrap resamples behind every interval of a share-of-voice run."""
    gap_similarity_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """A tracked query whose best crawled passage has a lower MiniLM cosine similarity is a NO_CONTENT gap."""
    publish_events: bool = True
    """Publish `llmo.visibility.v1.crawl_completed` and `llmo.visibility.v1.share_of_voice_changed`."""
