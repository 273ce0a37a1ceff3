"""`llmo bench visibility`: the visibility service measured side by side with the tools a user would pick
instead, one JSON object.

Areas (`--areas`, all by default), each measured in one run on this machine:

- `extraction`: token-level precision/recall/F1 (`llmo.visibility.extraction_eval`: the ScrapingHub
  article-extraction benchmark's metric) of our extractor, plain `trafilatura.extract` (in-process) and
  readability-lxml (a subprocess of `.peers/visibility`'s python: tests/benchmarks/peers/readability_extract.py)
  on the same items of `--data`; ratios ours/peer and the goal F1 >= 0.95 with `met`.
- `crawl`: throughput on the local test site (tests/unit/visibility/site.py, `--pages` article pages,
  served by a child process so that neither crawler shares its event loop with the site). Ours is the
  real service over gRPC (CreateProject with tracked queries, so relevance is computed; StartCrawl from
  `{base}/`; WatchCrawl to the end), politeness off, after a small warm-up crawl of another project that
  loads MiniLM. Scrapy (tests/benchmarks/peers/scrapy_crawl.py) follows the site's article links and
  extracts each page with trafilatura: our fetch + parse + extract without scoring and storage. Both
  unthrottled with `--concurrency` requests in flight per host and robots.txt obeyed. Ours without the
  relevance embeddings and Scrapy alternate `--repeats` times (3) and report their median trials. Pages/s,
  per core (divided by `os.cpu_count()`), per CPU-second (ours: the service process plus its extraction
  worker processes), ratio ours/scrapy with the goal >= 1.0. In-process:
  `extract_page` + `score_page` (prompt similarity from passage vectors computed beforehand) over the
  site's HTML fetched once, and again with the MiniLM passage embedding inside the loop; pages per
  CPU-second, goal >= 100 for parse + extract + score (`--profile` adds cProfile's top functions).
  Politeness: small crawls with politeness on and `requests_per_second=2`, once under the site's robots.txt
  (Crawl-delay 1) and once under a robots.txt without a delay; the highest request rate the site saw
  (most requests in any sliding 1 s window, smallest gap), for page fetches and for every request.
- `sov`: `llmo.visibility.sov_stats.simulate_coverage` at 50 prompts x 5 samples, `--coverage-runs` runs,
  true rates 0.1/0.3/0.5 and prompt spreads 0/0.15: coverage of the 95% interval and its mean width; goal
  coverage within 0.93-0.97 per cell.
- `ssrf`: every form of `netguard.ssrf_address_forms()` through a real `Fetcher` with the default policy
  (a form the policy would let through is not sent: nothing leaves the machine), counted tried/refused,
  with connections and DNS look-ups traced (both must stay 0); and the site's redirect to
  169.254.169.254 with 127.0.0.1 allowlisted, which must be refused at that hop.

`--smoke` builds a tiny extraction benchmark in a temp folder instead of reading `--data`, runs every
area at tiny sizes and skips the peers (what the test runs). Without `.peers/visibility`
(scripts/peers_visibility.sh) the peers are reported as skipped with the reason. Progress goes to stderr;
every float in the result is rounded to 4 digits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gzip
import importlib.util
import itertools
import json
import logging
import os
import platform
import pstats
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import numpy as np
from aiohttp.abc import AbstractResolver, ResolveResult

from llmo.core.logging import configure_logging, get_logger
from llmo.core.settings import PlatformSettings
from llmo.embedding import Embedder
from llmo.protos.visibility.v1 import visibility_service_pb2 as pb
from llmo.protos.visibility.v1 import visibility_service_pb2_grpc as pb_grpc
from llmo.visibility import extraction_eval
from llmo.visibility.crawl import brand_facts
from llmo.visibility.extract import ExtractedPage, extract_page
from llmo.visibility.fetcher import Fetcher
from llmo.visibility.main import RunningVisibility, start
from llmo.visibility.netguard import DEFAULT_POLICY, AddressPolicy, GuardedResolver, ssrf_address_forms
from llmo.visibility.page_scores import ScoringContext, score_page
from llmo.visibility.robots import RobotsRules, parse_robots
from llmo.visibility.settings import DEFAULT_USER_AGENT, VisibilitySettings
from llmo.visibility.sitemaps import parse_sitemap
from llmo.visibility.sov_stats import simulate_coverage

ROOT = Path(__file__).resolve().parents[2]
SITE_MODULE = ROOT / "tests" / "unit" / "visibility" / "site.py"
PEERS_DIR = Path(__file__).resolve().parent / "peers"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "visibility" / "article-extraction"
DEFAULT_PEERS_PYTHON = ROOT / ".peers" / "visibility" / "bin" / "python"
AREAS = ("extraction", "crawl", "sov", "ssrf")
GOALS = {"extraction_f1": 0.95, "crawl_ratio": 1.0, "score_pages_per_cpu_s": 100.0,
         "coverage_low": 0.93, "coverage_high": 0.97}
PROGRESS = "llmo.bench.visibility"
log = get_logger(PROGRESS)
QUERIES = ("how do answer engines rank sources", "does structured data help a page get cited",
           "does content freshness matter for AI answers", "citation share of answer engines")
POLITE_RPS = 2.0
# Arrival times are taken by the site, a network hop after the crawler's pacer: allow this much jitter.
TIMING_TOLERANCE_S = 0.02
DISCOVERY = re.compile(r"^/(robots\.txt|llms\.txt|sitemap[^/]*)$")
ARTICLE = re.compile(r"^/articles/\d+$")


# --- shared pieces ------------------------------------------------------------------------------


def progress(message: str, **fields: Any) -> None:
    """A progress line on stderr."""
    log.info(message, **fields)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def versions(names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def peer_versions(python: Path) -> dict[str, str] | None:
    """Package versions in the peers' venv (None when it is missing or broken)."""
    if not python.is_file():
        return None
    code = ("import json; from importlib.metadata import version as v; print(json.dumps({p: v(p) for p in "
            "('scrapy', 'readability-lxml', 'trafilatura', 'lxml', 'twisted')}))")
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return dict(json.loads(done.stdout))
    return None


def machine(peers_python: Path) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "python": platform.python_version(), "load_average_1m": os.getloadavg()[0],
            "packages": versions(("trafilatura", "lxml", "aiohttp", "grpcio", "numpy", "scipy", "torch",
                                  "sentence-transformers", "protego")),
            "peer_packages": peer_versions(peers_python)}


def rounded(value: Any, digits: int = 4) -> Any:
    """`value` with every float rounded to `digits` digits, in nested dicts and lists too."""
    if isinstance(value, float):
        return round(value, digits) if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most of `times` (seconds) that fall in any half-open window [t, t + window)."""
    ordered = sorted(times)
    best = first = 0
    for last, t in enumerate(ordered):
        while ordered[first] <= t - window:
            first += 1
        best = max(best, last - first + 1)
    return best


def min_gap(times: Sequence[float]) -> float | None:
    ordered = sorted(times)
    return min((b - a for a, b in itertools.pairwise(ordered)), default=None)


async def run_peer(python: Path, script: str, args: Sequence[str], cwd: Path, timeout: float) -> dict[str, Any]:
    """Run a peer script in the peers' venv; its last stdout line is its JSON result."""
    cwd.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(str(python), str(PEERS_DIR / script), *args, cwd=cwd,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return {"failed": f"{script} ran past {timeout:.0f}s"}
    if process.returncode != 0:
        return {"failed": f"{script} exited {process.returncode}: {stderr.decode(errors='replace')[-600:]}"}
    return dict(json.loads(stdout.decode().strip().splitlines()[-1]))


def peer_skip(args: argparse.Namespace) -> str | None:
    """Why the peers are not run, or None when they are."""
    if args.smoke:
        return "not run under --smoke (run without it; the peers need their own venv)"
    if not args.peers_python.is_file():
        return f"{args.peers_python} is missing: run scripts/peers_visibility.sh"
    return None


def load_site_module() -> ModuleType:
    """tests/unit/visibility/site.py, loaded by path (the bench may run from anywhere)."""
    spec = importlib.util.spec_from_file_location("llmo_bench_visibility_site", SITE_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its module by name
    spec.loader.exec_module(module)
    return module


# --- extraction ---------------------------------------------------------------------------------

_TOPICS = ("solar panels", "coffee roasting", "river kayaking", "sourdough bread", "bicycle repair")


def write_tiny_benchmark(root: Path) -> Path:
    """A generated benchmark directory in the ScrapingHub layout (5 articles wrapped in navigation,
    a sidebar and a footer; the truth is the article's paragraphs), for `--smoke`; returns `root`."""
    (root / "html").mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, topic in enumerate(_TOPICS):
        paragraphs = [f"Our guide to {topic} starts with the basics that every beginner should know before "
                      f"spending money on equipment or classes, part {k + 1} of a series written in {2020 + i}."
                      for k in range(4)]
        html = ("<!DOCTYPE html><html><head><title>" + topic.title() + "</title></head><body>"
                "<header><nav><a href='/'>Home</a> <a href='/shop'>Shop</a> <a href='/about'>About us</a></nav>"
                "</header><aside><h3>Popular</h3><ul><li><a href='/a'>Ten tricks you missed</a></li>"
                "<li><a href='/b'>Subscribe to our newsletter today</a></li></ul></aside>"
                f"<article><h1>All about {topic}</h1>" + "".join(f"<p>{p}</p>" for p in paragraphs) +
                "</article><footer>Copyright 2024 Example Media. All rights reserved.</footer></body></html>")
        item_id = f"item-{i}"
        (root / "html" / f"{item_id}.html.gz").write_bytes(gzip.compress(html.encode()))
        truth[item_id] = {"articleBody": "\n".join(paragraphs), "url": f"https://example.org/{item_id}"}
    (root / "ground-truth.json").write_text(json.dumps(truth))
    return root


def report_of(report: extraction_eval.ExtractionReport, seconds: float) -> dict[str, Any]:
    worst = sorted(report.per_item, key=lambda row: row[3])[:5]
    return {"items": report.items, "precision": report.precision, "recall": report.recall, "f1": report.f1,
            "micro_precision": report.micro_precision, "micro_recall": report.micro_recall,
            "micro_f1": report.micro_f1, "ms_per_item": 1000 * seconds / max(1, report.items),
            "worst_items": [{"id": i, "f1": f} for i, _, _, f in worst]}


def timed_report(items: Sequence[extraction_eval.BenchItem],
                 extract: Callable[[bytes, str], str]) -> dict[str, Any]:
    started = time.perf_counter()
    report = extraction_eval.evaluate_extractor(items, extract)
    return report_of(report, time.perf_counter() - started)


async def readability_peer(args: argparse.Namespace, items: Sequence[extraction_eval.BenchItem], data: Path,
                           scratch: Path) -> dict[str, Any]:
    reason = peer_skip(args)
    if reason:
        return {"skipped": reason}
    out = scratch / "readability.json"
    result = await run_peer(args.peers_python, "readability_extract.py", [str(data), str(out)], scratch,
                            args.peer_timeout)
    if "failed" in result:
        return result
    texts: dict[str, str] = json.loads(out.read_text(encoding="utf-8"))
    if sorted(texts) != sorted(i.item_id for i in items):
        return {"failed": "readability extracted other items than the benchmark holds"}
    by_html = {item.html: texts[item.item_id] for item in items}
    report = extraction_eval.evaluate_extractor(items, lambda html, _url: by_html[html])
    return {**report_of(report, float(result["wall_s"])), "raised_on": result["raised_on"],
            "text": "lxml text_content() of readability's summary HTML, a line break after each block element"}


async def extraction_area(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    data = write_tiny_benchmark(scratch / "tiny-benchmark") if args.smoke else args.data
    try:
        items = extraction_eval.load_benchmark(data)
    except ValueError as error:
        return {"skipped": f"{error} (pass --data, or --smoke)"}
    progress("extraction: ours", items=len(items))
    ours = timed_report(items, extraction_eval.our_extractor)
    progress("extraction: trafilatura default")
    peers = {"trafilatura_default": timed_report(items, extraction_eval.trafilatura_default)}
    progress("extraction: readability-lxml")
    peers["readability_lxml"] = await readability_peer(args, items, data, scratch / "readability")
    measured = {name: p for name, p in peers.items() if "f1" in p}
    return {"data": "generated (--smoke)" if args.smoke else str(data), "items": len(items),
            "metric": "token-level P/R/F1 (lower-cased \\w+ tokens, multiset overlap); mean per item and micro",
            "ours": ours, "peers": peers,
            "ratios_ours_over_peer": {name: {"f1": ratio(ours["f1"], p["f1"]),
                                             "micro_f1": ratio(ours["micro_f1"], p["micro_f1"]),
                                             "ms_per_item": ratio(ours["ms_per_item"], p["ms_per_item"])}
                                      for name, p in measured.items()},
            "goal": {"f1_at_least": GOALS["extraction_f1"], "f1": ours["f1"],
                     "met": ours["f1"] >= GOALS["extraction_f1"]}}


# --- crawl --------------------------------------------------------------------------------------

# The child process that serves the test site: prints its base URL, serves until stdin closes, and
# answers GET /__bench/log?since=N with the requests the site logged from the N-th on.
_SITE_CHILD = """
import asyncio, importlib.util, sys
from aiohttp import web
spec = importlib.util.spec_from_file_location("bench_site", sys.argv[1])
site = importlib.util.module_from_spec(spec)
sys.modules["bench_site"] = site
spec.loader.exec_module(site)

async def main():
    app = site.make_site(pages=int(sys.argv[2]))

    async def bench_log(request):
        entries = [e for e in request.app["log"] if not e[1].startswith("/__bench")]
        return web.json_response([[t, path] for t, path, _ in entries[int(request.query.get("since", 0)):]])

    app.router.add_get("/__bench/log", bench_log)
    async with site.serve_site(app) as base:
        print(base, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class ChildSite:
    """The test site with `pages` articles, served by a child process of this python."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.base = ""
        self._process: asyncio.subprocess.Process | None = None
        self._seen = 0

    async def __aenter__(self) -> ChildSite:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SITE_CHILD, str(SITE_MODULE), str(self.pages),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 60)
        self.base = line.decode().strip()
        if not self.base.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the site child did not start: {line!r}")
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 10)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()

    async def new_requests(self) -> list[tuple[float, str]]:
        """The requests the site served since the last call: (arrival time, path)."""
        async with aiohttp.ClientSession() as session, session.get(
                f"{self.base}/__bench/log", params={"since": str(self._seen)}) as response:
            entries = [(float(t), str(p)) for t, p in await response.json()]
        self._seen += len(entries)
        return entries


def request_kinds(requests: Sequence[tuple[float, str]]) -> dict[str, int]:
    kinds: Counter[str] = Counter()
    for _, path in requests:
        kinds["article" if ARTICLE.match(path) else "discovery" if DISCOVERY.match(path) else "other"] += 1
    return {"total": len(requests), **dict(sorted(kinds.items()))}


def service_settings(data: Path, *, polite: bool) -> VisibilitySettings:
    data.mkdir(parents=True, exist_ok=True)
    return VisibilitySettings(database_url=f"sqlite:///{data / 'visibility.db'}", metrics_port=-1, engine_url="",
                              fetch_allow="127.0.0.1", politeness=polite, min_delay_s=0.0, publish_events=False,
                              platform=PlatformSettings(data_dir=data, nats_url="nats://127.0.0.1:1",
                                                        drain_seconds=0.2))


@contextlib.asynccontextmanager
async def service(data: Path, *, polite: bool) -> AsyncIterator[pb_grpc.VisibilityServiceStub]:
    running: RunningVisibility = await start(service_settings(data, polite=polite), port=0, metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield pb_grpc.VisibilityServiceStub(channel)
    finally:
        await channel.close()
        await running.stop()


def bench_project(relevance: bool = True) -> pb.Project:
    """The crawled brand; with `relevance`, tracked queries too (every page's passages are embedded)."""
    return pb.Project(brand=pb.Brand(name="Acme Analytics", aliases=["Acme"],
                                     description="Acme Analytics measures how answer engines cite brands."),
                      domains=["127.0.0.1"],
                      queries=[pb.TrackedQuery(text=q, weight=1.0) for q in QUERIES] if relevance else [])


async def crawl(stub: pb_grpc.VisibilityServiceStub, project_id: str, base: str,
                config: pb.CrawlConfig, relevance: bool = True) -> tuple[pb.Crawl, float, float]:
    """Create the project, crawl it from `{base}/` to the end; (final crawl, wall s, CPU s of this process)."""
    await stub.CreateProject(pb.CreateProjectRequest(project_id=project_id, project=bench_project(relevance)))
    started, cpu = time.perf_counter(), time.process_time()
    created = (await stub.StartCrawl(pb.StartCrawlRequest(parent=f"projects/{project_id}", crawl_id="bench",
                                                          crawl=pb.Crawl(seed_urls=[f"{base}/"], config=config)))).crawl
    final = created
    async for reply in stub.WatchCrawl(pb.WatchCrawlRequest(name=created.name)):
        final = reply.crawl
    return final, time.perf_counter() - started, time.process_time() - cpu


def progress_of(crawled: pb.Crawl) -> dict[str, int]:
    p = crawled.progress
    return {"discovered": p.pages_discovered, "fetched": p.pages_fetched, "failed": p.pages_failed,
            "disallowed": p.pages_disallowed, "trapped": p.pages_trapped, "queued": p.pages_queued,
            "unchanged": p.pages_unchanged}


def throughput(pages: int, wall: float, cpu: float) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    return {"pages": pages, "wall_s": wall, "cpu_s": cpu, "pages_per_s": pages / wall,
            "pages_per_s_per_core": pages / wall / cores, "pages_per_cpu_s": pages / cpu if cpu else None}


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def our_crawl(args: argparse.Namespace, site: ChildSite, data: Path, relevance: bool = True) -> dict[str, Any]:
    """One crawl of the site by the real service. `relevance`: the project tracks queries, so every page's
    passages are embedded with MiniLM for the relevance pillar; without, the crawl does what the Scrapy
    spider does (fetch, parse, extract) plus scoring the other pillars and storing every page. The CPU
    counted is this process's during the crawl plus the extraction workers' over the service's life
    (their start included: they exit, and are reaped, when the service stops)."""
    children_before = children_cpu_s()
    async with service(data, polite=False) as stub:
        progress("crawl: ours, warm-up crawl (loads MiniLM, starts the extraction workers)")
        await crawl(stub, "warmup", site.base, pb.CrawlConfig(max_pages=5, concurrency=args.concurrency))
        await site.new_requests()
        progress("crawl: ours", pages=args.pages, concurrency=args.concurrency, relevance=relevance)
        final, wall, cpu = await crawl(stub, "bench", site.base,
                                       pb.CrawlConfig(max_pages=args.pages, concurrency=args.concurrency), relevance)
    workers_cpu = children_cpu_s() - children_before
    counts = progress_of(final)
    return {"state": pb.JobState.Name(final.state), "progress": counts,  # type: ignore[arg-type]
            **throughput(counts["fetched"] + counts["failed"], wall, cpu + workers_cpu),
            "service_process_cpu_s": cpu, "extraction_workers_cpu_s": workers_cpu,
            "site_requests": request_kinds(await site.new_requests()),
            "mean_overall_score": final.summary.mean_overall,
            "work": "fetch, robots.txt, sitemaps, parse, extract, " + ("MiniLM passage embedding, " if relevance
                                                                       else "") + "score, store (sqlite)"}


async def scrapy_crawl(args: argparse.Namespace, site: ChildSite, scratch: Path) -> dict[str, Any]:
    reason = peer_skip(args)
    if reason:
        return {"skipped": reason}
    progress("crawl: scrapy", pages=args.pages, concurrency=args.concurrency)
    result = await run_peer(args.peers_python, "scrapy_crawl.py", [site.base, str(args.pages), str(args.concurrency)],
                            scratch, args.peer_timeout)
    if "failed" in result:
        return result
    return {**throughput(int(result["pages"]), float(result["wall_s"]), float(result["cpu_s"])),
            "responses": result["responses"], "status_counts": result["status_counts"],
            "finish_reason": result["finish_reason"], "mean_text_chars": result["mean_text_chars"],
            "site_requests": request_kinds(await site.new_requests()),
            "work": "fetch, robots.txt, parse links (article links, breadth-first), trafilatura extract"}


@dataclass
class FetchedSite:
    """What the in-process loops score: the pages (url, HTML, Last-Modified), the site's robots.txt
    rules and its sitemap's lastmod per URL, each fetched once."""

    pages: list[tuple[str, bytes, str]]
    robots: RobotsRules
    lastmod: dict[str, datetime]


async def fetch_site(base: str, pages: int) -> FetchedSite:
    """The site's start page and its first `pages` articles, its robots.txt and its page sitemap."""
    urls = [f"{base}/", *(f"{base}/articles/{i}" for i in range(pages))]
    async with aiohttp.ClientSession() as session:
        async def one(url: str) -> tuple[str, bytes, str]:
            async with session.get(url) as response:
                return url, await response.read(), response.headers.get("Last-Modified", "")

        fetched = list(await asyncio.gather(*(one(u) for u in urls)))
        _, robots, _ = await one(f"{base}/robots.txt")
        _, sitemap, _ = await one(f"{base}/sitemap-pages.xml.gz")
    lastmod = {e.loc: e.lastmod for e in parse_sitemap(sitemap).urls if e.lastmod is not None}
    return FetchedSite(fetched, parse_robots(base, robots), lastmod)


def _similarity(queries: np.ndarray, passages: np.ndarray) -> list[float]:
    if not len(passages):
        return [0.0] * len(queries)
    return [float(v) for v in (queries @ passages.T).max(axis=1)]


def score_loop(site: FetchedSite, queries: np.ndarray, passage_vectors: Sequence[np.ndarray] | None,
               embedder: Embedder | None, first: int | None = None) -> dict[str, Any]:
    """extract_page + score_page over the site's (`first`) pages one by one with the context the crawl
    gives them (brand, robots.txt, sitemap lastmod, Last-Modified), the relevance pillar from
    `passage_vectors` (or, with `embedder`, from the page's passages embedded inside the loop)."""
    pages = site.pages[:first]
    brand = brand_facts(bench_project())
    spent: dict[str, float] = {"extract": 0.0, "embed": 0.0, "similarity_and_score": 0.0}
    overall = []
    wall, cpu = time.perf_counter(), time.process_time()
    for i, (url, html, last_modified) in enumerate(pages):
        t0 = time.perf_counter()
        page: ExtractedPage = extract_page(html, url)
        t1 = time.perf_counter()
        vectors = embedder.encode(page.passages) if embedder is not None else passage_vectors[i]  # type: ignore[index]
        t2 = time.perf_counter()
        context = ScoringContext(brand=brand, prompt_similarity=_similarity(queries, vectors),
                                 sitemap_lastmod=site.lastmod.get(url), http_last_modified=_http_date(last_modified),
                                 noindex=page.noindex, ai_bots_blocked=site.robots.answer_crawlers_blocked(url))
        overall.append(score_page(page, context).overall)
        t3 = time.perf_counter()
        spent["extract"] += t1 - t0
        spent["embed"] += t2 - t1
        spent["similarity_and_score"] += t3 - t2
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(pages)
    return {"pages": n, "wall_s": wall, "cpu_s": cpu, "pages_per_s": n / wall, "pages_per_cpu_s": n / cpu,
            "ms_per_page": {k: 1000 * v / n for k, v in spent.items() if embedder is not None or k != "embed"},
            "mean_overall_score": float(np.mean(overall))}


def _http_date(value: str) -> datetime | None:
    from email.utils import parsedate_to_datetime

    with contextlib.suppress(TypeError, ValueError, IndexError):
        return parsedate_to_datetime(value)
    return None


def profile_top(call: Callable[[], object], top: int = 15) -> list[dict[str, Any]]:
    """cProfile's `top` functions by own time while running `call`."""
    profiler = cProfile.Profile()
    profiler.runcall(call)
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": own,
                     "cumulative_s": cumulative})
    rows.sort(key=lambda r: -r["own_s"])
    return rows[:top]


async def in_process(args: argparse.Namespace, site: ChildSite) -> dict[str, Any]:
    fetched = await fetch_site(site.base, min(args.score_pages, args.pages))
    pages = fetched.pages
    await site.new_requests()
    embedder = Embedder(max_seq_length=128, precision=VisibilitySettings().embed_precision)  # as the service's
    progress("crawl: in-process parse + extract + score", pages=len(pages))
    queries = embedder.encode(list(QUERIES))
    passages = [extract_page(html, url).passages for url, html, _ in pages]
    vectors = [embedder.encode(p) for p in passages]
    score_loop(fetched, queries, vectors, None, first=5)  # warm-up
    scored = score_loop(fetched, queries, vectors, None)
    progress("crawl: in-process with the MiniLM passage embedding")
    embedded = score_loop(fetched, queries, None, embedder)
    out: dict[str, Any] = {
        "pages": len(pages), "mean_passages_per_page": float(np.mean([len(p) for p in passages])),
        "parse_extract_score": scored, "parse_extract_embed_score": embedded, "embed_precision": embedder.precision,
        "note": "one thread (the embedding may use more: pages_per_cpu_s counts every thread's CPU)",
        "goal": {"pages_per_cpu_s_at_least": GOALS["score_pages_per_cpu_s"],
                 "pages_per_cpu_s": scored["pages_per_cpu_s"],
                 "met": scored["pages_per_cpu_s"] >= GOALS["score_pages_per_cpu_s"]}}
    with contextlib.suppress(ImportError):
        import torch

        out["torch_threads"] = torch.get_num_threads()
    if args.profile:
        progress("crawl: profiling the parse + extract + score loop")
        out["profile_parse_extract_score"] = profile_top(lambda: score_loop(fetched, queries, vectors, None))
    return out


def rate_check(times: Sequence[float], expected_rate: float) -> dict[str, Any]:
    gap = min_gap(times)
    window = max_in_window(times, 1.0 - TIMING_TOLERANCE_S)
    return {"requests": len(times), "max_in_any_1s_window": window, "min_gap_s": gap,
            "max_rate_from_min_gap": 1 / gap if gap else None,
            "met": window <= expected_rate and (gap is None or gap >= 1 / expected_rate - TIMING_TOLERANCE_S)}


async def politeness(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Crawls with politeness on at POLITE_RPS: under the site's robots.txt (Crawl-delay 1), and under one
    without a delay. The pacer's expected rate is the slower of the two."""
    site_module = load_site_module()
    cases = (("site_robots_crawl_delay_1s", None, 1.0), ("robots_without_crawl_delay", b"User-agent: *\nAllow: /\n", None))
    out: dict[str, Any] = {"requests_per_second": POLITE_RPS, "concurrency": 4, "max_pages": args.polite_pages,
                           "timing_tolerance_s": TIMING_TOLERANCE_S, "cases": {}}
    async with service(data, polite=True) as stub:
        for n, (name, robots, crawl_delay) in enumerate(cases):
            app = site_module.make_site(pages=30)
            if robots is not None:
                app["config"].robots_body = robots
            async with site_module.serve_site(app) as base:
                progress("crawl: politeness", case=name, pages=args.polite_pages)
                final, wall, _ = await crawl(stub, f"polite-{n}", base, pb.CrawlConfig(
                    max_pages=args.polite_pages, requests_per_second=POLITE_RPS, concurrency=4))
            expected = min(POLITE_RPS, 1 / crawl_delay) if crawl_delay else POLITE_RPS
            every = [t for t, _, _ in app["log"]]
            page_times = [t for t, path, _ in app["log"] if not DISCOVERY.match(path)]
            pages = rate_check(page_times, expected)
            everything = rate_check(every, expected)
            out["cases"][name] = {"robots_crawl_delay_s": crawl_delay, "expected_max_rate": expected,
                                  "state": pb.JobState.Name(final.state),  # type: ignore[arg-type]
                                  "progress": progress_of(final), "wall_s": wall, "page_fetches": pages,
                                  "all_requests": everything,
                                  "met": pages["met"] and everything["met"]}
    out["note"] = ("page_fetches: every request but robots.txt, llms.txt and the sitemaps (what the crawl's "
                   "discovery fetches before the first page); all_requests: every request the host saw; met "
                   "needs both")
    out["met"] = all(c["met"] for c in out["cases"].values())
    return out


def median_trial(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the median pages/s (the lower middle one of an even count), with every trial's rate."""
    if not trials or "pages_per_s" not in trials[0]:
        return dict(trials[0]) if trials else {}
    ranked = sorted(trials, key=lambda t: t["pages_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "trials_pages_per_s": [t["pages_per_s"] for t in trials]}


async def crawl_area(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Ours without relevance and Scrapy do the comparable work; they alternate `--repeats` times and each
    reports its median trial (this VM's speed drifts by 2x within minutes: alternating spreads the drift
    over both). Ours with relevance, the in-process loops and the politeness checks run once."""
    out: dict[str, Any] = {"pages": args.pages, "concurrency_per_host": args.concurrency,
                           "cores": os.cpu_count(), "repeats": args.repeats,
                           "politeness": "off for the throughput crawls"}
    plain: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    async with ChildSite(args.pages) as site:
        out["ours"] = await our_crawl(args, site, scratch / "ours")
        for trial in range(args.repeats):
            plain.append(await our_crawl(args, site, scratch / f"ours-plain-{trial}", relevance=False))
            peer.append(await scrapy_crawl(args, site, scratch / f"scrapy-{trial}"))
        out["in_process"] = await in_process(args, site)
    out["ours_without_relevance"], out["scrapy"] = median_trial(plain), median_trial(peer)
    scrapy = out["scrapy"]
    measured = "pages_per_s" in scrapy
    for key, ours in (("", out["ours"]), ("_without_relevance", out["ours_without_relevance"])):
        out[f"ratio_ours{key}_over_scrapy"] = {
            "pages_per_s": ratio(ours["pages_per_s"], scrapy["pages_per_s"]),
            "pages_per_cpu_s": ratio(ours["pages_per_cpu_s"], scrapy["pages_per_cpu_s"])} if measured else None
    if measured:
        out["ratio_ours_without_relevance_over_scrapy"]["per_trial_pages_per_s"] = [
            ratio(a["pages_per_s"], b["pages_per_s"]) for a, b in zip(plain, peer, strict=True)]
    out["goal"] = {"pages_per_s_ratio_at_least": GOALS["crawl_ratio"],
                   "met": out["ratio_ours_over_scrapy"]["pages_per_s"] >= GOALS["crawl_ratio"] if measured else None,
                   "met_without_relevance": out["ratio_ours_without_relevance_over_scrapy"]["pages_per_s"]
                   >= GOALS["crawl_ratio"] if measured else None}
    out["politeness_check"] = await politeness(args, scratch / "polite")
    return out


# --- share of voice -----------------------------------------------------------------------------


def sov_area(args: argparse.Namespace) -> dict[str, Any]:
    cells = []
    for rate in (0.1, 0.3, 0.5):
        for spread in (0.0, 0.15):
            progress("sov: coverage", rate=rate, spread=spread, runs=args.coverage_runs)
            started = time.perf_counter()
            result = simulate_coverage(rate, args.prompts, args.samples, args.coverage_runs, prompt_spread=spread,
                                       seed=args.seed, resamples=args.resamples)
            cells.append({"true_rate": rate, "prompt_spread": spread, "coverage": result.coverage,
                          "mean_ci_width": result.mean_width,
                          "coverage_standard_error": float(np.sqrt(0.95 * 0.05 / result.runs)),
                          "seconds": time.perf_counter() - started,
                          "met": GOALS["coverage_low"] <= result.coverage <= GOALS["coverage_high"]})
    return {"prompts": args.prompts, "samples_per_prompt": args.samples, "runs": args.coverage_runs,
            "resamples": args.resamples, "confidence": 0.95, "metric": "mention_rate", "cells": cells,
            "goal": {"coverage_within": [GOALS["coverage_low"], GOALS["coverage_high"]],
                     "met": all(c["met"] for c in cells)}}


# --- ssrf ---------------------------------------------------------------------------------------


class NoLookups(AbstractResolver):
    """A resolver that refuses every name and counts the attempts (no DNS traffic at all)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:  # type: ignore[override]
        self.calls.append(host)
        raise OSError(f"the bench resolves no names ({host})")

    async def close(self) -> None:
        return None


async def ssrf_area() -> dict[str, Any]:
    forms = ssrf_address_forms()
    inner = NoLookups()
    connections: list[str] = []

    async def on_connect(_session: aiohttp.ClientSession, _ctx: SimpleNamespace, params: object) -> None:
        connections.append(repr(params))

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(on_connect)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(DEFAULT_POLICY, inner))
    reasons: Counter[str] = Counter()
    not_refused: list[dict[str, str]] = []
    not_sent: list[str] = []
    progress("ssrf: hostile address forms", forms=len(forms))
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace], auto_decompress=False,
                                     trust_env=False) as session, \
            Fetcher(user_agent=DEFAULT_USER_AGENT, session=session, timeout_s=5.0) as fetcher:
        for url, description in forms:
            if DEFAULT_POLICY.check_host(urlsplit(url).hostname or "") is None:
                not_sent.append(url)  # the policy would let it through: never sent from here
                continue
            result = await fetcher.fetch(url)
            reasons[result.error_reason or "fetched"] += 1
            if result.error_reason != "SSRF_BLOCKED":
                not_refused.append({"url": url, "description": description, "outcome": result.error_reason or "fetched"})
    tried = len(forms) - len(not_sent)
    refused = reasons["SSRF_BLOCKED"]
    out: dict[str, Any] = {
        "forms": len(forms), "tried": tried, "refused": refused, "outcomes": dict(reasons),
        "not_refused": not_refused, "allowed_by_policy_not_sent": not_sent,
        "connections_opened": len(connections), "dns_lookups": len(inner.calls),
        "met": refused == len(forms) and not connections and not inner.calls}
    site_module = load_site_module()
    app = site_module.make_site(pages=3)
    async with site_module.serve_site(app) as base, Fetcher(user_agent=DEFAULT_USER_AGENT,
                                                            policy=AddressPolicy(["127.0.0.1"]), timeout_s=5.0) as local:
        result = await local.fetch(f"{base}/evil-redirect")
    out["metadata_redirect"] = {"url": "/evil-redirect on the local site (127.0.0.1 allowlisted)",
                                "redirects": list(result.redirects), "outcome": result.error_reason or "fetched",
                                "message": result.error_message,
                                "met": result.error_reason == "SSRF_BLOCKED"
                                and list(result.redirects) == ["http://169.254.169.254/latest/meta-data/"]}
    out["met"] = out["met"] and out["metadata_redirect"]["met"]
    return out


# --- the run ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmo bench visibility", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="article-extraction benchmark directory (ground-truth.json, html/*.html.gz)")
    parser.add_argument("--areas", default=",".join(AREAS), help=f"comma-separated subset of {','.join(AREAS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="a generated tiny extraction benchmark, tiny sizes, peers skipped (what the test runs)")
    parser.add_argument("--json", action="store_true", help="accepted for symmetry: the result is always one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--pages", type=int, default=None, help="article pages of the test site and max_pages (1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="fetches in flight per host, both crawlers (16)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating trials of ours (without relevance) and Scrapy; medians reported (3)")
    parser.add_argument("--score-pages", type=int, default=None, help="pages of the in-process loops (500)")
    parser.add_argument("--polite-pages", type=int, default=None, help="max_pages of each politeness crawl (8)")
    parser.add_argument("--profile", action="store_true", help="add cProfile's top functions of the scoring loop")
    parser.add_argument("--coverage-runs", type=int, default=None, help="simulated runs per coverage cell (1000)")
    parser.add_argument("--resamples", type=int, default=None, help="bootstrap resamples per interval (1000)")
    parser.add_argument("--prompts", type=int, default=50, help="prompts per simulated run (50)")
    parser.add_argument("--samples", type=int, default=5, help="samples per prompt (5)")
    parser.add_argument("--peers-python", type=Path, default=DEFAULT_PEERS_PYTHON,
                        help="python of the venv with Scrapy and readability-lxml (scripts/peers_visibility.sh)")
    parser.add_argument("--peer-timeout", type=float, default=900.0, help="seconds per peer subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(list(argv))
    args.areas = [a.strip() for a in args.areas.split(",") if a.strip()]
    unknown = set(args.areas) - set(AREAS)
    if unknown:
        parser.error(f"unknown areas {sorted(unknown)}; choose from {','.join(AREAS)}")
    sizes = ({"pages": 30, "repeats": 1, "score_pages": 30, "polite_pages": 3, "coverage_runs": 20, "resamples": 200} if args.smoke
             else {"pages": 1000, "repeats": 3, "score_pages": 500, "polite_pages": 8, "coverage_runs": 1000, "resamples": 1000})
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str]) -> dict[str, Any]:
    """Run the chosen areas and return the result (also written to `--out`)."""
    args = parse_args(argv)
    configure_logging("visibility-bench", level="warning")
    logging.getLogger(PROGRESS).setLevel(logging.WARNING if args.quiet else logging.INFO)
    result: dict[str, Any] = {
        "bench": "visibility", "command": " ".join(["llmo bench visibility", *argv]),
        "machine": machine(args.peers_python), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "options": {"areas": args.areas, **{k: getattr(args, k) for k in (
            "pages", "concurrency", "repeats", "score_pages", "polite_pages", "coverage_runs", "resamples", "prompts",
            "samples", "seed")}, "data": "generated (--smoke)" if args.smoke else str(args.data)},
        "timings_s": {}}
    with tempfile.TemporaryDirectory(prefix="llmo-bench-visibility-") as tmp:
        scratch = Path(tmp)
        runners: dict[str, Callable[[], Any]] = {
            "extraction": lambda: asyncio.run(extraction_area(args, scratch / "extraction")),
            "crawl": lambda: asyncio.run(crawl_area(args, scratch / "crawl")),
            "sov": lambda: sov_area(args),
            "ssrf": lambda: asyncio.run(ssrf_area()),
        }
        for area in AREAS:
            if area in args.areas:
                started = time.perf_counter()
                result[area] = runners[area]()
                result["timings_s"][area] = time.perf_counter() - started
    result = rounded(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
