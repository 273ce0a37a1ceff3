"""Generated bad input for every gRPC method and every HTTP route of every registered
service, against the real stack: never INTERNAL / UNKNOWN / 5xx, always an ErrorInfo (or
OpenAI error body) with a stable reason, and afterwards the service still serves a
known-good request and has lost nothing it accepted."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _d
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.suites import contract, httpgen
from tests.suites.conftest import PROFILE
from tests.suites.httpclient import send
from tests.suites.protogen import describe, invalid_utf8_requests, messages, string_paths
from tests.suites.registry import SERVICES, HttpRoute, ServiceEntry, known_failure
from tests.suites.stack import CALL_TIMEOUT_S, Stack

GRPC_FAMILIES = ("fields", "invalid_utf8", "metadata")
LIGHT = max(3, settings.get_profile(PROFILE).max_examples // 2)  # families with a small input space
PROFILE_SETTINGS = settings(settings.get_profile(PROFILE))


def _case(service: str, case: str, family: str, *values: Any) -> Any:
    why = known_failure(service, case, family)
    marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
    return pytest.param(*values, id=f"{service}-{case}-{family}".replace(" ", "_"), marks=marks)


# A request without string fields (e.g. an empty ListAdaptersRequest) has nothing to hold invalid UTF-8.
GRPC_CASES = [_case(entry.name, method.name, family, entry, method, family)
              for entry in SERVICES for method in entry.methods() for family in GRPC_FAMILIES
              if family != "invalid_utf8" or string_paths(method.input_type)]
HTTP_CASES = [_case(entry.name, route.label, family, entry, route, family)
              for entry in SERVICES for route in entry.routes()
              for family in (httpgen.FAMILIES_POST if route.method == "POST" else httpgen.FAMILIES_GET)]


@pytest.fixture(scope="module")
def seeded(stack: Stack) -> dict[str, Any]:
    """What each service accepted before the generated traffic (checked again at the end)."""
    return {entry.name: entry.seed(stack) for entry in SERVICES}


def _call(stack: Stack, entry: ServiceEntry, method: _d.MethodDescriptor, wire: bytes,
          metadata: list[tuple[str, str]]) -> None:
    path = f"/{entry.descriptor.full_name}/{method.name}"
    channel = stack.channel(entry.name)
    if method.server_streaming:
        for _ in channel.unary_stream(path)(wire, metadata=metadata, timeout=CALL_TIMEOUT_S):
            pass
    else:
        channel.unary_unary(path)(wire, metadata=metadata, timeout=CALL_TIMEOUT_S)


def _metadata() -> st.SearchStrategy[list[tuple[str, str]]]:
    printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)
    auth = st.one_of(st.sampled_from(["Bearer k1", "Bearer k2", "Bearer", "Basic k1", "bearer k1", "Bearer nope",
                                      "Bearer k1 k2", "k1", "Bearer k-finops"]), printable.map("Bearer ".__add__))
    extra = st.lists(st.tuples(st.sampled_from(["x-request-id", "x-llmo-tenant", "x-llmo-application"]), printable),
                     max_size=3)
    return st.builds(lambda a, e: ([("authorization", a)] if a is not None else []) + e, st.one_of(st.none(), auth),
                     extra)


@pytest.mark.parametrize(("entry", "method", "family"), GRPC_CASES)
def test_grpc_method_survives_generated_input(stack: Stack, seeded: dict[str, Any], entry: ServiceEntry,
                                              method: _d.MethodDescriptor, family: str) -> None:
    case = f"{method.name}[{family}]"

    @settings(PROFILE_SETTINGS, max_examples=PROFILE_SETTINGS.max_examples if family == "fields" else LIGHT)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        if family == "invalid_utf8":
            wire, sent = data.draw(invalid_utf8_requests(method.input_type, entry.string_hints), label="wire")
            metadata = [("authorization", "Bearer k1")]
        else:
            msg = data.draw(messages(method.input_type, entry.string_hints), label="request")
            wire, sent = msg.SerializeToString(), describe(msg)
            if family == "metadata":
                metadata = data.draw(_metadata(), label="metadata")
                sent = f"{sent} with {contract.preview(metadata, 200)}"
            else:
                metadata = [("authorization", f"Bearer {data.draw(st.sampled_from(['k1', 'k-finops']), label='key')}")]
        contract.tried(entry.name)
        try:
            _call(stack, entry, method, wire, metadata)
        except grpc.RpcError as error:
            contract.check_rpc_error(entry.name, case, error, sent)

    run()


@pytest.mark.parametrize(("entry", "route", "family"), HTTP_CASES)
def test_http_route_survives_generated_input(stack: Stack, seeded: dict[str, Any], entry: ServiceEntry,
                                             route: HttpRoute, family: str) -> None:
    endpoint = stack.endpoints[entry.name]
    assert endpoint.http_app is not None and endpoint.http_port
    served = {(r.method, r.resource.canonical) for r in endpoint.http_app.router.routes() if r.resource is not None}
    assert (route.method, route.path) in served, "the running app no longer serves the discovered route"
    case = f"{route.label}[{family}]"
    good = entry.http_bodies.get(route.path)
    light = family in ("headers", "content_type", "query", "invalid_utf8", "surrogate", "deep_nesting")

    @settings(PROFILE_SETTINGS, max_examples=LIGHT if light else PROFILE_SETTINGS.max_examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        sent = data.draw(httpgen.http_inputs(route.method, route.path, family, good, entry.string_hints), label="input")
        contract.tried(entry.name)
        status, content_type, body = send(endpoint.http_port or 0, route.method, sent.path, sent.body, sent.headers)
        contract.check_http(entry.name, case, status, content_type, body, f"{route.method} {sent.path:.200} {sent.label}")

    run()


@pytest.mark.parametrize("entry", [_case(e.name, "known_good", "after", e) for e in SERVICES])
def test_service_still_serves_and_kept_what_it_accepted(stack: Stack, seeded: dict[str, Any],
                                                         entry: ServiceEntry) -> None:
    """Runs last in the module: after all the generated traffic above."""
    entry.verify(stack, seeded[entry.name])
