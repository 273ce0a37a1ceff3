"""`llmo visibility ...` as a user runs it (its own process) against the real visibility service,
the local test site and fake answer engines, all on 127.0.0.1: projects from a YAML file, a crawl with
its table of pages to fix, page scores, share of voice with intervals, coverage gaps, AI referrals from
an access log and a GA4 export, the HTML report and its exports, the offline extraction benchmark, and
clear one-line errors (never a traceback) on bad input."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.visibility_harness import EngineBehaviour, FakeEngines, settings, started
from tests.unit.visibility.site import make_site, serve_site

pytestmark = pytest.mark.timeout(300)

INTERVAL = re.compile(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]")
ARTICLE = (
    "The harbour authority opened a new ferry terminal on Monday after four years of building work. "
    "The terminal handles two million passengers a year and links the old town with the islands.\n\n"
    "Engineers built the quay on piles driven forty metres into the seabed, because the harbour floor "
    "is soft clay. Travellers can now buy tickets at machines in the hall or on the harbour website."
)


class Stack:
    """The visibility service, the test site and the fake engines on one event loop in a thread (each
    CLI command runs in its own process)."""

    def __init__(self, data: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engines = FakeEngines({
            "engine-a": EngineBehaviour(rates={"Acme": 0.7, "Globex": 0.4}),
            "engine-b": EngineBehaviour(rates={"Acme": 0.2, "Globex": 0.8, "Initech": 0.3}),
        })
        self.run(self.engines.start())
        self.site = serve_site(make_site(pages=12))
        self.base: str = self.run(self.site.__aenter__())
        config = settings(f"sqlite:///{data / 'visibility.db'}", data, engine_url=self.engines.url,
                          politeness=False, publish_events=False)
        self.running, self.channel, _ = self.run(started(config))
        self.address = f"127.0.0.1:{self.running.port}"

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def close(self) -> None:
        self.run(self.channel.close())
        self.run(self.running.stop())
        self.run(self.site.__aexit__(None, None, None))
        self.run(self.engines.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("visibility-cli"))
    try:
        yield running
    finally:
        running.close()


def llmo(stack: Stack | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `llmo visibility ARGS` as tenantA against the stack (or, with None, against nothing)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLMO_API_KEY", "LLMO_VISIBILITY_ENDPOINT")}
    address = stack.address if stack is not None else "127.0.0.1:1"
    return subprocess.run([sys.executable, "-m", "llmo.cli.main", "visibility", "--endpoint", address,
                           "--api-key", "ka", *args], capture_output=True, text=True, timeout=240,
                          env={**env, "COLUMNS": "250", "LLMO_LOG_LEVEL": "warning"})


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def failed(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with exit status `code` and a one-line `Error:` naming every needle."""
    assert done.returncode == code, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "Error:" in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr
    return done.stderr


def project_file(tmp_path: Path, **overrides: Any) -> Path:
    body: dict[str, Any] = {
        "brand": {"name": "Acme", "aliases": ["Acme Corp"], "description": "Acme makes anvils.",
                  "facts": {"founded": "1999"}},
        "domains": ["127.0.0.1"],
        "competitors": [{"name": "Globex", "domains": ["globex.example"]},
                        {"name": "Initech", "domains": ["initech.example"]}],
        "queries": [{"text": "best anvil supplier", "weight": 3.0},
                    {"text": "how do answer engines choose which sources to cite", "weight": 1.0},
                    {"text": "recipe for sourdough bread with rye flour", "weight": 1.0}],
        "default_engines": ["engine-a", "engine-b"],
        **overrides,
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def log_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%d/%b/%Y:%H:%M:%S +0000")


def access_log(path: Path) -> Path:
    when = datetime.now(UTC) - timedelta(hours=3)
    browser = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"
    gptbot = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"
    lines = [
        f'203.0.113.5 - - [{log_time(when)}] "GET /articles/1 HTTP/1.1" 200 5120 "https://chatgpt.com/" "{browser}"',
        f'203.0.113.6 - - [{log_time(when + timedelta(minutes=1))}] "GET /articles/2 HTTP/1.1" 200 4096 '
        f'"https://www.perplexity.ai/search?q=anvils" "{browser}"',
        f'203.0.113.7 - - [{log_time(when + timedelta(minutes=2))}] "GET /about HTTP/1.1" 200 900 '
        f'"https://www.google.com/" "{browser}"',
        f'203.0.113.8 - - [{log_time(when + timedelta(minutes=3))}] "GET /pricing?utm_source=chatgpt.com HTTP/1.1" '
        f'200 800 "-" "{browser}"',
        f'20.15.240.64 - - [{log_time(when + timedelta(minutes=4))}] "GET /articles/3 HTTP/1.1" 200 4000 "-" '
        f'"{gptbot}"',
        "this line is not in combined log format",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def ga4_export(path: Path) -> Path:
    today = datetime.now(UTC).strftime("%Y%m%d")
    path.write_text(
        "# ----------------------------------------\n"
        "# Traffic acquisition: Session source\n"
        f"# Start date: {today}\n"
        f"# End date: {today}\n"
        "# ----------------------------------------\n"
        "Date,Session source,Landing page + query string,Sessions\n"
        f"{today},chatgpt.com,/articles/4,7\n"
        f"{today},google,/articles/5,12\n"
        f"{today},perplexity,/about,2\n", encoding="utf-8")
    return path


def test_a_brand_is_crawled_scored_measured_and_reported_from_the_command_line(stack: Stack, tmp_path: Path) -> None:
    base = stack.base
    created = ok(llmo(stack, "project", "create", "acme", "--file", str(project_file(tmp_path))))
    assert "created projects/acme: Acme on 127.0.0.1, 3 tracked queries" in created
    listed = ok(llmo(stack, "project", "list"))
    row = next(line for line in listed.splitlines() if "projects/acme" in line)
    assert "Acme" in row and "127.0.0.1" in row and " 3 " in row
    shown = json.loads(ok(llmo(stack, "project", "show", "acme")))
    assert shown["defaultEngines"] == ["engine-a", "engine-b"] and shown["queries"][0]["weight"] == 3.0

    # The crawl: the summary line, the mean score and the table of the lowest-scoring pages.
    crawled = ok(llmo(stack, "crawl", "acme", "--seed", f"{base}/", "--max-pages", "15", "--crawl-id", "c1"))
    summary = re.search(r"projects/acme/crawls/c1: SUCCEEDED; (\d+) fetched \(\d+ unchanged\), \d+ failed, "
                        r"\d+ disallowed by robots.txt, \d+ traps skipped", crawled)
    assert summary, crawled
    assert 1 <= int(summary.group(1)) <= 15
    assert re.search(r"mean score \d+\.\d; llms.txt found; AI crawlers blocked: .*GPTBot", crawled), crawled
    assert "Lowest-scoring pages (of " in crawled and f"{base}/articles/" in crawled
    scores = [int(m) for m in re.findall(rf"^\S*\s*(\d+)\s.*{re.escape(base)}/", crawled, re.MULTILINE)]
    assert scores and scores == sorted(scores), crawled
    again = json.loads(ok(llmo(stack, "crawl", "acme", "--seed", f"{base}/", "--max-pages", "5", "--json")))
    assert again["state"] == "JOB_STATE_SUCCEEDED" and again["name"].startswith("projects/acme/crawls/")
    assert int(again["progress"]["pagesFetched"]) >= 1

    # One page, fetched or from a file: the pillar table and what to fix.
    page = ok(llmo(stack, "score", f"{base}/articles/2", "--project", "acme"))
    assert re.search(r"Article 2: overall \d+/100", page), page
    for pillar in ("relevance", "authority", "clarity", "quality"):
        assert re.search(rf"{pillar}\s+\S*\s*\d+", page), page
    assert "What to fix" in page
    thin = tmp_path / "thin.html"
    thin.write_text("<html><head><title>Anvils</title></head><body><h1>Anvils</h1><h3>Skipped level</h3>"
                    "<p>Short.</p></body></html>", encoding="utf-8")
    scored = ok(llmo(stack, "score", "--html", str(thin)))
    assert re.search(r"Anvils: overall \d+/100", scored) and "n/a (no queries)" in scored
    findings = scored.split("What to fix", 1)[1]
    assert re.search(r"\d+\.\d\s+\S*\s*(low|medium|high|critical|info)\s+\S*\s*[A-Z_]{4,}", findings), scored

    # Share of voice: a table per engine, every rate with its 95% interval.
    voiced = ok(llmo(stack, "sov", "acme", "--samples", "2", "--run-id", "r1"))
    assert "engine-a (6 answers)" in voiced and "engine-b (6 answers)" in voiced, voiced
    acme_rows = [line for line in voiced.splitlines() if "Acme" in line and INTERVAL.search(line)]
    assert len(acme_rows) == 2 and all(len(INTERVAL.findall(line)) == 4 for line in acme_rows), voiced
    for low, estimate, high in ((float(m[1]), float(m[0]), float(m[2])) for m in
                                re.findall(r"(\d\.\d\d) \[(\d\.\d\d), (\d\.\d\d)\]", voiced)):
        assert low <= estimate <= high
    assert re.search(r"overall mention share of the brand: \S+ \[\S+, \S+\]; 0 answers failed", voiced), voiced
    run = json.loads(ok(llmo(stack, "sov", "acme", "--samples", "2", "--engine", "engine-a", "--json")))
    assert run["state"] == "JOB_STATE_SUCCEEDED" and [e["engine"] for e in run["engineShares"]] == ["engine-a"]
    assert int(run["progress"]["answersCompleted"]) == 6  # int64: a JSON string

    # Coverage gaps of the latest run: the bread recipe is answered by no page of the site.
    gapped = ok(llmo(stack, "gaps", "acme"))
    assert "Coverage gaps" in gapped
    bread = next(line for line in gapped.splitlines() if "sourdough" in line)
    assert re.search(r"\d\.\d\d", bread) and "no_content" in bread, gapped
    gaps = json.loads(ok(llmo(stack, "gaps", "acme", "--run", "r1", "--json")))
    assert {g["query"] for g in gaps} >= {"recipe for sourdough bread with rye flour"}

    # AI referrals from an access log: the malformed line is counted, GPTBot is a crawler, not a visit.
    logged = ok(llmo(stack, "referrals", "acme", "--access-log", str(access_log(tmp_path / "access.log")),
                     "--site", "https://127.0.0.1"))
    assert "ingested 5 visits (0 already recorded, 0 rejected by the service, 1 unreadable lines)" in logged, logged
    assert re.search(r"chatgpt\s+\S*\s*2\b", logged) and re.search(r"perplexity\s+\S*\s*1\b", logged), logged
    assert "AI referrals are 75.0% of recorded visits." in logged and "lower bound" in logged
    assert re.search(r"GPTBot\s+\S*\s*OpenAI.*\s1\s", logged, re.IGNORECASE), logged
    replayed = ok(llmo(stack, "referrals", "acme", "--access-log", str(tmp_path / "access.log"), "--site",
                       "https://127.0.0.1", "--json"))
    # Ingesting the same log again counts nothing twice.
    assert {k: int(v) for k, v in json.loads(replayed)["totalsByEngine"].items()} == {"chatgpt": 2, "perplexity": 1}

    # The report: one HTML page with the five plots, and the exports.
    out = tmp_path / "report"
    reported = ok(llmo(stack, "report", "acme", "--out", str(out)))
    assert f"wrote {out / 'report.html'} and 6 exports" in reported.replace("\n", ""), reported
    page_html = (out / "report.html").read_text(encoding="utf-8")
    for plot in ("plot-sov-trend", "plot-shares", "plot-pillars", "plot-gaps", "plot-referrals"):
        assert re.search(rf'<figure id="{plot}" class="plot"><svg', page_html), plot
    assert "Answer-engine visibility of Acme" in page_html
    with (out / "pages.csv").open(encoding="utf-8") as handle:
        pages = list(csv.DictReader(handle))
    assert pages and all(row["url"].startswith(base) and 0 <= float(row["overall"]) <= 100 for row in pages)
    with (out / "shares.csv").open(encoding="utf-8") as handle:
        shares = list(csv.DictReader(handle))
    assert {row["engine"] for row in shares} == {"engine-a"}  # the latest run asked engine-a only
    exported = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert exported["brand"] == "Acme" and exported["project"] == "projects/acme"
    assert exported["referral_totals"] == {"chatgpt": 2, "perplexity": 1}
    assert any(row["query"].startswith("recipe for sourdough") for row in exported["gaps"])
    assert [c["token"] for c in exported["crawlers"]] == ["GPTBot"]
    for name in ("trend", "gaps", "referrals"):
        with (out / f"{name}.csv").open(encoding="utf-8") as handle:
            assert len(list(csv.reader(handle))) >= 2, name


def test_a_ga4_export_is_ingested(stack: Stack, tmp_path: Path) -> None:
    ok(llmo(stack, "project", "create", "ga4", "--file", str(project_file(tmp_path))))
    done = ok(llmo(stack, "referrals", "ga4", "--ga4", str(ga4_export(tmp_path / "ga4.csv"))))
    assert "ingested 3 visits (0 already recorded, 0 rejected by the service, 0 unreadable lines)" in done, done
    assert re.search(r"chatgpt\s+\S*\s*7\b", done) and re.search(r"perplexity\s+\S*\s*2\b", done), done


def test_a_ga4_export_is_read_and_its_rows_reach_the_service(stack: Stack, tmp_path: Path) -> None:
    """What works today: the comment lines are skipped, the header is found and every row is sent."""
    ok(llmo(stack, "project", "create", "ga4-read", "--file", str(project_file(tmp_path))))
    done = ok(llmo(stack, "referrals", "ga4-read", "--ga4", str(ga4_export(tmp_path / "ga4.csv"))))
    counts = re.search(r"ingested (\d+) visits \((\d+) already recorded, (\d+) rejected by the service, "
                       r"(\d+) unreadable lines\)", done)
    assert counts, done
    accepted, _, rejected, unreadable = (int(g) for g in counts.groups())
    assert accepted + rejected == 3 and unreadable == 0
    unknown = tmp_path / "other.csv"
    unknown.write_text("# a comment\nDay,Clicks\n20260101,4\n", encoding="utf-8")
    failed(llmo(stack, "referrals", "ga4-read", "--ga4", str(unknown)), 2, "no GA4 columns recognised")


def test_bad_input_gives_a_clear_error_and_no_traceback(stack: Stack, tmp_path: Path) -> None:
    failed(llmo(stack, "project", "create", "x", "--file", str(tmp_path / "missing.yaml")), 2, "missing.yaml")
    for text in ("- just\n- a list\n", "brand: {nme: Acme}\n", "domains: 5\n", "brand: [unclosed\n", ""):
        path = tmp_path / "bad.yaml"
        path.write_text(text, encoding="utf-8")
        failed(llmo(stack, "project", "create", "x", "--file", str(path)), 2, "bad.yaml", "not a Project")
    # The service's validation comes back as its reason.
    failed(llmo(stack, "project", "create", "x", "--file", str(project_file(tmp_path, domains=["https://a.example/"]))),
           1, "INVALID_ARGUMENT", "INVALID_DOMAIN")
    failed(llmo(stack, "project", "show", "nope"), 1, "NOT_FOUND", "PROJECT_NOT_FOUND")
    failed(llmo(stack, "crawl", "nope", "--seed", f"{stack.base}/"), 1, "NOT_FOUND", "PROJECT_NOT_FOUND")
    failed(llmo(stack, "sov", "nope"), 1, "PROJECT_NOT_FOUND")
    failed(llmo(stack, "report", "nope", "--out", str(tmp_path / "r")), 1, "PROJECT_NOT_FOUND")
    assert not (tmp_path / "r" / "report.html").exists()

    ok(llmo(stack, "project", "create", "edge", "--file", str(project_file(tmp_path))))
    failed(llmo(stack, "crawl", "edge", "--seed", "https://elsewhere.example/"), 1, "INVALID_ARGUMENT",
           "INVALID_SEED_URL")
    failed(llmo(stack, "gaps", "edge"), 1, "FAILED_PRECONDITION", "NO_COMPLETED_RUN")
    log = access_log(tmp_path / "access.log")
    failed(llmo(stack, "referrals", "edge", "--access-log", str(log)), 2, "--site")
    failed(llmo(stack, "referrals", "edge", "--access-log", str(tmp_path / "nope.log"), "--site", "https://127.0.0.1"),
           2, "nope.log")
    failed(llmo(stack, "score"), 2, "URL")
    failed(llmo(stack, "score", "--html", str(tmp_path / "nope.html")), 2, "nope.html")
    failed(llmo(stack, "sov", "edge", "--samples", "11"), 2, "--samples")
    # No service at the address: one line naming it.
    failed(llmo(None, "project", "list"), 1, "127.0.0.1:1", "UNAVAILABLE")


def test_a_project_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("brand: {name: Caf\u00e9}\ndomains: [cafe.example]\n".encode("latin-1"))
    failed(llmo(None, "project", "create", "x", "--file", str(path)), 2, "latin1.yaml")


def write_benchmark(root: Path, items: dict[str, tuple[str, str]]) -> Path:
    (root / "html").mkdir(parents=True)
    truth = {}
    for item_id, (page, body) in items.items():
        with gzip.open(root / "html" / f"{item_id}.html.gz", "wb") as handle:
            handle.write(page.encode("utf-8"))
        truth[item_id] = {"articleBody": body, "url": f"https://news.example/{item_id}"}
    (root / "ground-truth.json").write_text(json.dumps(truth), encoding="utf-8")
    return root


def news_page(title: str, body: str) -> str:
    paragraphs = "".join(f"<p>{part}</p>" for part in body.split("\n\n"))
    return (f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> <a href='/news'>News</a> "
            f"<a href='/sport'>Sport</a></nav><article><h1>{title}</h1>{paragraphs}</article><aside><h2>Most "
            "read</h2><ul><li><a href='/a'>Storm warning for the weekend</a></li><li><a href='/b'>Football club "
            "sold</a></li></ul></aside><footer>Copyright The Daily Example. Terms. Privacy.</footer></body></html>")


def test_extract_eval_scores_our_extraction_on_a_benchmark_folder(tmp_path: Path) -> None:
    second = ARTICLE.replace("ferry terminal", "railway station").replace("harbour", "city")
    data = write_benchmark(tmp_path / "bench", {
        "a1": (news_page("New ferry terminal opens", ARTICLE), ARTICLE),
        "a2": (news_page("New railway station opens", second), second),
    })
    figures = json.loads(ok(llmo(None, "extract-eval", "--data", str(data), "--json")))
    assert figures["items"] == 2
    assert set(figures) >= {"items", "precision", "recall", "f1"}
    for key in ("precision", "recall", "f1", "micro_f1"):
        assert figures[key] >= 0.9, figures
    table = ok(llmo(None, "extract-eval", "--data", str(data)))
    assert "Main-content extraction on" in table and re.search(r"\b2\s+\S*\s*0\.9\d\d|\b2\s+\S*\s*1\.000", table)

    # A wrong ground truth scores low: the metric can fail.
    wrong = write_benchmark(tmp_path / "wrong", {"w1": (news_page("New ferry terminal opens", ARTICLE),
                                                        "Completely unrelated words about gardening tomatoes.")})
    assert json.loads(ok(llmo(None, "extract-eval", "--data", str(wrong), "--json")))["f1"] < 0.2

    empty = tmp_path / "empty"
    empty.mkdir()
    failed(llmo(None, "extract-eval", "--data", str(empty)), 2, "ground-truth.json")
    (empty / "ground-truth.json").write_text(json.dumps({"x1": {"articleBody": "a", "url": ""}}), encoding="utf-8")
    failed(llmo(None, "extract-eval", "--data", str(empty)), 2, "x1")
    (empty / "ground-truth.json").write_text("{not json", encoding="utf-8")
    failed(llmo(None, "extract-eval", "--data", str(empty)), 2, "not valid JSON")
