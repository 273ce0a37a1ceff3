"""AIP-158 pagination: opaque page tokens and page size limits shared by every List RPC."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from llmo.core.errors import invalid_argument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Our tokens are a few dozen characters; a longer one is not ours and is refused unread.
MAX_PAGE_TOKEN_LEN = 1024


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise invalid_argument("INVALID_PAGE_SIZE", f"page_size must be >= 0, got {requested}")
    return min(requested or default, maximum)


def encode_page_token(position: dict[str, Any], *, query: str = "") -> str:
    """Opaque token holding where the next page starts and a fingerprint of the query."""
    raw = json.dumps({"p": position, "q": query}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, *, query: str = "") -> dict[str, Any] | None:
    """Position encoded by `encode_page_token`; None for the first page.

    A token from a different query (other filters) is rejected, as AIP-158 asks.
    """
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_LEN:
        raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position = data["p"]
        if data.get("q", "") != query or not isinstance(position, dict):
            raise ValueError("token belongs to another query")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query") from exc
    return position
