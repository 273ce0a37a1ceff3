"""Generated tenancy checks: for every RPC that names or lists a resource, tenantB (key k2)
can neither read, list, modify, probe the existence of, nor be billed against tenantA's
(key k1) resources; the probes come from each registered service's plan (tenancy.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import message as _message
from google.protobuf import text_format

from llmo.core.errors import error_info
from tests.suites.protogen import message_class
from tests.suites.registry import BY_NAME, SERVICES, ServiceEntry, auth, known_failure
from tests.suites.stack import CALL_TIMEOUT_S, Stack
from tests.suites.tenancy import B_KEY, PLANS, Probe


def _case(service: str, name: str, *values: Any) -> Any:
    why = known_failure(service, name, "tenancy")
    return pytest.param(*values, id=f"{service}-{name}", marks=[pytest.mark.xfail(strict=True, reason=why)] if why else [])


PROBES = [_case(entry.name, probe.name, entry.name, probe) for entry in SERVICES for probe in PLANS[entry.name].probes]


@pytest.fixture(scope="module")
def owned(stack: Stack) -> dict[str, Any]:
    """What tenantA owns in each service before tenantB probes."""
    return {entry.name: PLANS[entry.name].setup(stack) for entry in SERVICES}


def _call(stack: Stack, entry: ServiceEntry, method_name: str, request: _message.Message) -> tuple[str, Any]:
    """('OK', response) or (code name, reason) of one call as tenantB."""
    method = entry.descriptor.methods_by_name[method_name]
    path = f"/{entry.descriptor.full_name}/{method.name}"
    out = message_class(method.output_type)
    kw = {"request_serializer": type(request).SerializeToString, "response_deserializer": out.FromString}
    channel = stack.channel(entry.name)
    try:
        if method.server_streaming:
            responses = list(channel.unary_stream(path, **kw)(request, metadata=auth(B_KEY), timeout=CALL_TIMEOUT_S))
            return "OK", responses
        return "OK", channel.unary_unary(path, **kw)(request, metadata=auth(B_KEY), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        info = error_info(error)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), f"{method_name}: {code} {error}"
        return code.name, info.reason if info is not None else f"(no ErrorInfo) {error.details()}"  # type: ignore[attr-defined]


def _text(response: Any) -> str:
    items = response if isinstance(response, list) else [response]
    return " ".join(text_format.MessageToString(item, as_one_line=True) for item in items)


def _outcome(probe: Probe, result: tuple[str, Any]) -> tuple[str, Any]:
    code, value = result
    return (code, probe.digest(value)) if code == "OK" else (code, value)


@pytest.mark.parametrize("service", [entry.name for entry in SERVICES])
def test_every_rpc_is_probed_or_names_no_tenant_resource(service: str) -> None:
    plan = PLANS[service]
    probed = {probe.method for probe in plan.probes}
    unclassified = {m.name for m in BY_NAME[service].methods()} - probed - plan.tenant_free
    assert not unclassified, f"{service}: add a tenancy probe (or tenant_free entry) for {sorted(unclassified)}"


@pytest.mark.parametrize(("service", "probe"), PROBES)
def test_tenant_b_cannot_reach_tenant_a(stack: Stack, owned: dict[str, Any], service: str, probe: Probe) -> None:
    entry, state = BY_NAME[service], owned[service]
    theirs = _call(stack, entry, probe.method, probe.theirs(state))
    if theirs[0] == "OK":
        leaked = [m for m in probe.markers if m in _text(theirs[1])]
        assert not leaked, f"tenantB's {probe.method} shows tenantA's {leaked}: {_text(theirs[1])[:400]}"
    if probe.missing is not None:
        missing = _call(stack, entry, probe.method, probe.missing(state))
        assert _outcome(probe, theirs) == _outcome(probe, missing), (
            f"tenantB tells tenantA's resource from a missing one: {_outcome(probe, theirs)} vs {_outcome(probe, missing)}")


@pytest.mark.parametrize("service", [entry.name for entry in SERVICES])
def test_tenant_a_resources_and_ledger_unchanged(stack: Stack, owned: dict[str, Any], service: str) -> None:
    """Runs last in the module: after every probe above."""
    PLANS[service].verify(stack, owned[service])
