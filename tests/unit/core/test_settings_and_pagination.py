from __future__ import annotations

import grpc
import pytest

from llmo.core.auth import tenant_for
from llmo.core.context import TraceContext
from llmo.core.errors import ServiceError
from llmo.core.pagination import decode_page_token, encode_page_token, page_size
from llmo.core.settings import PlatformSettings, parse_api_keys


def test_api_keys_parse_from_pairs_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_api_keys("k1=acme, k2=globex") == {"k1": "acme", "k2": "globex"}
    assert parse_api_keys('{"k1": "acme"}') == {"k1": "acme"}
    monkeypatch.setenv("LLMO_API_KEYS", "k9=initech")
    assert PlatformSettings().api_keys == {"k9": "initech"}


def test_malformed_api_keys_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not key=tenant"):
        parse_api_keys("just-a-key")


def test_tenant_lookup() -> None:
    keys = {"k1": "acme"}
    assert tenant_for({"authorization": "Bearer k1"}, keys, default_tenant="d") == "acme"
    assert tenant_for({}, {}, default_tenant="d") == "d"
    with pytest.raises(ServiceError) as raised:
        tenant_for({"authorization": "Basic k1"}, keys, default_tenant="d")
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED and raised.value.reason == "API_KEY_MALFORMED"


def test_page_tokens_round_trip_and_reject_other_queries() -> None:
    token = encode_page_token({"after": "budgets/42"}, query="tenant=acme")
    assert decode_page_token(token, query="tenant=acme") == {"after": "budgets/42"}
    assert decode_page_token("", query="x") is None
    for bad_token, query in [(token, "tenant=globex"), ("%%%", ""), ("bm90IGpzb24", "")]:
        with pytest.raises(ServiceError) as raised:
            decode_page_token(bad_token, query=query)
        assert raised.value.reason == "INVALID_PAGE_TOKEN"


def test_page_size_defaults_and_caps() -> None:
    assert page_size(0) == 50
    assert page_size(5000) == 1000
    with pytest.raises(ServiceError):
        page_size(-1)


def test_traceparent_parsing() -> None:
    parsed = TraceContext.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert parsed is not None and parsed.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert TraceContext.parse("00-" + "0" * 32 + "-00f067aa0ba902b7-01") is None
    assert TraceContext.parse("garbage") is None
    child = parsed.child()
    assert child.trace_id == parsed.trace_id and child.span_id != parsed.span_id


def test_a_page_token_longer_than_any_we_issue_is_refused_unread() -> None:
    from llmo.core.pagination import MAX_PAGE_TOKEN_LEN

    token = encode_page_token({"after": "x" * 10})
    assert decode_page_token(token) == {"after": "x" * 10}
    with pytest.raises(ServiceError) as raised:
        decode_page_token("A" * (MAX_PAGE_TOKEN_LEN + 1))
    assert raised.value.reason == "INVALID_PAGE_TOKEN"
