"""`llmo visibility report`: one self-contained HTML page with plots, and CSV/JSON exports.

The page holds share of voice over time per engine with its 95% bands, the latest run's shares per
engine and brand with intervals, the four pillar scores of the lowest-scoring pages, the coverage
gaps by opportunity, and AI referral visits per engine over time; under the page scores, the crawl's
third-party mention sources (which name the brand). Plots are matplotlib figures
inlined as SVG (no scripts, no network: the file opens anywhere and archives as is).
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to SVG only
import matplotlib.pyplot as plt

PILLARS = ("relevance", "authority", "clarity", "quality")


@dataclass
class ReportData:
    """What the report shows, as plain rows (read from the service by the CLI)."""

    project: str
    brand: str
    generated: datetime
    # (bucket ISO time, engine, brand, estimate, low, high)
    trend: list[tuple[str, str, str, float, float, float]] = field(default_factory=list)
    # (engine, brand, is_project_brand, mention_rate, low, high, mention_share, low, high, citation_rate)
    shares: list[tuple[str, str, bool, float, float, float, float, float, float, float]] = field(default_factory=list)
    run: str = ""
    # (url, overall, relevance or None, authority, clarity, quality, top finding)
    pages: list[tuple[str, float, float | None, float, float, float, str]] = field(default_factory=list)
    crawl: str = ""
    # The crawl's third-party mention sources: (url, http status or error reason, names the brand, first
    # brand mention as written, competitors named); None: the project lists no sources.
    third_party_mentions: int | None = None
    mention_sources: list[tuple[str, str, bool, str, str]] = field(default_factory=list)
    # (query, kind, opportunity, engines missing, competitors present, best page, similarity, recommendation)
    gaps: list[tuple[str, str, float, str, str, str, float, str]] = field(default_factory=list)
    # (bucket ISO time, engine, visits)
    referrals: list[tuple[str, str, int]] = field(default_factory=list)
    referral_totals: dict[str, int] = field(default_factory=dict)
    ai_share_of_visits: float = 0.0
    # (token, operator, purpose, fetches)
    crawlers: list[tuple[str, str, str, int]] = field(default_factory=list)
    lower_bound_note: str = ""


def _svg(figure: Any, element_id: str) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    start = text.find("<svg")
    return f'<figure id="{element_id}" class="plot">{text[start:]}</figure>'


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def sov_plot(data: ReportData) -> str:
    engines = sorted({row[1] for row in data.trend})
    if not engines:
        return ""
    figure, axes = plt.subplots(len(engines), 1, figsize=(8, 2.6 * len(engines)), squeeze=False, sharex=True)
    for axis, engine in zip(axes[:, 0], engines, strict=True):
        for brand in sorted({row[2] for row in data.trend if row[1] == engine}):
            rows = sorted((r for r in data.trend if r[1] == engine and r[2] == brand), key=lambda r: r[0])
            times = [_parse_time(r[0]) for r in rows]
            line = axis.plot(times, [r[3] for r in rows], marker="o", label=brand,
                             linewidth=2.5 if brand == data.brand else 1.2)[0]
            axis.fill_between(times, [r[4] for r in rows], [r[5] for r in rows], alpha=0.18, color=line.get_color())
        axis.set_title(f"Share of voice: {engine}", fontsize=10)
        axis.set_ylim(0, 1)
        axis.set_ylabel("mention share")
        axis.legend(fontsize=8, loc="upper left")
        axis.grid(alpha=0.3)
    figure.autofmt_xdate()
    return _svg(figure, "plot-sov-trend")


def shares_plot(data: ReportData) -> str:
    if not data.shares:
        return ""
    labels = [f"{brand} @ {engine}" for engine, brand, *_ in data.shares]
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(labels) + 1))
    rates = [row[3] for row in data.shares]
    errors = [[row[3] - row[4] for row in data.shares], [row[5] - row[3] for row in data.shares]]
    colours = ["#d62728" if row[2] else "#7f7f7f" for row in data.shares]
    axis.barh(range(len(labels)), rates, xerr=errors, color=colours, capsize=3)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("mention rate (95% interval)")
    axis.set_title("Latest run: how often each brand is named", fontsize=10)
    return _svg(figure, "plot-shares")


def pillars_plot(data: ReportData, limit: int = 25) -> str:
    if not data.pages:
        return ""
    rows = sorted(data.pages, key=lambda p: p[1])[:limit]
    figure, axis = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    matrix = [[(r[2] if r[2] is not None else float("nan")), r[3], r[4], r[5]] for r in rows]
    image = axis.imshow(matrix, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100)
    axis.set_xticks(range(4), [p.title() for p in PILLARS])
    axis.set_yticks(range(len(rows)), [_short(r[0]) for r in rows], fontsize=7)
    for y, row in enumerate(matrix):
        for x, value in enumerate(row):
            if value == value:  # not NaN
                axis.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axis, label="score")
    axis.set_title("Pillar scores of the lowest-scoring pages", fontsize=10)
    return _svg(figure, "plot-pillars")


def gaps_plot(data: ReportData, limit: int = 15) -> str:
    if not data.gaps:
        return ""
    rows = data.gaps[:limit]
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
    colours = {"NO_CONTENT": "#1f77b4", "COMPETITOR_ONLY": "#d62728", "NOT_CITED": "#ff7f0e"}
    axis.barh(range(len(rows)), [r[2] for r in rows], color=[colours.get(r[1], "#7f7f7f") for r in rows])
    axis.set_yticks(range(len(rows)), [_short(r[0], 60) for r in rows], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("opportunity")
    axis.set_title("Coverage gaps (blue: no content, red: competitors only, orange: not cited)", fontsize=10)
    return _svg(figure, "plot-gaps")


def referrals_plot(data: ReportData) -> str:
    if not data.referrals:
        return ""
    buckets = sorted({r[0] for r in data.referrals})
    engines = sorted({r[1] for r in data.referrals})
    counts = {(r[0], r[1]): r[2] for r in data.referrals}
    figure, axis = plt.subplots(figsize=(8, 3))
    times: Any = [_parse_time(b) for b in buckets]
    bottom = [0] * len(buckets)
    for engine in engines:
        values = [counts.get((b, engine), 0) for b in buckets]
        axis.bar(times, values, bottom=bottom, label=engine, width=0.8)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    axis.set_ylabel("visits")
    axis.set_title("AI referral visits per engine (a lower bound)", fontsize=10)
    axis.legend(fontsize=8)
    figure.autofmt_xdate()
    return _svg(figure, "plot-referrals")


def _short(text: str, limit: int = 50) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3f}"
    return "" if value is None else str(value)


CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;width:100%}td,th{border:1px solid #ddd;padding:.25rem .4rem;
text-align:left;vertical-align:top}th{background:#f4f4f4}.note{color:#666;font-size:.85rem}
figure.plot svg{max-width:100%;height:auto}"""


def render_html(data: ReportData) -> str:
    """The report as one HTML document (plots inline as SVG)."""
    # Labels are user text (brands, queries): a pair of `$` must stay two dollar signs, not mathtext.
    with matplotlib.rc_context({"text.parse_math": False}):
        return _render_html(data)


def _render_html(data: ReportData) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Visibility report: "
             f"{html.escape(data.brand)}</title><style>{CSS}</style></head><body>",
             f"<h1>Answer-engine visibility of {html.escape(data.brand)}</h1>",
             f"<p class=note>Project {html.escape(data.project)}, generated "
             f"{data.generated.astimezone(UTC):%Y-%m-%d %H:%M} UTC. Rates come with 95% intervals: answers vary "
             "from one run to the next.</p>"]
    parts.append("<h2>Share of voice over time</h2>")
    parts.append(sov_plot(data) or "<p class=note>No succeeded share-of-voice runs yet.</p>")
    if data.shares:
        parts.append(f"<h2>Latest run</h2><p class=note>{html.escape(data.run)}</p>")
        parts.append(shares_plot(data))
        parts.append(_table(["engine", "brand", "mention rate", "low", "high", "mention share", "low", "high",
                             "citation rate"], [[r[0], r[1], *r[3:]] for r in data.shares]))
    parts.append("<h2>Page scores</h2>")
    if data.pages:
        parts.append(f"<p class=note>{html.escape(data.crawl)}: {len(data.pages)} pages.</p>")
        parts.append(pillars_plot(data))
        parts.append(_table(["url", "overall", *PILLARS, "top finding"],
                            [list(r) for r in sorted(data.pages, key=lambda p: p[1])[:50]]))
    else:
        parts.append("<p class=note>No succeeded crawl yet.</p>")
    if data.mention_sources:
        parts.append(f"<h3>Third-party mentions</h3><p>{data.third_party_mentions or 0} of "
                     f"{len(data.mention_sources)} mention sources name the brand.</p>")
        parts.append(_table(["source", "status", "names the brand", "as written", "competitors named"],
                            [[u, st, "yes" if named else "no", matched, others]
                             for u, st, named, matched, others in data.mention_sources]))
    parts.append("<h2>Coverage gaps</h2>")
    if data.gaps:
        parts.append(gaps_plot(data))
        parts.append(_table(["query", "kind", "opportunity", "engines missing the brand", "competitors present",
                             "best page", "similarity", "recommendation"], [list(r) for r in data.gaps]))
    else:
        parts.append("<p class=note>No gaps (or no succeeded run yet).</p>")
    parts.append("<h2>AI referral traffic</h2>")
    if data.referrals or data.crawlers:
        parts.append(referrals_plot(data))
        parts.append(f"<p>AI referrals are {data.ai_share_of_visits:.1%} of recorded visits. "
                     f"<span class=note>{html.escape(data.lower_bound_note)}</span></p>")
        parts.append(_table(["engine", "visits"], [[k, v] for k, v in sorted(data.referral_totals.items())]))
        if data.crawlers:
            parts.append(_table(["AI crawler (unverified)", "operator", "purpose", "fetches"],
                                [list(c) for c in data.crawlers]))
    else:
        parts.append("<p class=note>No visits recorded.</p>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_exports(data: ReportData, directory: Path) -> list[Path]:
    """CSV files per section and one JSON file with everything; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    sections: dict[str, tuple[list[str], Any]] = {
        "trend": (["bucket", "engine", "brand", "mention_share", "low", "high"], data.trend),
        "shares": (["engine", "brand", "is_project_brand", "mention_rate", "mention_rate_low", "mention_rate_high",
                    "mention_share", "mention_share_low", "mention_share_high", "citation_rate"], data.shares),
        "pages": (["url", "overall", *PILLARS, "top_finding"], data.pages),
        "gaps": (["query", "kind", "opportunity", "engines_missing", "competitors_present", "best_page",
                  "similarity", "recommendation"], data.gaps),
        "referrals": (["bucket", "engine", "visits"], data.referrals),
    }
    written = []
    for name, (headers, rows) in sections.items():
        path = directory / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(headers)
            writer.writerows(rows)
        written.append(path)
    path = directory / "report.json"
    payload: dict[str, Any] = {name: [dict(zip(headers, row, strict=True)) for row in rows] for name, (headers, rows) in
               sections.items()}
    payload.update(project=data.project, brand=data.brand, generated=data.generated.isoformat(), run=data.run,
                   crawl=data.crawl, referral_totals=data.referral_totals, ai_share_of_visits=data.ai_share_of_visits,
                   crawlers=[dict(zip(["token", "operator", "purpose", "fetches"], c, strict=True))
                             for c in data.crawlers], lower_bound_note=data.lower_bound_note,
                   third_party_mentions=data.third_party_mentions,
                   mention_sources=[dict(zip(["url", "status", "mentions_brand", "matched", "competitors"], m,
                                             strict=True)) for m in data.mention_sources])
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    written.append(path)
    return written
