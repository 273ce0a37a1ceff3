import unicodedata

import pytest

from llmo.visibility.mentions import (
    BrandSpec,
    MentionDetector,
    analyze_answer,
    domain_matches,
    extract_citations,
)

ACME = BrandSpec("Acme", aliases=("Acme Inc",), domains=("acme.com",), is_project_brand=True)
BRANDS = [
    ACME,
    BrandSpec("Acme Cloud", domains=("acmecloud.io",)),
    BrandSpec("Acme Analytics"),
    BrandSpec("Globex Corp", aliases=("Globex",), domains=("globex.com",)),
    BrandSpec("Apple", case_sensitive=True),
    BrandSpec("Zürich Versicherung"),
    BrandSpec("Salesforce"),
    BrandSpec("McDonald's"),
]
DETECTOR = MentionDetector(BRANDS)


def found(text: str) -> list[tuple[str, str, bool]]:
    return [(m.brand, m.matched, m.fuzzy) for m in DETECTOR.mentions(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Acme's pricing", [("Acme", "Acme", False)]),
        ("Acme’s pricing", [("Acme", "Acme", False)]),
        ("ACME leads", [("Acme", "ACME", False)]),
        ("try acme, then", [("Acme", "acme", False)]),
        ("a tool (Acme) for", [("Acme", "Acme", False)]),
        ("an Acme-powered app", [("Acme", "Acme", False)]),
        ('"Acme".', [("Acme", "Acme", False)]),
        ("Acmeville and ACMEcorp and Acme2", []),
        ("three Acmes", []),  # plurals are not folded
        ("Globex Corp", [("Globex Corp", "Globex Corp", False)]),
        ("Globex  Corp.", [("Globex Corp", "Globex  Corp", False)]),
        ("Globex-Corp", [("Globex Corp", "Globex-Corp", False)]),
        ("Globex\nCorp", [("Globex Corp", "Globex\nCorp", False)]),
        ("Globex alone", [("Globex Corp", "Globex", False)]),
        ("Acme Cloud beats Acme", [("Acme Cloud", "Acme Cloud", False), ("Acme", "Acme", False)]),
        ("Acme Inc. ships", [("Acme", "Acme Inc", False)]),
        ("apple pie and an apple", []),
        ("Apple and APPLE", [("Apple", "Apple", False)]),
        ("ZÜRICH VERSICHERUNG", [("Zürich Versicherung", "ZÜRICH VERSICHERUNG", False)]),
        ("die Zürich-Versicherung", [("Zürich Versicherung", "Zürich-Versicherung", False)]),
        (
            "McDonald’s and McDonald's",
            [("McDonald's", "McDonald’s", False), ("McDonald's", "McDonald's", False)],
        ),
        ("", []),
    ],
)
def test_exact_matching_rules(text: str, expected: list[tuple[str, str, bool]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Acmme Analytics", [("Acme Analytics", "Acmme Analytics", True)]),
        ("Acme Analyitcs", [("Acme Analytics", "Acme Analyitcs", True)]),  # transposition
        ("AcmeAnalytics", [("Acme Analytics", "AcmeAnalytics", True)]),  # missing space
        ("Salesfroce", [("Salesforce", "Salesfroce", True)]),
        ("Sales force", [("Salesforce", "Sales force", True)]),
        ("Acmee and Acne", []),  # four letters: never fuzzy
        (
            "Salesfrce CRM and Salesforec",
            [("Salesforce", "Salesfrce", True), ("Salesforce", "Salesforec", True)],
        ),
        ("Xalesforce", []),  # a different first letter is another word, not a typo
        ("the salesfroce team", []),  # lower-case near miss of a capitalised name
        ("Saleforse", []),  # two edits
    ],
)
def test_fuzzy_only_for_long_names_and_one_edit(text: str, expected: list[tuple[str, str, bool]]) -> None:
    assert found(text) == expected


def test_fuzzy_can_be_turned_off_and_case_sensitive_brands_are_never_fuzzy() -> None:
    detector = MentionDetector([BrandSpec("Notion", fuzzy=False), BrandSpec("Oracle", case_sensitive=True)])
    assert detector.mentions("The Nation and Orcale") == []
    assert [m.matched for m in detector.mentions("Notion and Oracle")] == ["Notion", "Oracle"]


def test_exact_wins_over_fuzzy_of_another_brand() -> None:
    detector = MentionDetector([BrandSpec("Acme Analytics"), BrandSpec("Acme Analytica")])
    assert [(m.brand, m.fuzzy) for m in detector.mentions("Acme Analytica")] == [("Acme Analytica", False)]


def test_offsets_refer_to_the_text_as_given() -> None:
    text = "Ask (Acme)!"
    (mention,) = DETECTOR.mentions(text)
    assert text[mention.start : mention.end] == "Acme" == mention.matched
    decomposed = unicodedata.normalize("NFD", "Über Zürich Versicherung heute")
    (mention,) = DETECTOR.mentions(decomposed)
    assert mention.brand == "Zürich Versicherung"
    assert decomposed[mention.start : mention.end] == mention.matched
    assert unicodedata.normalize("NFC", mention.matched) == "Zürich Versicherung"


def test_brand_inside_url_is_a_citation_not_a_mention() -> None:
    text = "Sources: https://acme.com/acme-review and www.globex.com/globex, see [Acme](https://acme.com)."
    assert found(text) == [("Acme", "Acme", False)]
    analysis = analyze_answer(text, BRANDS)
    assert analysis.mentioned["Acme"] and not analysis.mentioned["Globex Corp"]
    assert analysis.cited["Acme"] and analysis.cited["Globex Corp"]
    assert analysis.citations == ["acme.com", "globex.com"]


def test_bare_domain_without_scheme_is_text() -> None:
    assert found("visit acme.com today") == [("Acme", "acme", False)]
    assert extract_citations("visit acme.com today") == []


def test_first_positions_rank_brands_by_first_mention() -> None:
    text = "Globex is fine. Acme is better than Globex Corp. Acme Cloud too. Acme again."
    assert DETECTOR.first_positions(text) == {"Globex Corp": 1, "Acme": 2, "Acme Cloud": 3}
    assert DETECTOR.first_positions("nothing here") == {}


def test_extract_citations_from_text_and_annotations() -> None:
    text = (
        "See [docs](https://Docs.Acme.com/start?x=1), <https://www.globex.com/page>, "
        "and https://en.wikipedia.org/wiki/Acme_(company). Also http://www.acme.com:8080/a."
    )
    annotations = ["https://www.perplexity.ai/x", "https://docs.acme.com/other", "news.example.org/story"]
    assert extract_citations(text, annotations) == [
        "docs.acme.com",
        "globex.com",
        "en.wikipedia.org",
        "acme.com",
        "perplexity.ai",
        "news.example.org",
    ]
    assert extract_citations("") == []


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("acme.com", True),
        ("www.acme.com", True),
        ("docs.acme.com", True),
        ("https://blog.acme.com/post", True),
        ("notacme.com", False),
        ("acme.com.evil.net", False),
        ("", False),
    ],
)
def test_domain_matches_equal_or_subdomain(domain: str, expected: bool) -> None:
    assert domain_matches(domain, ["acme.com"]) is expected


def test_analyze_answer_reports_every_brand() -> None:
    analysis = analyze_answer("Globex Corp, then Acme.", BRANDS, annotations=["https://globex.com/a"])
    assert set(analysis.mentioned) == {b.name for b in BRANDS}
    assert analysis.positions == {"Globex Corp": 1, "Acme": 2}
    assert analysis.cited["Globex Corp"] and not analysis.cited["Acme"]
    empty = analyze_answer("", BRANDS)
    assert not any(empty.mentioned.values()) and empty.positions == {} and empty.citations == []
