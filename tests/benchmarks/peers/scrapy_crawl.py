"""Scrapy's side of `llmo bench visibility`'s crawl throughput: a `scrapy bench`-style CrawlSpider over the
local test site that does the work our crawler does per page minus scoring and storage: fetch, parse the
links (following the site's article links breadth-first), and extract the main content with trafilatura
(the same call and options as `llmo.visibility.extract`).

Runs in .peers/visibility's python (scripts/peers_visibility.sh), never in the project's venv.
argv: BASE_URL MAX_PAGES CONCURRENCY. Unthrottled like our crawler with politeness off: no download delay,
AutoThrottle off, CONCURRENCY requests in flight per domain, robots.txt obeyed. Stops after MAX_PAGES
responses (Scrapy's CLOSESPIDER_PAGECOUNT; the requests already in flight still finish).
Prints one JSON line: {"pages": pages extracted, "responses", "wall_s" (spider open to close), "cpu_s"
(this process, same span), "mean_text_chars", "finish_reason", "status_counts"}.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import trafilatura
from scrapy import signals
from scrapy.crawler import CrawlerProcess
from scrapy.http import Response
from scrapy.linkextractors import LinkExtractor
from scrapy.spiders import CrawlSpider, Rule

warnings.filterwarnings("ignore")


class SiteSpider(CrawlSpider):
    """Follows the site's article links from the start page and extracts every page's main content."""

    name = "llmo-bench-site"
    rules = (Rule(LinkExtractor(allow=(r"/articles/\d+$",)), callback="parse_page", follow=True),)

    def __init__(self, base: str, **kwargs: Any) -> None:
        self.start_urls = [f"{base}/"]
        self.allowed_domains = ["127.0.0.1"]
        self.text_chars: list[int] = []
        self.statuses: Counter[int] = Counter()
        super().__init__(**kwargs)

    def parse_start_url(self, response: Response, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return self.parse_page(response)

    def parse_page(self, response: Response) -> Iterator[dict[str, Any]]:
        self.statuses[response.status] += 1
        text = trafilatura.extract(response.text, url=response.url, include_comments=False, include_tables=True,
                                   favor_precision=True) or ""
        self.text_chars.append(len(text))
        yield {"url": response.url, "chars": len(text)}


def main(base: str, max_pages: int, concurrency: int) -> dict[str, Any]:
    process = CrawlerProcess(settings={
        "LOG_LEVEL": "ERROR", "TELNETCONSOLE_ENABLED": False, "ROBOTSTXT_OBEY": True,
        "AUTOTHROTTLE_ENABLED": False, "DOWNLOAD_DELAY": 0, "RANDOMIZE_DOWNLOAD_DELAY": False,
        "CONCURRENT_REQUESTS": concurrency, "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        "CLOSESPIDER_PAGECOUNT": max_pages, "HTTPCACHE_ENABLED": False, "COOKIES_ENABLED": False,
        # breadth-first, as our crawler's frontier
        "DEPTH_PRIORITY": 1, "SCHEDULER_DISK_QUEUE": "scrapy.squeues.PickleFifoDiskQueue",
        "SCHEDULER_MEMORY_QUEUE": "scrapy.squeues.FifoMemoryQueue",
    })
    crawler = process.create_crawler(SiteSpider)
    span: dict[str, float] = {}

    def opened() -> None:
        span["wall"], span["cpu"] = time.perf_counter(), time.process_time()

    def closed() -> None:
        span["wall"], span["cpu"] = time.perf_counter() - span["wall"], time.process_time() - span["cpu"]

    crawler.signals.connect(opened, signal=signals.spider_opened)
    crawler.signals.connect(closed, signal=signals.spider_closed)
    process.crawl(crawler, base=base)
    process.start()
    spider = crawler.spider
    assert isinstance(spider, SiteSpider) and crawler.stats is not None
    stats = crawler.stats.get_stats()
    chars = spider.text_chars
    return {"pages": len(chars), "responses": int(stats.get("downloader/response_count", 0)),
            "wall_s": span["wall"], "cpu_s": span["cpu"],
            "mean_text_chars": sum(chars) / len(chars) if chars else 0.0,
            "finish_reason": str(stats.get("finish_reason", "")),
            "status_counts": {str(k): v for k, v in sorted(spider.statuses.items())}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
