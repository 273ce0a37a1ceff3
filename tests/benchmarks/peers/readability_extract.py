"""readability-lxml's main-content extraction over a benchmark directory in the ScrapingHub
article-extraction layout (`ground-truth.json` and `html/<id>.html.gz`), for `llmo bench visibility`.

Runs in .peers/visibility's python (scripts/peers_visibility.sh), never in the project's venv.
argv: BENCHMARK_DIR OUT.json. `Document(html).summary()` is HTML; its text is lxml's `text_content()`
after a line break is put behind every block element (so that two paragraphs do not run into one word).
Writes {item id: text} to OUT.json and prints one JSON line: {"items": n, "wall_s": seconds of the
extraction alone (reading the files excluded), "raised_on": ids readability raised on (their text is "")}.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import lxml.html
from readability import Document

BLOCKS = ("p", "div", "li", "br", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "td", "th")


def text_of(summary_html: str) -> str:
    """The visible text of readability's summary HTML, one line per block element."""
    if not summary_html.strip():
        return ""
    root = lxml.html.fromstring(summary_html)
    for element in root.iter(*BLOCKS):
        element.tail = "\n" + (element.tail or "")
    return str(root.text_content()).strip()


def main(directory: Path, out: Path) -> dict[str, object]:
    truth = json.loads((directory / "ground-truth.json").read_text(encoding="utf-8"))
    pages: dict[str, tuple[bytes, str]] = {}
    for item_id in sorted(truth):
        with gzip.open(directory / "html" / f"{item_id}.html.gz", "rb") as handle:
            pages[item_id] = (handle.read(), str(truth[item_id].get("url") or ""))
    texts: dict[str, str] = {}
    raised_on: list[str] = []
    started = time.perf_counter()
    for item_id, (html, url) in pages.items():
        try:
            texts[item_id] = text_of(Document(html, url=url or None).summary(html_partial=True))
        except Exception:  # readability gives up on some pages; the page then scores as empty
            texts[item_id] = ""
            raised_on.append(item_id)
    wall = time.perf_counter() - started
    out.write_text(json.dumps(texts), encoding="utf-8")
    return {"items": len(texts), "wall_s": wall, "raised_on": raised_on}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
