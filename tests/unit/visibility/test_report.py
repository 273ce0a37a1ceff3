"""The HTML report and its exports: every section with its inline SVG plot, user text escaped, empty
sections explained, exports that parse back to the rows, and the page as a real browser renders it."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lxml.html
import matplotlib.pyplot as plt
import pytest

from llmo.visibility.report import ReportData, render_html, write_exports

PLOTS = ("plot-sov-trend", "plot-shares", "plot-pillars", "plot-gaps", "plot-referrals")
HEADINGS = ("Share of voice over time", "Latest run", "Page scores", "Coverage gaps", "AI referral traffic")
HOSTILE = "<script>alert(1)</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_data(brand: str = "Acme") -> ReportData:
    """A report with every section filled: two engines over four days, a run, pages, gaps, referrals."""
    start = datetime(2026, 1, 5, tzinfo=UTC)
    days = [(start + timedelta(days=d)).isoformat() for d in range(4)]
    trend = []
    for engine, base in (("engine-a", 0.55), ("engine-b", 0.2)):
        for d, day in enumerate(days):
            for name, level in ((brand, base + 0.05 * d), ("Globex", 0.4 - 0.03 * d)):
                trend.append((day, engine, name, level, max(level - 0.12, 0.0), min(level + 0.12, 1.0)))
    shares = [("engine-a", brand, True, 0.7, 0.55, 0.82, 0.6, 0.45, 0.72, 0.3),
              ("engine-a", "Globex", False, 0.4, 0.27, 0.55, 0.34, 0.22, 0.47, 0.1),
              ("engine-b", brand, True, 0.2, 0.1, 0.35, 0.15, 0.07, 0.27, 0.0),
              ("engine-b", "Globex", False, 0.8, 0.66, 0.9, 0.6, 0.48, 0.71, 0.2)]
    pages: list[tuple[str, float, float | None, float, float, float, str]] = [
        (f"https://acme.example/articles/{i}", 30.0 + 2 * i, 40.0 + i, 50.0, 60.0 + i, 70.0, "NO_FAQ")
        for i in range(30)]
    pages.append(("https://acme.example/about", 12.0, None, 10.0, 35.0, 20.0, "THIN_CONTENT"))
    gaps = [("recipe for sourdough bread", "NO_CONTENT", 0.9, "engine-a, engine-b", "", "https://acme.example/",
             0.12, "Write a page that answers it."),
            ("best anvil supplier", "COMPETITOR_ONLY", 0.75, "engine-b", "Globex", "https://acme.example/articles/1",
             0.71, "Say who you are on the page."),
            ("anvil maintenance tips", "NOT_CITED", 0.4, "engine-b", "", "https://acme.example/articles/2", 0.66,
             "Add dated statistics.")]
    referrals = [(day, engine, visits) for d, day in enumerate(days)
                 for engine, visits in (("chatgpt", 3 + d), ("perplexity", 1 + d % 2))]
    return ReportData(
        project="projects/acme", brand=brand, generated=datetime(2026, 1, 9, 8, 30, tzinfo=UTC), trend=trend,
        shares=shares, run="projects/acme/shareOfVoiceRuns/r2", pages=pages, crawl="projects/acme/crawls/c1",
        gaps=gaps, referrals=referrals, referral_totals={"chatgpt": 18, "perplexity": 6}, ai_share_of_visits=0.125,
        crawlers=[("GPTBot", "OpenAI", "training", 14), ("PerplexityBot", "Perplexity", "search", 3)],
        lower_bound_note="AI referral counts are a lower bound.")


def figures(document: str) -> dict[str, lxml.html.HtmlElement]:
    tree = lxml.html.fromstring(document)
    return {f.get("id"): f for f in tree.iter("figure")}


def headings(document: str) -> list[str]:
    return [h.text_content().strip() for h in lxml.html.fromstring(document).iter("h2")]


def test_every_section_has_its_plot_inline_as_svg() -> None:
    document = render_html(full_data())
    found = figures(document)
    assert set(found) == set(PLOTS)
    for plot in PLOTS:
        assert f'<figure id="{plot}" class="plot"><svg' in document
        assert [child.tag for child in found[plot]][:1] == ["svg"], plot
    # The plots sit in their sections, in the order of the page.
    positions = [document.index(f'id="{plot}"') for plot in PLOTS]
    assert positions == sorted(positions)
    assert headings(document) == list(HEADINGS)
    assert document.index("<h2>Page scores</h2>") < document.index('id="plot-pillars"') < document.index(
        "<h2>Coverage gaps</h2>")
    # Self-contained: no scripts, nothing fetched from elsewhere, and no figure left open in pyplot.
    assert "<script" not in document.lower() and "src=" not in document
    assert not plt.get_fignums()


def test_the_tables_hold_the_rows_lowest_scoring_pages_first() -> None:
    tree = lxml.html.fromstring(render_html(full_data()))
    tables = list(tree.iter("table"))
    # shares, pages, gaps, referral totals, crawlers
    assert len(tables) == 5
    page_rows = [[td.text_content() for td in tr.iter("td")] for tr in tables[1].iter("tr") if tr.find("td") is not None]
    assert page_rows[0][0] == "https://acme.example/about" and page_rows[0][2] == ""  # relevance n/a
    overall = [float(row[1]) for row in page_rows]
    assert overall == sorted(overall) and len(page_rows) == 31
    crawler_rows = [[td.text_content() for td in tr.iter("td")] for tr in tables[4].iter("tr")][1:]
    assert crawler_rows[0] == ["GPTBot", "OpenAI", "training", "14"]
    assert "AI referrals are 12.5% of recorded visits." in tree.text_content()


def test_user_text_is_escaped_everywhere() -> None:
    data = full_data(brand=HOSTILE)
    data.project = f"projects/{HOSTILE}"
    data.run = data.crawl = HOSTILE
    data.gaps[0] = (HOSTILE, *data.gaps[0][1:])
    data.pages[0] = (f"https://acme.example/?q={HOSTILE}", *data.pages[0][1:])
    data.crawlers.append((HOSTILE, HOSTILE, "training", 1))
    data.referral_totals[HOSTILE] = 1
    data.lower_bound_note = HOSTILE
    document = render_html(data)
    assert HOSTILE not in document and "<script" not in document.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    tree = lxml.html.fromstring(document)
    assert tree.findtext(".//title") == f"Visibility report: {HOSTILE}"
    assert tree.findtext(".//h1") == f"Answer-engine visibility of {HOSTILE}"
    assert not list(tree.iter("script"))
    assert set(figures(document)) == set(PLOTS)


def test_dollar_signs_in_user_text_do_not_break_the_report() -> None:
    data = full_data(brand="Ca$$h")
    data.gaps[0] = ("save $$ on anvils", *data.gaps[0][1:])
    assert set(figures(render_html(data))) == set(PLOTS)


def test_empty_sections_say_so_and_draw_no_figure() -> None:
    empty = ReportData(project="projects/acme", brand="Acme", generated=datetime(2026, 1, 9, tzinfo=UTC))
    document = render_html(empty)
    for note in ("No succeeded share-of-voice runs yet.", "No succeeded crawl yet.",
                 "No gaps (or no succeeded run yet).", "No visits recorded."):
        assert note in document
    assert not figures(document) and "<svg" not in document
    assert headings(document) == ["Share of voice over time", "Page scores", "Coverage gaps", "AI referral traffic"]
    assert "Project projects/acme, generated 2026-01-09 00:00 UTC." in document

    # Crawlers seen but no referral visits: the section shows the crawlers, without an empty plot.
    bots = ReportData(project="projects/acme", brand="Acme", generated=datetime(2026, 1, 9, tzinfo=UTC),
                      crawlers=[("GPTBot", "OpenAI", "training", 2)])
    shown = render_html(bots)
    assert "GPTBot" in shown and "No visits recorded." not in shown and not figures(shown)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_exports_parse_back_to_the_rows(tmp_path: Path) -> None:
    data = full_data()
    written = write_exports(data, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["gaps.csv", "pages.csv", "referrals.csv", "report.json", "shares.csv", "trend.csv"]
    assert all(p.is_file() for p in written)

    trend = read_csv(tmp_path / "out" / "trend.csv")
    assert len(trend) == len(data.trend)
    assert list(trend[0]) == ["bucket", "engine", "brand", "mention_share", "low", "high"]
    assert [(r["bucket"], r["engine"], r["brand"], float(r["mention_share"])) for r in trend] == [
        (b, e, n, v) for b, e, n, v, *_ in data.trend]
    shares = read_csv(tmp_path / "out" / "shares.csv")
    assert [(r["engine"], r["brand"], r["is_project_brand"], float(r["mention_rate_low"])) for r in shares] == [
        (e, b, str(p), low) for e, b, p, _, low, *_ in data.shares]
    pages = read_csv(tmp_path / "out" / "pages.csv")
    about = next(r for r in pages if r["url"].endswith("/about"))
    assert about["relevance"] == "" and float(about["overall"]) == 12.0 and about["top_finding"] == "THIN_CONTENT"
    gaps = read_csv(tmp_path / "out" / "gaps.csv")
    assert [(g["query"], g["kind"], float(g["opportunity"])) for g in gaps] == [(g[0], g[1], g[2]) for g in data.gaps]
    referrals = read_csv(tmp_path / "out" / "referrals.csv")
    assert sum(int(r["visits"]) for r in referrals) == sum(v for *_, v in data.referrals)

    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["brand"] == "Acme" and report["project"] == "projects/acme"
    assert report["run"] == data.run and report["crawl"] == data.crawl
    assert report["generated"] == "2026-01-09T08:30:00+00:00"
    assert len(report["trend"]) == len(data.trend) and len(report["pages"]) == len(data.pages)
    assert report["pages"][-1] == {"url": "https://acme.example/about", "overall": 12.0, "relevance": None,
                                   "authority": 10.0, "clarity": 35.0, "quality": 20.0, "top_finding": "THIN_CONTENT"}
    assert report["gaps"][1]["competitors_present"] == "Globex"
    assert report["referral_totals"] == {"chatgpt": 18, "perplexity": 6} and report["ai_share_of_visits"] == 0.125
    assert report["crawlers"][0] == {"token": "GPTBot", "operator": "OpenAI", "purpose": "training", "fetches": 14}


def test_exports_of_an_empty_report_are_headers_only(tmp_path: Path) -> None:
    empty = ReportData(project="projects/acme", brand="Acme", generated=datetime(2026, 1, 9, tzinfo=UTC))
    write_exports(empty, tmp_path)
    with (tmp_path / "pages.csv").open(encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["url", "overall", "relevance", "authority", "clarity", "quality",
                                             "top_finding"]]
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["trend"] == [] and report["gaps"] == [] and report["crawlers"] == []


# --- in a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the browser checks need one")
    return found


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html(full_data()), encoding="utf-8")
    return path


def browse(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def test_a_browser_keeps_every_plot_and_heading(chromium: str, report_file: Path, tmp_path: Path) -> None:
    done = browse(chromium, tmp_path / "profile", "--dump-dom", report_file.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = lxml.html.fromstring(done.stdout)
    found = {f.get("id"): f for f in dom.iter("figure")}
    assert set(found) == set(PLOTS), done.stdout[:500]
    for plot in PLOTS:
        svg = found[plot].find("svg")
        assert svg is not None and len(svg) > 0, plot  # a drawn figure, not an empty element
    assert [h.text_content().strip() for h in dom.iter("h2")] == list(HEADINGS)
    assert dom.findtext(".//h1") == "Answer-engine visibility of Acme"


def test_a_browser_renders_the_page_to_a_png(chromium: str, report_file: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = browse(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000",
                  "--hide-scrollbars", report_file.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    image = shot.read_bytes()
    assert image.startswith(PNG_MAGIC) and len(image) > 20_000
    # IHDR: the page was drawn at the size asked for
    assert (int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")) == (1200, 3000)
