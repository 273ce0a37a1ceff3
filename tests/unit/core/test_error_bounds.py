"""Errors never echo unbounded input: ServiceError bounds its message, reason and metadata."""

from __future__ import annotations

import grpc

from llmo.core.errors import (
    MAX_MESSAGE_CHARS,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_VALUE_CHARS,
    invalid_argument,
)


def test_a_huge_message_and_metadata_fit_in_grpc_trailers() -> None:
    huge = "😀" * 3_000_000
    error = invalid_argument("BAD", f"name {huge!r} is wrong", **{f"k{i}": huge for i in range(100)})
    assert len(error.message) <= MAX_MESSAGE_CHARS and "chars)" in error.message
    assert len(error.metadata) == MAX_METADATA_ENTRIES
    assert all(len(v) <= MAX_METADATA_VALUE_CHARS for v in error.metadata.values())
    status = error.to_status("llmo.test")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(status.SerializeToString()) < 16 * 1024


def test_short_errors_are_untouched() -> None:
    error = invalid_argument("BAD", "temperature must be in [0, 2]", field="temperature")
    assert error.message == "temperature must be in [0, 2]" and error.metadata == {"field": "temperature"}
