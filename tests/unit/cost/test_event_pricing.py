"""The consumers' fast path prices an event exactly as the generic path does."""

from __future__ import annotations

import pytest

from llmo.cost.prices import load_catalog
from llmo.cost.records import (
    RecordRejected,
    price_inference_event,
    price_usage,
    usage_from_inference,
)
from llmo.protos.common.v1 import common_pb2
from llmo.protos.events.v1 import events_pb2

CATALOG = load_catalog()


def event(**changes: object) -> events_pb2.InferenceCompleted:
    e = events_pb2.InferenceCompleted(
        event_id="e-1",
        request_id="r-1",
        model="gpt-4o",
        provider="",
        attribution=common_pb2.Attribution(tenant="acme", application="chat", user="u"),
        usage=common_pb2.Usage(input_tokens=1234, cached_input_tokens=200, output_tokens=321),
        latency=common_pb2.Latency(ttft_ms=80, e2e_ms=900),
    )
    e.occurred_at.FromSeconds(1_764_000_000)
    for name, value in changes.items():
        if name == "latency" and value is None:
            e.ClearField("latency")
        elif name == "occurred_at" and value is None:
            e.ClearField("occurred_at")
        elif name in ("usage", "latency"):
            getattr(e, name).CopyFrom(value)
        else:
            setattr(e, name, value)
    return e


@pytest.mark.parametrize(
    "changes",
    [{}, {"request_id": ""}, {"latency": None}, {"provider": "azure"}, {"model": "claude-haiku-4-5"}],
)
def test_fast_path_equals_the_generic_path(changes: dict[str, object]) -> None:
    e = event(**changes)
    assert price_inference_event(e, CATALOG) == price_usage(usage_from_inference(e), CATALOG)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"event_id": ""}, "malformed_payload"),
        ({"model": ""}, "malformed_payload"),
        ({"event_id": "x" * 129}, "malformed_payload"),
        ({"occurred_at": None}, "malformed_payload"),
        ({"model": "no-such-model"}, "unknown_model"),
    ],
)
def test_fast_path_rejects_what_the_generic_path_rejects(changes: dict[str, object], reason: str) -> None:
    e = event(**changes)
    with pytest.raises(RecordRejected) as fast:
        price_inference_event(e, CATALOG)
    with pytest.raises(RecordRejected) as generic:
        price_usage(usage_from_inference(e), CATALOG)
    assert fast.value.reason.value == generic.value.reason.value == reason
    assert fast.value.detail == generic.value.detail


@pytest.mark.parametrize(
    "usage",
    [
        common_pb2.Usage(input_tokens=2**62),  # its cost would overflow SQLite's 64-bit integers
        common_pb2.Usage(output_tokens=1_000_000_001),
        common_pb2.Usage(cached_input_tokens=-1),
    ],
)
def test_token_counts_past_the_bound_are_malformed(usage: common_pb2.Usage) -> None:
    with pytest.raises(RecordRejected) as rejected:
        price_inference_event(event(usage=usage), CATALOG)
    assert rejected.value.reason.value == "malformed_payload" and rejected.value.field == "usage"
    assert "1000000000" in rejected.value.detail


@pytest.mark.parametrize("seconds", [-10**12, 4_102_444_800, 10**12])
def test_times_outside_the_bounds_are_malformed(seconds: int) -> None:
    e = event()
    e.occurred_at.seconds = seconds
    with pytest.raises(RecordRejected) as rejected:
        price_inference_event(e, CATALOG)
    assert rejected.value.field == "occurred_at"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, 1e12])
def test_non_finite_or_absurd_event_latency_reads_as_missing(bad: float) -> None:
    record = price_inference_event(event(latency=common_pb2.Latency(ttft_ms=bad, e2e_ms=bad)), CATALOG)
    assert (record.ttft_ms, record.latency_ms) == (None, None)
    assert price_usage(usage_from_inference(event(latency=common_pb2.Latency(ttft_ms=bad, e2e_ms=bad))), CATALOG) == record


def test_a_lora_adapter_is_priced_at_its_base_model_and_keyed_by_its_own_name() -> None:
    from llmo.cost.records import price_router_event

    adapter = price_inference_event(event(model="support-lora", base_model="gpt-4o"), CATALOG)
    base = price_inference_event(event(), CATALOG)
    assert adapter.cost_micros == base.cost_micros > 0
    assert adapter.model == "support-lora" and adapter.request_key == "r-1/support-lora"
    assert price_usage(usage_from_inference(event(model="support-lora", base_model="gpt-4o")), CATALOG) == adapter
    routed = events_pb2.RouterCompleted(event_id="rt-1", request_id="r-1", model="support-lora", base_model="gpt-4o",
                                        usage=common_pb2.Usage(input_tokens=10, output_tokens=10))
    routed.occurred_at.FromSeconds(1_764_000_000)
    assert price_router_event(routed, CATALOG).request_key == adapter.request_key  # joined: charged once
    # an adapter with a price of its own keeps it; neither known: unknown_model
    assert price_inference_event(event(base_model="claude-haiku-4-5"), CATALOG).cost_micros == base.cost_micros
    with pytest.raises(RecordRejected) as info:
        price_inference_event(event(model="support-lora", base_model="no-such-base"), CATALOG)
    assert info.value.reason.value == "unknown_model"
