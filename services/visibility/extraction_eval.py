"""Main-content extraction quality on the ScrapingHub article-extraction-benchmark layout.

A benchmark directory holds `html/<id>.html.gz` (gzip-compressed HTML) and `ground-truth.json`
(`{id: {"articleBody": "...", "url": "..."}}`). The metric is the benchmark's token overlap: both texts
are lower-cased and split into `\\w+` tokens, and the overlap is the size of the multiset intersection.
precision = overlap / predicted tokens, recall = overlap / truth tokens, F1 their harmonic mean.
Edge cases: both empty is a perfect 1/1/1; an empty prediction against a non-empty truth is 0/0/0 and a
non-empty prediction against an empty truth is precision 0, recall 1, F1 0.

The report gives the mean of the per-item values and the micro values (overlaps and token counts summed
over all items before dividing).

Example: `python -m llmo.visibility.extraction_eval /path/to/benchmark` prints both our extractor's and
plain `trafilatura.extract`'s numbers.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmo.core.logging import get_logger
from llmo.visibility.extract import extract_page

log = get_logger(__name__)

_TOKEN_RE = re.compile(r"\w+")


@dataclass
class BenchItem:
    """One benchmark page: its id (the file stem), raw HTML bytes, true article body and URL."""

    item_id: str
    html: bytes
    truth: str
    url: str


@dataclass
class ExtractionReport:
    """Mean per-item and micro precision/recall/F1 over `items` pages."""

    items: int
    precision: float
    recall: float
    f1: float
    micro_precision: float
    micro_recall: float
    micro_f1: float
    per_item: list[tuple[str, float, float, float]] = field(default_factory=list)


def _tokens(text: str) -> Counter[str]:
    return Counter(_TOKEN_RE.findall(text.lower()))


def _prf(overlap: int, predicted: int, truth: int) -> tuple[float, float, float]:
    if predicted == 0 and truth == 0:
        return 1.0, 1.0, 1.0
    precision = overlap / predicted if predicted else 0.0
    recall = overlap / truth if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def token_prf(predicted: str, truth: str) -> tuple[float, float, float]:
    """Token-level (precision, recall, F1) of `predicted` against `truth` (module docstring)."""
    p, t = _tokens(predicted), _tokens(truth)
    return _prf(sum((p & t).values()), sum(p.values()), sum(t.values()))


def load_benchmark(directory: Path) -> list[BenchItem]:
    """Read a benchmark directory; items are sorted by id. Raises ValueError when it is incomplete."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"benchmark directory {directory} does not exist")
    truth_path = directory / "ground-truth.json"
    if not truth_path.is_file():
        raise ValueError(f"benchmark directory {directory} has no ground-truth.json")
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{truth_path} is not valid JSON: {exc}") from exc
    if not isinstance(truth, dict):
        raise ValueError(f"{truth_path} must map item ids to {{articleBody, url}} objects")
    items: list[BenchItem] = []
    for item_id in sorted(truth):
        entry = truth[item_id]
        html_path = directory / "html" / f"{item_id}.html.gz"
        if not html_path.is_file():
            raise ValueError(f"item {item_id} has no {html_path}")
        if not isinstance(entry, dict):
            raise ValueError(f"ground truth of item {item_id} must be an object")
        with gzip.open(html_path, "rb") as fh:
            html = fh.read()
        items.append(BenchItem(item_id, html, str(entry.get("articleBody") or ""), str(entry.get("url") or "")))
    return items


def evaluate_extractor(items: Sequence[BenchItem], extract: Callable[[bytes, str], str]) -> ExtractionReport:
    """Run `extract(html, url)` on every item and score it against the truth."""
    per_item: list[tuple[str, float, float, float]] = []
    overlap = predicted_total = truth_total = 0
    for item in items:
        predicted = extract(item.html, item.url) or ""
        p, t = _tokens(predicted), _tokens(item.truth)
        overlap += sum((p & t).values())
        predicted_total += sum(p.values())
        truth_total += sum(t.values())
        per_item.append((item.item_id, *token_prf(predicted, item.truth)))
    n = len(per_item)

    def mean(values: list[float]) -> float:
        return sum(values) / n if n else 0.0

    micro = _prf(overlap, predicted_total, truth_total) if n else (0.0, 0.0, 0.0)
    report = ExtractionReport(
        n,
        mean([row[1] for row in per_item]),
        mean([row[2] for row in per_item]),
        mean([row[3] for row in per_item]),
        *micro,
        per_item=per_item,
    )
    log.info("extraction_eval.done", items=n, f1=round(report.f1, 4), micro_f1=round(report.micro_f1, 4))
    return report


def our_extractor(html: bytes, url: str) -> str:
    """The visibility service's extractor: `extract_page(html, url).main_text`."""
    return extract_page(html, url).main_text


def trafilatura_default(html: bytes, url: str) -> str:
    """Plain `trafilatura.extract` with its defaults, the baseline."""
    import trafilatura

    return trafilatura.extract(html, url=url or None) or ""


def main(argv: Sequence[str] | None = None) -> int:
    """Print both extractors' scores on the benchmark directory given as the only argument."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m llmo.visibility.extraction_eval BENCHMARK_DIR", file=sys.stderr)
        return 2
    items = load_benchmark(Path(args[0]))
    for name, fn in (("ours", our_extractor), ("trafilatura default", trafilatura_default)):
        r = evaluate_extractor(items, fn)
        print(f"{name}: items={r.items} precision={r.precision:.4f} recall={r.recall:.4f} f1={r.f1:.4f} "
              f"micro_p={r.micro_precision:.4f} micro_r={r.micro_recall:.4f} micro_f1={r.micro_f1:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
