"""Helpers every resource-oriented servicer shares (AIP-style names, ids, timestamps, retries).

Resource ids are `[a-z0-9][a-z0-9-]{0,62}`; names are `collection/{id}` segments
(`datasets/{dataset}/examples/{example}`); a Create retried with the same request id is
recognised by a fingerprint of the request; List pages continue after the last id seen.
"""

from __future__ import annotations

import hashlib
import re

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from llmo.core.errors import invalid_argument
from llmo.core.limits import preview
from llmo.core.pagination import decode_page_token

RESOURCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RESOURCE_ID_RULE = "[a-z0-9][a-z0-9-]{0,62}"


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp from microseconds since the epoch."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def resource_id(value: str, reason: str, what: str) -> str:
    """`value` if it is a valid resource id, else INVALID_ARGUMENT `reason` naming `what`."""
    if not RESOURCE_ID.match(value):
        raise invalid_argument(reason, f"{what} must match {RESOURCE_ID_RULE}; got {preview(value)!r}",
                               value=preview(value))
    return value


def parse_name(name: str, *collections: str) -> tuple[str, ...]:
    """The ids of a name made of `collections` segments, e.g. parse_name(n, "datasets", "examples")
    for `datasets/{d}/examples/{e}`; INVALID_NAME otherwise."""
    parts = name.split("/")
    ok = len(parts) == 2 * len(collections) and all(
        parts[2 * i] == collection and RESOURCE_ID.match(parts[2 * i + 1]) for i, collection in enumerate(collections))
    if not ok:
        pattern = "/".join(f"{c}/{{{c[:-1]}}}" for c in collections)
        raise invalid_argument("INVALID_NAME", f"expected {pattern}; got {preview(name)!r}", name=preview(name))
    return tuple(parts[1::2])


def fingerprint(request: Message, *cleared: str) -> str:
    """A short hash of `request` without the `cleared` fields: equal for a retry of the same call."""
    copy = type(request)()
    copy.CopyFrom(request)
    for field_name in cleared:
        copy.ClearField(field_name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:16]


def page_after(token: str, query: str = "") -> str:
    """The id a List page continues after (`""` for the first page); INVALID_PAGE_TOKEN when the
    token is not ours or belongs to another query."""
    after = (decode_page_token(token, query=query) or {}).get("after", "")
    if not isinstance(after, str):
        raise invalid_argument("INVALID_PAGE_TOKEN", "page_token is malformed or belongs to another query")
    return after
