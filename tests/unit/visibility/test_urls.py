"""URL normalisation, domain scoping and crawler-trap heuristics."""

from __future__ import annotations

import pytest

from llmo.visibility.urls import host_of, in_domains, normalize_url, trap_reason


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTP://Example.COM:80/a/b", "http://example.com/a/b"),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://example.com/../../x", "http://example.com/x"),
        ("http://example.com/page#section", "http://example.com/page"),
        ("http://example.com/p?b=2&a=1", "http://example.com/p?a=1&b=2"),
        ("http://example.com/p?utm_source=x&id=3&utm_medium=y&gclid=z&fbclid=q", "http://example.com/p?id=3"),
        (
            "http://example.com/p?PHPSESSID=abc&sid=1&sessionid=2&jsessionid=3&q=ok",
            "http://example.com/p?q=ok",
        ),
        ("http://example.com/shop;jsessionid=ABC123?x=1", "http://example.com/shop?x=1"),
        ("http://user:secret@example.com/", "http://example.com/"),
        ("http://example.com./x", "http://example.com/x"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/%7euser/%2f", "http://example.com/~user/%2F"),
        ("http://bücher.example/", "http://xn--bcher-kva.example/"),
        ("http://[2001:DB8::1]:80/", "http://[2001:db8::1]/"),
        (" \thttp://example.com/\n", "http://example.com/"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_normalize_resolves_against_a_base() -> None:
    base = "https://example.com/blog/post/"
    assert normalize_url("../about?utm_campaign=x", base) == "https://example.com/blog/about"
    assert normalize_url("/contact", base) == "https://example.com/contact"
    assert normalize_url("//cdn.example.com/a.js", base) == "https://cdn.example.com/a.js"
    assert normalize_url("#top", base) == "https://example.com/blog/post/"


@pytest.mark.parametrize(
    "url",
    [
        "mailto:hello@example.com",
        "javascript:alert(1)",
        "data:text/html,<b>x</b>",
        "tel:+15551234",
        "ftp://example.com/file",
        "http://",
        "http://exa mple.com/",
        "http://exa<mple.com/",
        "http://example.com:99999/",
        "http://example.com:port/",
        "",
        "not a url",
    ],
)
def test_normalize_rejects_unusable_urls(url: str) -> None:
    assert normalize_url(url) is None


def test_normalized_forms_of_one_page_agree() -> None:
    forms = [
        "http://EXAMPLE.com/a/b?y=2&x=1#frag",
        "http://example.com:80/a/./b?x=1&y=2&utm_source=news",
        "http://example.com/a/c/../b?x=1&y=2",
    ]
    assert len({normalize_url(f) for f in forms}) == 1


def test_host_of_and_in_domains() -> None:
    assert host_of("https://Blog.Example.com:8443/x") == "blog.example.com"
    assert host_of("not a url") == ""
    assert in_domains("https://blog.example.com/x", ["example.com"])
    assert in_domains("https://example.com/", ["EXAMPLE.COM"])
    assert not in_domains("https://notexample.com/", ["example.com"])
    assert not in_domains("https://example.com.evil.net/", ["example.com"])
    assert not in_domains("mailto:x@example.com", ["example.com"])


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://example.com/events/2031/05/", "CALENDAR"),
        ("https://example.com/archive/1850/01/", "CALENDAR"),
        ("https://example.com/calendar?month=14", "CALENDAR"),
        ("https://example.com/events?date=2024-05-01", "CALENDAR"),
        ("https://example.com/calendar/2024/06", "CALENDAR"),
        ("https://example.com/a/b/a/b/a/b", "REPEATED_SEGMENTS"),
        ("https://example.com/x/x/x", "REPEATED_SEGMENTS"),
        ("https://example.com/" + "a" * 2100, "TOO_LONG"),
        ("https://example.com/" + "/".join(f"d{i}" for i in range(20)), "TOO_LONG"),
        ("https://example.com/s?" + "&".join(f"p{i}=1" for i in range(9)), "TOO_MANY_PARAMS"),
        ("https://example.com/shop;jsessionid=A1B2C3", "SESSION_ID"),
        ("https://example.com/(S(lit3py55t21z5v55vlm25s55))/default.aspx", "SESSION_ID"),
        ("https://example.com/cart?sessionid=deadbeef", "SESSION_ID"),
    ],
)
def test_trap_reason_flags_traps(url: str, reason: str) -> None:
    assert trap_reason(url) == reason


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/",
        "https://example.com/blog/2024/05/post-title",
        "https://example.com/news/2019-11-03-launch",
        "https://example.com/articles/12",
        "https://example.com/products?id=5&color=red",
        "https://example.com/search?q=answer+engines&page=2",
        "https://example.com/docs/v2/api/reference/v2-changes",
        "https://example.com/calendar",
        "https://example.com/assets/a1b2c3d4e5f6a7b8c9d0/app.js",
        "https://example.com/s?" + "&".join(f"p{i}=1" for i in range(8)),
    ],
)
def test_trap_reason_lets_ordinary_urls_pass(url: str) -> None:
    assert trap_reason(url) is None
