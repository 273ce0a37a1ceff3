"""Chunking strategies and document extraction on small in-test documents."""

from __future__ import annotations

import pytest

from llmo.retrieval.chunking import FIXED, HEADING, RECURSIVE, SENTENCE, Chunker, tokenizer
from llmo.retrieval.extract import HTML as HTML_MIME
from llmo.retrieval.extract import PDF, PLAIN, ExtractError, extract, markdown_headings, sniff
from tests.unit.retrieval.corpus import HTML, MARKDOWN, pdf_bytes

LONG = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(60))


def _tokens(text: str) -> int:
    return len(tokenizer().encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("strategy", [FIXED, SENTENCE, RECURSIVE, HEADING])
def test_every_chunk_is_an_exact_slice_within_the_size(strategy: int) -> None:
    doc = extract("text/markdown", text=MARKDOWN + "\n\n" + LONG)
    chunks = Chunker(32, 8, strategy).split(doc)
    assert len(chunks) > 3
    for chunk in chunks:
        assert doc.text[chunk.start:chunk.end] == chunk.text
        assert 0 < chunk.token_count <= 32 and chunk.token_count == _tokens(chunk.text)
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    assert "Calibration" in " ".join(c.text for c in chunks) and "Sentence number 59" in chunks[-1].text


def test_fixed_windows_share_the_overlap() -> None:
    doc = extract("", text=LONG)
    first, second = Chunker(20, 5, FIXED).split(doc)[:2]
    assert first.token_count == 20
    shared = tokenizer().encode(doc.text[second.start:first.end], add_special_tokens=False).ids
    assert len(shared) == 5


def test_sentence_chunks_end_on_sentence_boundaries() -> None:
    chunks = Chunker(24, 0, SENTENCE).split(extract("", text=LONG))
    assert all(c.text.endswith(".") for c in chunks)


def test_heading_chunks_never_span_two_sections_and_carry_their_path() -> None:
    doc = extract("text/markdown", text=MARKDOWN)
    chunks = Chunker(200, 0, HEADING).split(doc)
    assert [c.heading_path for c in chunks] == [("Widget manual",), ("Widget manual", "Installation"),
                                                ("Widget manual", "Calibration")]
    assert chunks[2].text.startswith("## Calibration")
    # RECURSIVE packs across sections: one chunk when everything fits
    assert len(Chunker(200, 0, RECURSIVE).split(doc)) == 1


def test_chunker_refuses_bad_sizes() -> None:
    for size, overlap in ((0, 0), (10, 10), (4096, 0), (10, -1)):
        with pytest.raises(ValueError):
            Chunker(size, overlap, FIXED)


def test_html_keeps_main_content_and_headings() -> None:
    doc = extract(HTML_MIME, text=HTML)
    assert doc.mime_type == HTML_MIME and "lithium batteries" in doc.text
    assert "cookie" not in doc.text and "Copyright" not in doc.text
    assert [(h.level, h.title) for h in doc.headings] == [(1, "Weather station guide"), (2, "Batteries")]


def test_markdown_headings_skip_code_fences() -> None:
    text = "# Title\n\n```\n# not a heading\n```\n\n## Real\n"
    assert [h.title for h in markdown_headings(text)] == ["Title", "Real"]


def test_pdf_text_sniffing_and_failures() -> None:
    data = pdf_bytes("Glaciers carve deep valleys")
    assert sniff(data) == PDF and sniff(HTML.encode()) == HTML_MIME and sniff(b"hello") == PLAIN
    assert extract("", content=data).text == "Glaciers carve deep valleys"
    for call, reason in ((lambda: extract("application/pdf", content=b"%PDF-1.4 garbage"), "DECODE_FAILED"),
                         (lambda: extract("application/pdf", text="not bytes"), "DECODE_FAILED"),
                         (lambda: extract("text/plain", content=b"\xff\xfe\xfa"), "DECODE_FAILED"),
                         (lambda: extract("image/png", content=b"x"), "UNSUPPORTED_MIME_TYPE")):
        with pytest.raises(ExtractError) as raised:
            call()
        assert raised.value.reason == reason


def test_nul_characters_become_spaces_without_moving_offsets() -> None:
    doc = extract("", text="a\x00b")
    assert doc.text == "a b"
