"""The extraction pool: pages extracted in spawned worker processes give what `extract_page` gives in
the service's own process, and a page that kills its worker fails alone while the pool starts anew."""

from __future__ import annotations

import asyncio

import pytest

from llmo.visibility.extract import extract_page
from llmo.visibility.extract_pool import ExtractionFailed, ExtractionPool, auto_processes
from tests.unit.visibility.crashing_extract import CRASH_MARK, extract_or_die
from tests.unit.visibility.site import article_html

pytestmark = pytest.mark.timeout(120)

URL = "http://127.0.0.1:8000/articles/3"


@pytest.mark.parametrize("processes", [0, 1])
async def test_pages_extracted_by_the_pool_equal_the_in_process_extraction(processes: int) -> None:
    pool = ExtractionPool(processes)
    try:
        pages = [article_html(i, 10).encode() for i in range(4)]
        got = await asyncio.gather(*(pool.extract(html, URL) for html in pages))
    finally:
        await pool.close()
    assert got == [extract_page(html, URL) for html in pages]
    assert got[0].passages and got[0].links and got[0].title


async def test_a_page_that_kills_its_worker_fails_alone_and_the_pool_starts_anew() -> None:
    pool = ExtractionPool(1, function=extract_or_die)
    good = article_html(1, 10).encode()
    bad = good.replace(b"<body>", b"<body>" + CRASH_MARK, 1)
    assert CRASH_MARK in bad
    try:
        # The good pages share the dying pool with the bad one: their second try in the new pool succeeds.
        results = await asyncio.gather(pool.extract(good, URL), pool.extract(bad, URL), pool.extract(good, URL),
                                       return_exceptions=True)
        assert isinstance(results[1], ExtractionFailed)
        assert results[0] == results[2] == extract_page(good, URL)
        assert pool.restarts == 2  # the bad page broke the pool, then the quarantine
        assert await pool.extract(good, URL) == extract_page(good, URL)  # the pool works after it
    finally:
        await pool.close()


def test_the_default_leaves_one_cpu_to_the_event_loop_and_caps_the_workers() -> None:
    assert [auto_processes(n) for n in (1, 2, 3, 8, 64)] == [1, 1, 2, 4, 4]
