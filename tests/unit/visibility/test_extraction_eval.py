"""The article-extraction benchmark: token metric, directory loading and the report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llmo.visibility.extraction_eval import (
    BenchItem,
    evaluate_extractor,
    load_benchmark,
    main,
    our_extractor,
    token_prf,
)

BODY = (
    "City councils across the region approved new cycling lanes on Tuesday. The plan adds forty kilometres "
    "of protected lanes over three years and links the main railway stations to the university campus.\n\n"
    "Officials said the work would start in the spring, once the consultation closes. Local shop owners "
    "worried about losing parking spaces, but the council promised loading bays on every affected street."
)

PAGE = f"""<html><head><title>New cycling lanes approved</title></head><body>
<nav><a href="/">Home</a> <a href="/news">News</a> <a href="/sport">Sport</a> <a href="/weather">Weather</a></nav>
<article><h1>New cycling lanes approved</h1>
{"".join(f"<p>{para}</p>" for para in BODY.split(chr(10) * 2))}
</article>
<aside><h2>Most read</h2><ul><li><a href="/a">Storm warning for the weekend</a></li>
<li><a href="/b">Football club sold</a></li></ul></aside>
<footer>Copyright The Daily Example. Terms. Privacy. Cookies.</footer></body></html>"""


def _write_benchmark(root: Path, items: dict[str, tuple[str, str]]) -> Path:
    (root / "html").mkdir(parents=True)
    truth = {}
    for item_id, (html, body) in items.items():
        with gzip.open(root / "html" / f"{item_id}.html.gz", "wb") as fh:
            fh.write(html.encode("utf-8"))
        truth[item_id] = {"articleBody": body, "url": f"https://news.example/{item_id}"}
    (root / "ground-truth.json").write_text(json.dumps(truth), encoding="utf-8")
    return root


def test_token_prf_exact_and_partial() -> None:
    assert token_prf("The cat sat.", "the CAT sat") == (1.0, 1.0, 1.0)
    p, r, f = token_prf("the cat sat on the mat", "the cat sat")
    assert (p, r) == (pytest.approx(3 / 6), 1.0)
    assert f == pytest.approx(2 * 0.5 / 1.5)


def test_token_prf_counts_repeated_tokens_once_each() -> None:
    # truth has "the" twice, prediction three times: only two of them overlap
    p, r, _ = token_prf("the the the", "the cat the")
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3)


def test_token_prf_edge_cases() -> None:
    assert token_prf("", "") == (1.0, 1.0, 1.0)
    assert token_prf("...", "  ") == (1.0, 1.0, 1.0)  # no word tokens on either side
    assert token_prf("", "some truth") == (0.0, 0.0, 0.0)
    assert token_prf("some prediction", "") == (0.0, 1.0, 0.0)
    assert token_prf("alpha", "beta") == (0.0, 0.0, 0.0)


def test_load_benchmark_reads_items_sorted(tmp_path: Path) -> None:
    root = _write_benchmark(tmp_path / "bench", {"b2": ("<p>two</p>", "two"), "a1": ("<p>one</p>", "one")})
    items = load_benchmark(root)
    assert [i.item_id for i in items] == ["a1", "b2"]
    assert items[0] == BenchItem("a1", b"<p>one</p>", "one", "https://news.example/a1")


def test_load_benchmark_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no ground-truth\.json"):
        load_benchmark(tmp_path / "empty")
    root = _write_benchmark(tmp_path / "bench", {"x": ("<p>x</p>", "x")})
    (root / "html" / "x.html.gz").unlink()
    with pytest.raises(ValueError, match="item x has no"):
        load_benchmark(root)
    (root / "ground-truth.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_benchmark(root)


def test_evaluate_extractor_reports_macro_and_micro() -> None:
    items = [
        BenchItem("short", b"<p>short</p>", "one two", "https://news.example/short"),
        BenchItem("long", b"<p>long</p>", " ".join(f"w{i}" for i in range(98)), "https://news.example/long"),
    ]
    answers = {b"<p>short</p>": "one two", b"<p>long</p>": ""}
    report = evaluate_extractor(items, lambda html, url: answers[html])
    assert report.items == 2
    assert [row[0] for row in report.per_item] == ["short", "long"]
    assert report.per_item[0][1:] == (1.0, 1.0, 1.0)
    assert report.per_item[1][1:] == (0.0, 0.0, 0.0)
    assert report.f1 == pytest.approx(0.5)
    # micro: 2 of 100 truth tokens found, every predicted token right
    assert report.micro_precision == 1.0 and report.micro_recall == pytest.approx(0.02)
    assert report.recall == pytest.approx(0.5)


def test_evaluate_extractor_empty_set() -> None:
    report = evaluate_extractor([], lambda html, url: "")
    assert report.items == 0 and report.f1 == 0.0 and report.per_item == []


def test_our_extractor_finds_the_article(tmp_path: Path) -> None:
    root = _write_benchmark(tmp_path / "bench", {"cycling": (PAGE, BODY)})
    report = evaluate_extractor(load_benchmark(root), our_extractor)
    assert report.f1 >= 0.9
    text = our_extractor(PAGE.encode(), "https://news.example/cycling")
    assert "Storm warning" not in text and "Privacy" not in text


def test_main_prints_both_extractors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_benchmark(tmp_path / "bench", {"cycling": (PAGE, BODY)})
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "ours: items=1" in out and "trafilatura default: items=1" in out
    assert main([]) == 2
