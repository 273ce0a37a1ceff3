"""/llms.txt per the llmstxt.org proposal: an H1 title, an optional `>` summary, free text, then H2
sections of Markdown link lists (`- [name](url): notes`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_H1 = re.compile(r"^#(?!#)\s*(.*?)\s*#*\s*$")
_H2 = re.compile(r"^##(?!#)\s*(.*?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^\s*[-*+]\s+(.*)$")
_LINK = re.compile(
    r"^\[(?P<title>[^\]]*)\]\(\s*<?(?P<url>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)\s*(?::\s*(?P<notes>.*))?$"
)
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class LlmsLink:
    """One link of an llms.txt section."""

    title: str
    url: str
    notes: str = ""


@dataclass
class LlmsTxt:
    """A parsed llms.txt. `errors` names problems: MISSING_TITLE, MULTIPLE_TITLES, NOT_MARKDOWN,
    TEXT_BEFORE_TITLE, EMPTY, INVALID_LINK:<line>, EMPTY_SECTION:<name>."""

    title: str = ""
    summary: str = ""
    sections: dict[str, list[LlmsLink]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    details: str = ""


def parse_llms_txt(text: str) -> LlmsTxt:
    """Parse llms.txt Markdown; never raises, problems go to `errors`."""
    result = LlmsTxt()
    body = text.lstrip("\ufeff")
    if not body.strip():
        result.errors = ["EMPTY", "MISSING_TITLE"]
        return result
    if body.lstrip()[:1] == "<":
        # Sites that answer every path with their HTML shell serve that for /llms.txt too.
        result.errors = ["NOT_MARKDOWN", "MISSING_TITLE"]
        return result
    section: str | None = None
    summary: list[str] = []
    details: list[str] = []
    in_fence = False
    seen_title = False
    lines = body.splitlines()
    for number, line in enumerate(lines, start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
        if in_fence or _FENCE.match(line):
            if section is None and seen_title:
                details.append(line)
            continue
        h1 = _H1.match(line)
        if h1:
            if seen_title:
                result.errors.append("MULTIPLE_TITLES")
            else:
                result.title = h1.group(1)
                seen_title = True
                if any(earlier.strip() for earlier in lines[: number - 1]):
                    result.errors.append("TEXT_BEFORE_TITLE")
            continue
        h2 = _H2.match(line)
        if h2:
            section = h2.group(1)
            result.sections.setdefault(section, [])
            continue
        if section is None:
            stripped = line.strip()
            if stripped.startswith(">") and not details:
                summary.append(stripped.lstrip(">").strip())
            elif stripped or details:
                details.append(line)
            continue
        item = _LIST_ITEM.match(line)
        if item:
            link = _LINK.match(item.group(1).strip())
            if link is None:
                result.errors.append(f"INVALID_LINK:{number}")
            else:
                notes = (link.group("notes") or "").strip()
                result.sections[section].append(
                    LlmsLink(link.group("title").strip(), link.group("url"), notes)
                )
    if not seen_title or not result.title:
        result.errors.insert(0, "MISSING_TITLE")
    result.summary = " ".join(s for s in summary if s)
    result.details = "\n".join(details).strip()
    result.errors.extend(f"EMPTY_SECTION:{name}" for name, links in result.sections.items() if not links)
    return result
