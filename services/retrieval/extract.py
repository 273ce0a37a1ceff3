"""Documents to text: plain text, Markdown, HTML (main content, by trafilatura) and PDF (pypdf).

The result is the document's *extracted text*, the string chunk offsets point into, with the
headings found in it (Markdown `#` headings; HTML headings survive as Markdown ones).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

PLAIN, MARKDOWN, HTML, PDF = "text/plain", "text/markdown", "text/html", "application/pdf"
SUPPORTED = (PLAIN, MARKDOWN, HTML, PDF)

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")  # trafilatura escapes these in Markdown output


class ExtractError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Heading:
    offset: int  # where the heading line starts in the extracted text
    level: int
    title: str


@dataclass(frozen=True)
class Extracted:
    text: str
    mime_type: str
    headings: list[Heading] = field(default_factory=list)


def sniff(content: bytes) -> str:
    """The MIME type of raw bytes sent without one."""
    head = content[:1024].lstrip().lower()
    if content.startswith(b"%PDF-"):
        return PDF
    if head.startswith((b"<!doctype html", b"<html")) or b"<body" in head:
        return HTML
    return PLAIN


def normalise_mime(mime_type: str) -> str:
    return mime_type.split(";", 1)[0].strip().lower()


def extract(mime_type: str, *, text: str | None = None, content: bytes | None = None) -> Extracted:
    """Blocking (HTML and PDF parsing): run it off the event loop. NUL characters become spaces
    (PostgreSQL text cannot hold them; the length, hence every offset, is unchanged)."""
    found = _extract(mime_type, text=text, content=content)
    return Extracted(found.text.replace("\x00", " "), found.mime_type, found.headings)


def _extract(mime_type: str, *, text: str | None = None, content: bytes | None = None) -> Extracted:
    mime = normalise_mime(mime_type) if mime_type else (PLAIN if content is None else sniff(content))
    if mime not in SUPPORTED:
        raise ExtractError("UNSUPPORTED_MIME_TYPE", f"mime_type must be one of {', '.join(SUPPORTED)}")
    if mime == PDF:
        if content is None:
            raise ExtractError("DECODE_FAILED", "a PDF must be sent as `content` bytes, not `text`")
        return Extracted(_pdf_text(content), PDF)
    if text is None:
        try:
            text = (content or b"").decode("utf-8")
        except UnicodeDecodeError as error:
            raise ExtractError("DECODE_FAILED", f"content is not UTF-8 (byte {error.start})") from None
    if mime == HTML:
        import trafilatura

        extracted = trafilatura.extract(text, output_format="markdown", include_comments=False, favor_recall=True)
        markdown = _MD_ESCAPE.sub(r"\1", extracted or "")
        return Extracted(markdown, HTML, markdown_headings(markdown))
    if mime == MARKDOWN:
        return Extracted(text, MARKDOWN, markdown_headings(text))
    return Extracted(text, PLAIN)


def markdown_headings(text: str) -> list[Heading]:
    """ATX headings outside fenced code blocks."""
    found: list[Heading] = []
    offset, fenced = 0, False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line.rstrip("\r\n"))):
            found.append(Heading(offset, len(match.group(1)), match.group(2).strip()))
        offset += len(line)
    return found


def _pdf_text(content: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted:
            raise ExtractError("DECODE_FAILED", "the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except ExtractError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as error:
        raise ExtractError("DECODE_FAILED", f"the PDF could not be parsed ({type(error).__name__})") from None
    return "\n\n".join(p.strip() for p in pages if p.strip())
