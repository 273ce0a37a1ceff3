"""llms.txt parsing per the llmstxt.org proposal."""

from __future__ import annotations

import pytest

from llmo.visibility.llms_txt import LlmsLink, parse_llms_txt
from tests.unit.visibility.site import LLMS_TXT

FULL = """# FastHTML

> FastHTML is a python library which brings together Starlette, Uvicorn and HTMX.
> It is designed for hypermedia apps.

Important notes:

- Although parts of its API are inspired by FastAPI, it is *not* compatible with FastAPI syntax

## Docs

- [FastHTML quick start](https://fastht.ml/docs/tutorials/quickstart_for_web_devs.html.md): A brief overview
- [HTMX reference](https://github.com/bigskysoftware/htmx/blob/master/www/content/reference.md)
* [Starlette](<https://www.starlette.io/> "Starlette home"): the ASGI toolkit

## Examples

- [Todo list application](https://github.com/x/adv_app.py): Detailed walk-thru

## Optional

- [Starlette full documentation](https://gist.github.com/x/starlette-sphinx.md): A subset of the docs
"""


def test_full_document() -> None:
    doc = parse_llms_txt(FULL)
    assert doc.errors == []
    assert doc.title == "FastHTML"
    assert doc.summary.startswith("FastHTML is a python library")
    assert doc.summary.endswith("hypermedia apps.")
    assert "not* compatible" in doc.details
    assert list(doc.sections) == ["Docs", "Examples", "Optional"]
    assert doc.sections["Docs"][0] == LlmsLink(
        "FastHTML quick start",
        "https://fastht.ml/docs/tutorials/quickstart_for_web_devs.html.md",
        "A brief overview",
    )
    assert doc.sections["Docs"][1].notes == ""
    assert doc.sections["Docs"][2] == LlmsLink("Starlette", "https://www.starlette.io/", "the ASGI toolkit")
    assert len(doc.sections["Optional"]) == 1


def test_the_test_sites_file_parses() -> None:
    doc = parse_llms_txt(LLMS_TXT)
    assert doc.errors == []
    assert doc.title == "Acme Analytics"
    assert [link.url for link in doc.sections["Docs"]] == ["/articles/1", "/about"]


def test_title_only_is_valid() -> None:
    doc = parse_llms_txt("# Just a title\n")
    assert (doc.title, doc.summary, doc.sections, doc.errors) == ("Just a title", "", {}, [])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "EMPTY"),
        ("   \n\n", "EMPTY"),
        ("## Docs\n- [a](https://a.example)\n", "MISSING_TITLE"),
        ("<!DOCTYPE html><html><body>app shell</body></html>", "NOT_MARKDOWN"),
        ("# One\n# Two\n", "MULTIPLE_TITLES"),
        ("intro\n# Title\n", "TEXT_BEFORE_TITLE"),
        ("# T\n## Docs\n- [broken link(https://a.example)\n", "INVALID_LINK:3"),
        ("# T\n## Docs\n- just text\n", "INVALID_LINK:3"),
        ("# T\n## Empty\n\n## Docs\n- [a](https://a.example)\n", "EMPTY_SECTION:Empty"),
    ],
)
def test_problems_are_reported(text: str, error: str) -> None:
    assert error in parse_llms_txt(text).errors


def test_headings_inside_code_fences_are_text() -> None:
    doc = parse_llms_txt("# T\n\n```\n## not a section\n# not a title\n```\n")
    assert doc.sections == {}
    assert doc.errors == []
    assert "## not a section" in doc.details


@pytest.mark.parametrize(
    "text", ["\x00\x01\x02", "# \n", "#" * 10_000, "- [a](b)\n" * 10_000, "\ufeff# BOM title\n", "]]]([[[)"]
)
def test_junk_never_raises(text: str) -> None:
    doc = parse_llms_txt(text)
    assert isinstance(doc.errors, list)


def test_bom_is_ignored() -> None:
    assert parse_llms_txt("\ufeff# Title\n").title == "Title"
