"""An extraction function whose worker process dies on pages that ask for it (the stand-in for a page
that crashes lxml), importable by the extraction pool's spawned workers."""

from __future__ import annotations

import os

from llmo.visibility.extract import ExtractedPage, extract_page

CRASH_MARK = b"<!-- crash the extraction worker -->"


def extract_or_die(html: bytes, url: str) -> ExtractedPage:
    if CRASH_MARK in html:
        os._exit(70)
    return extract_page(html, url)
