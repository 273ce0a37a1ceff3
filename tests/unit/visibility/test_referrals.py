from datetime import UTC, datetime

import pytest

from llmo.visibility.referrals import (
    LOWER_BOUND_NOTE,
    CrawlerMatch,
    Visit,
    bucket_key,
    classify_crawler,
    classify_referral,
    parse_combined_log,
    parse_ga4_csv,
    summarize,
)

CHROME = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
GPTBOT = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"
)


@pytest.mark.parametrize(
    ("referrer", "utm", "engine"),
    [
        ("https://chatgpt.com/", "", "chatgpt"),
        ("https://chat.openai.com/c/abc", "", "chatgpt"),
        ("https://www.perplexity.ai/search?q=acme", "", "perplexity"),
        ("https://perplexity.ai/", "", "perplexity"),
        ("https://gemini.google.com/app", "", "gemini"),
        ("https://bard.google.com/", "", "gemini"),
        ("https://www.google.com/", "", None),
        ("https://copilot.microsoft.com/", "", "copilot"),
        ("https://www.bing.com/chat?q=x", "", "copilot"),
        ("https://www.bing.com/search?q=x", "", None),
        ("https://claude.ai/chat/1", "", "claude"),
        ("https://you.com/search", "", "you"),
        ("https://www.phind.com/", "", "phind"),
        ("https://poe.com/ChatGPT", "", "poe"),
        ("https://chat.deepseek.com/", "", "deepseek"),
        ("https://www.meta.ai/", "", "meta_ai"),
        ("https://grok.com/", "", "grok"),
        ("https://x.com/i/grok?conversation=1", "", "grok"),
        ("https://x.com/someone", "", None),
        ("https://chat.mistral.ai/chat", "", "mistral"),
        ("chatgpt.com", "", "chatgpt"),  # GA4 "source" style, no scheme
        ("android-app://com.openai.chatgpt/", "", "chatgpt"),
        ("", "chatgpt.com", "chatgpt"),
        ("-", "openai", "chatgpt"),
        ("", "Perplexity", "perplexity"),
        ("", "claude.ai", "claude"),
        ("https://news.ycombinator.com/", "chatgpt.com", "chatgpt"),
        ("https://notchatgpt.com/", "", None),
        ("", "newsletter", None),
        ("", "", None),
    ],
)
def test_classify_referral(referrer: str, utm: str, engine: str | None) -> None:
    assert classify_referral(referrer, utm) == engine


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (GPTBOT, CrawlerMatch("GPTBot", "openai", "training")),
        (
            "Mozilla/5.0 (compatible; OAI-SearchBot/1.0; +https://openai.com/searchbot)",
            CrawlerMatch("OAI-SearchBot", "openai", "search"),
        ),
        (
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko); compatible; ChatGPT-User/1.0; +https://openai.com/bot",
            CrawlerMatch("ChatGPT-User", "openai", "user_fetch"),
        ),
        (
            "Mozilla/5.0 (compatible; ClaudeBot/1.0; +claudebot@anthropic.com)",
            CrawlerMatch("ClaudeBot", "anthropic", "training"),
        ),
        ("Claude-User/1.0", CrawlerMatch("Claude-User", "anthropic", "user_fetch")),
        ("Claude-SearchBot/1.0", CrawlerMatch("Claude-SearchBot", "anthropic", "search")),
        (
            "Mozilla/5.0 (compatible; PerplexityBot/1.0; +https://perplexity.ai/perplexitybot)",
            CrawlerMatch("PerplexityBot", "perplexity", "search"),
        ),
        (
            "Mozilla/5.0 (compatible; Perplexity-User/1.0)",
            CrawlerMatch("Perplexity-User", "perplexity", "user_fetch"),
        ),
        ("CCBot/2.0 (https://commoncrawl.org/faq/)", CrawlerMatch("CCBot", "common_crawl", "training")),
        (
            "Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile Safari/537.36 (compatible; Bytespider; spider-feedback@bytedance.com)",
            CrawlerMatch("Bytespider", "bytedance", "training"),
        ),
        (
            "meta-externalagent/1.1 (+https://developers.facebook.com/docs/sharing/webmasters/crawler)",
            CrawlerMatch("meta-externalagent", "meta", "training"),
        ),
        (
            "DuckAssistBot/1.2; (+http://duckduckgo.com/duckassistbot.html)",
            CrawlerMatch("DuckAssistBot", "duckduckgo", "search"),
        ),
        ("gptbot/1.0", CrawlerMatch("GPTBot", "openai", "training")),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", None),
        ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", None),
        ("Google-Extended", None),  # a robots.txt token, never a user agent
        ("MyGPTBotClone/1.0", None),
        (CHROME, None),
        ("", None),
    ],
)
def test_classify_crawler(agent: str, expected: CrawlerMatch | None) -> None:
    match = classify_crawler(agent)
    assert match == expected
    if match is not None:
        assert match.verified is False


LOG = [
    '203.0.113.7 - - [10/Mar/2025:13:55:36 +0100] "GET /pricing?utm_source=chatgpt.com&x=1 HTTP/1.1" 200 5123 '
    f'"https://chatgpt.com/" "{CHROME}"',
    '2001:db8::42 - alice [10/Mar/2025:14:00:00 +0000] "GET /blog/post HTTP/2.0" 304 0 '
    f'"https://www.perplexity.ai/search?q=acme" "{CHROME}"',
    "",
    f'198.51.100.2 - - [10/Mar/2025:14:01:00 -0500] "GET /robots.txt HTTP/1.1" 200 100 "-" "{GPTBOT}"',
    r'203.0.113.9 - - [10/Mar/2025:15:00:00 +0000] "GET /search?q=\"acme\" HTTP/1.1" 200 10 "-" "Agent \"quoted\" 1.0"',
    r'203.0.113.9 - - [10/Mar/2025:15:00:01 +0000] "GET /q?a=\x22b\x22 HTTP/1.1" 200 10 "-" "curl/8.4.0"',
    "this is not a log line",
    '203.0.113.10 - - [32/Foo/2025:15:00:00 +0000] "GET / HTTP/1.1" 200 10 "-" "-"',
    r'203.0.113.11 - - [10/Mar/2025:15:00:00 +0000] "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" 400 157 "-" "-"',
    '203.0.113.12 - - [10/Mar/2025:15:00:00 +0000] "GET /common-format HTTP/1.0" 200 -',
]


def test_parse_combined_log() -> None:
    rows = list(parse_combined_log(LOG, site="https://example.com/"))
    assert [(n, err) for n, v, err in rows if err] == [
        (7, "MALFORMED_LINE"),
        (8, "BAD_TIMESTAMP"),
        (9, "BAD_REQUEST_LINE"),
    ]
    visits = {n: v for n, v, err in rows if v is not None}
    assert set(visits) == {1, 2, 4, 5, 6, 10}  # the blank line 3 is skipped

    first = visits[1]
    assert first.time == datetime(2025, 3, 10, 12, 55, 36, tzinfo=UTC)
    assert first.landing_url == "https://example.com/pricing?utm_source=chatgpt.com&x=1"
    assert first.utm_source == "chatgpt.com" and first.referrer == "https://chatgpt.com/"
    assert first.status == 200 and first.client_ip == "203.0.113.7" and first.user_agent == CHROME

    assert visits[2].client_ip == "2001:db8::42" and visits[2].status == 304
    assert visits[4].time == datetime(2025, 3, 10, 19, 1, tzinfo=UTC) and visits[4].referrer == ""
    assert visits[5].landing_url == 'https://example.com/search?q="acme"'
    assert visits[5].user_agent == 'Agent "quoted" 1.0'
    assert visits[6].landing_url == 'https://example.com/q?a="b"'
    assert visits[10].referrer == "" and visits[10].user_agent == ""


GA4_REPORT = """\ufeff# ----------------------------------------
# Traffic acquisition: Session source / medium
# Account: Acme
# Property: acme.com
# ----------------------------------------
#
# Start date: 20250301
# End date: 20250331
Session source / medium,Date,Sessions,Engaged sessions
chatgpt.com / referral,20250301,"1,234",800
google / organic,20250301,5000,3000
perplexity / (not set),20250302,12,10
(direct) / (none),20250302,300,100
copilot.microsoft.com / referral,2025-03-03,7,1
gemini.google.com / referral,20250399,5,1
claude.ai / referral,20250304,many,1
you.com / referral,20250304
Grand total,,"6,546",3910
"""


def test_parse_ga4_report_with_comment_header() -> None:
    rows = list(parse_ga4_csv(GA4_REPORT))
    errors = [(n, err) for n, v, err in rows if err]
    assert errors == [(15, "BAD_DATE"), (16, "BAD_COUNT"), (17, "MALFORMED_ROW")]
    visits = [v for _, v, _ in rows if v is not None]
    assert [(v.utm_source, v.count) for v in visits] == [
        ("chatgpt.com", 1234),
        ("google", 5000),
        ("perplexity", 12),
        ("", 300),
        ("copilot.microsoft.com", 7),
    ]
    assert visits[0].time == datetime(2025, 3, 1, tzinfo=UTC)
    assert visits[4].time == datetime(2025, 3, 3, tzinfo=UTC)
    assert [classify_referral(v.referrer, v.utm_source) for v in visits] == [
        "chatgpt",
        None,
        "perplexity",
        None,
        "copilot",
    ]


GA4_EXPLORATION = """# Exploration: AI landings
# Start date: 20250301
# End date: 20250307

Session source,Landing page + query string,Page referrer,Date + hour (YYYYMMDDHH),Sessions
chatgpt.com,/pricing?utm_source=chatgpt.com,https://chatgpt.com/,2025030113,"2,000"
(direct),/,(not set),2025030114,40
"""


def test_parse_ga4_exploration_with_landing_pages_and_hours() -> None:
    visits = [v for _, v, err in parse_ga4_csv(GA4_EXPLORATION) if v is not None]
    assert len(visits) == 2
    first = visits[0]
    assert first.landing_url == "/pricing?utm_source=chatgpt.com"
    assert first.referrer == "https://chatgpt.com/" and first.count == 2000
    assert first.time == datetime(2025, 3, 1, 13, tzinfo=UTC)
    assert visits[1].referrer == "" and visits[1].utm_source == ""


def test_ga4_without_date_column_uses_the_start_date() -> None:
    text = "# Start date: 20250310\n# End date: 20250316\nSession source,Sessions\nperplexity.ai,1 234\n"
    ((_, visit, err),) = list(parse_ga4_csv(text))
    assert err is None and visit is not None
    assert visit.time == datetime(2025, 3, 10, tzinfo=UTC) and visit.count == 1234


@pytest.mark.parametrize("text", ["foo,bar\n1,2\n", "# only comments\n", "", "Date,Sessions\n20250301,4\n"])
def test_ga4_unrecognised_columns(text: str) -> None:
    assert list(parse_ga4_csv(text)) == [(0, None, "UNRECOGNISED_COLUMNS")]


def visit(
    day: int,
    url: str,
    referrer: str = "",
    agent: str = CHROME,
    *,
    utm: str = "",
    count: int = 1,
    status: int | None = 200,
    hour: int = 12,
) -> Visit:
    return Visit(
        datetime(2025, 3, day, hour, tzinfo=UTC), url, referrer, agent, utm, status, "203.0.113.1", count
    )


def test_summarize_counts_engines_pages_and_crawlers() -> None:
    site = "https://example.com"
    visits = [
        visit(1, f"{site}/pricing?utm_source=chatgpt.com", "https://chatgpt.com/", utm="chatgpt.com"),
        visit(1, f"{site}/pricing", "https://chatgpt.com/"),
        visit(1, f"{site}/blog/a", "https://www.perplexity.ai/search", status=404),
        visit(2, f"{site}/pricing", "https://www.perplexity.ai/"),
        visit(2, f"{site}/", "https://www.google.com/"),
        visit(2, f"{site}/", ""),
        visit(2, f"{site}/docs", f"{site}/pricing"),  # navigation within the site: not a new visit
        visit(2, f"{site}/app.js", "https://chatgpt.com/"),  # asset: not a visit
        visit(2, f"{site}/robots.txt", agent=GPTBOT),
        visit(2, f"{site}/pricing", agent=GPTBOT),
        visit(3, f"{site}/pricing", agent="Mozilla/5.0 (compatible; PerplexityBot/1.0)"),
        visit(
            3, f"{site}/", agent="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
        ),
        visit(3, "/features", utm="gemini.google.com", agent="", count=5),  # a GA4 row
    ]
    summary = summarize(visits)
    assert summary.note == LOWER_BOUND_NOTE and "lower bound" in summary.note
    assert summary.by_engine == {"chatgpt": 2, "perplexity": 2, "gemini": 5}
    assert summary.visits == 11 and summary.ai_visits == 9
    assert summary.ai_share == pytest.approx(9 / 11)
    assert summary.by_bucket == {
        "2025-03-01": {"chatgpt": 2, "perplexity": 1},
        "2025-03-02": {"perplexity": 1},
        "2025-03-03": {"gemini": 5},
    }
    pages = [(p.url, p.total, p.by_engine) for p in summary.top_landing_pages]
    assert pages == [
        ("/features", 5, {"gemini": 5}),
        (f"{site}/pricing", 3, {"chatgpt": 2, "perplexity": 1}),
        (f"{site}/blog/a", 1, {"perplexity": 1}),
    ]
    assert summary.ai_error_landings == {"perplexity": 1}
    assert summary.crawler_by_token == {"GPTBot": 2, "PerplexityBot": 1}
    assert summary.crawler_by_operator == {"openai": 2, "perplexity": 1}
    assert summary.crawler_by_bucket == {"2025-03-02": {"GPTBot": 2}, "2025-03-03": {"PerplexityBot": 1}}
    assert summary.crawlers_verified is False and "unverified" in summary.crawler_note
    assert summary.other_bot_requests == 1


def test_summarize_buckets_and_empty_input() -> None:
    visits = [
        visit(3, "https://example.com/", "https://claude.ai/", hour=23),
        visit(10, "/", utm="claude.ai"),
    ]
    assert summarize(visits, bucket="week").by_bucket == {
        "2025-W10": {"claude": 1},
        "2025-W11": {"claude": 1},
    }
    assert summarize(visits, bucket="hour").by_bucket["2025-03-03T23"] == {"claude": 1}
    assert summarize(visits, bucket="month").by_bucket == {"2025-03": {"claude": 2}}
    empty = summarize([])
    assert empty.visits == 0 and empty.ai_share == 0.0 and empty.top_landing_pages == []
    with pytest.raises(ValueError):
        summarize(visits, bucket="fortnight")
    assert bucket_key(datetime(2025, 1, 1, 0, 30, tzinfo=UTC), "week") == "2025-W01"


def test_log_to_summary_end_to_end() -> None:
    parsed = [v for _, v, _ in parse_combined_log(LOG, site="https://example.com") if v is not None]
    summary = summarize(parsed)
    assert summary.by_engine == {"chatgpt": 1, "perplexity": 1}
    assert summary.crawler_by_token == {"GPTBot": 1}
    assert summary.other_bot_requests == 1  # curl
