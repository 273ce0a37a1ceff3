"""Bounds on identifiers and free text, shared by every service.

Every identifier a client sends (tenant, request id, resource ids, event ids)
has a documented maximum length and character set, and errors never echo
unbounded input: `preview()` cuts what goes into a message or ErrorInfo.
The proto comments cite these numbers.
"""

from __future__ import annotations

import re

from llmo.core.errors import ServiceError, invalid_argument

# Identifiers: tenants, applications, users, request / event / resource ids.
MAX_ID_LEN = 128
# Short labels: model names, providers, prompt versions, reasons.
MAX_LABEL_LEN = 256
# What an error message or ErrorInfo metadata value may quote of the input.
MAX_ECHO_LEN = 64

_ID_CHARS = re.compile(r"^[A-Za-z0-9._:@/+=-]+$")


def preview(value: object, limit: int = MAX_ECHO_LEN) -> str:
    """`value` as text, cut to `limit` characters (with the full length noted) for errors and logs."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def check_identifier(value: str, field: str, *, max_len: int = MAX_ID_LEN, required: bool = False,
                     reason: str = "INVALID_IDENTIFIER") -> str:
    """Return `value` if it is a bounded identifier (letters, digits and `._:@/+=-`), else raise
    INVALID_ARGUMENT naming `field` (the value is quoted only in part)."""
    if not value:
        if required:
            raise invalid_argument(reason, f"{field} is required", field=field)
        return value
    if len(value) > max_len:
        raise invalid_argument(reason, f"{field} is {len(value)} characters; the limit is {max_len}",
                               field=field, max_length=max_len)
    if not _ID_CHARS.match(value):
        raise invalid_argument(reason, f"{field} {preview(value)!r} may use only letters, digits and ._:@/+=-",
                               field=field)
    return value


def is_identifier(value: str, *, max_len: int = MAX_ID_LEN) -> bool:
    return bool(value) and len(value) <= max_len and bool(_ID_CHARS.match(value))


def check_text(value: str, field: str, *, max_len: int, reason: str = "FIELD_TOO_LONG") -> str:
    """Free text bounded by `max_len` characters."""
    if len(value) > max_len:
        raise invalid_argument(reason, f"{field} is {len(value)} characters; the limit is {max_len}",
                               field=field, max_length=max_len)
    return value


__all__ = ["MAX_ECHO_LEN", "MAX_ID_LEN", "MAX_LABEL_LEN", "ServiceError", "check_identifier", "check_text",
           "is_identifier", "preview"]
