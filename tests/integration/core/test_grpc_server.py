"""The shared gRPC runtime over real sockets: auth, errors with ErrorInfo,
context propagation, health, reflection and drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmo.core import context as ctx
from llmo.core.client import create_channel, outgoing_metadata
from llmo.core.errors import error_info
from llmo.core.server import GrpcServer
from llmo.protos.common.v1 import common_pb2

from . import echo_service
from .echo_service import FAIL_CRASH, FAIL_INVALID, SERVICE, SLOW, make_server, stubs


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    srv = make_server(api_keys={"key-a": "tenant-a", "key-b": "tenant-b", "key-svc": "svc"},
                      admin_tenants=frozenset({"svc"}))
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with create_channel(f"127.0.0.1:{server.bound_port}") as chan:
        yield chan


AUTH_A = (("authorization", "Bearer key-a"),)


async def test_bad_api_key_is_unauthenticated_with_reason(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(common_pb2.Usage(), metadata=(("authorization", "Bearer wrong"),))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(raised.value)
    assert info is not None and info.reason == "API_KEY_INVALID" and info.domain == "llmo.test"


async def test_missing_api_key_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(common_pb2.Usage())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(raised.value)
    assert info is not None and info.reason == "API_KEY_MISSING"


async def test_api_key_maps_to_its_tenant(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    reply = await echo(common_pb2.Usage(output_tokens=41), metadata=(("authorization", "Bearer key-b"),))
    assert reply.output_tokens == 42
    assert echo_service.seen["tenant"] == "tenant-b"


async def test_invalid_argument_carries_error_info(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(common_pb2.Usage(input_tokens=FAIL_INVALID), metadata=AUTH_A)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None
    assert (info.reason, info.domain, dict(info.metadata)) == ("TOKENS_NEGATIVE", "llmo.test", {"field": "input_tokens"})


async def test_unexpected_error_is_internal_without_details(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(common_pb2.Usage(input_tokens=FAIL_CRASH), metadata=AUTH_A)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (raised.value.details() or "")
    assert "Traceback" not in (raised.value.details() or "")
    info = error_info(raised.value)
    assert info is not None and info.reason == "INTERNAL" and info.metadata["request_id"]


async def test_stream_error_midway_keeps_items_and_reason(channel: grpc.aio.Channel) -> None:
    _, count = stubs(channel)
    items = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for item in count(common_pb2.Usage(input_tokens=FAIL_INVALID, output_tokens=5), metadata=AUTH_A):
            items.append(item.output_tokens)
    assert items == [0, 1]
    info = error_info(raised.value)
    assert info is not None and info.reason == "STREAM_BROKEN"


async def test_request_id_trace_and_deadline_reach_the_handler(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    parent = ctx.TraceContext.new()
    with ctx.bind(request_id="req-123", trace=parent):
        metadata = [("authorization", "Bearer key-svc"), *outgoing_metadata()]
    await echo(common_pb2.Usage(), metadata=metadata, timeout=5)
    assert echo_service.seen["request_id"] == "req-123"
    assert echo_service.seen["trace_id"] == parent.trace_id
    # grpc-timeout travels in whole units of a coarse-enough scale, rounded up: a few ms over is normal
    assert 0 < echo_service.seen["remaining"] <= 5.05


async def test_health_and_reflection_need_no_key(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in responses:
        names |= {s.name for s in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_stop_drains_in_flight_calls_and_refuses_new_ones() -> None:
    server = make_server()
    port = await server.start()
    async with create_channel(f"127.0.0.1:{port}", max_attempts=1) as chan:
        echo, _ = stubs(chan)
        in_flight = asyncio.ensure_future(echo(common_pb2.Usage(input_tokens=SLOW, output_tokens=800)))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(server.stop(grace=5))
        reply = await in_flight
        assert reply.output_tokens == 801
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo(common_pb2.Usage(), timeout=2)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_drains_in_flight_call_before_exit(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.core.echo_service", str(port_file)],
        cwd=Path(__file__).resolve().parents[3],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            assert child.poll() is None, "server exited early"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        port = int(port_file.read_text())

        async def scenario() -> int:
            async with create_channel(f"127.0.0.1:{port}", max_attempts=1) as chan:
                echo, _ = stubs(chan)
                call = asyncio.ensure_future(echo(common_pb2.Usage(input_tokens=SLOW, output_tokens=1500)))
                await asyncio.sleep(0.3)
                child.send_signal(signal.SIGTERM)
                reply = await call
                return int(reply.output_tokens)

        assert asyncio.run(scenario()) == 1501
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()


async def test_a_client_cannot_choose_its_request_id(channel: grpc.aio.Channel) -> None:
    """Request ids are exactly-once keys downstream: a non-admin's x-request-id is not trusted."""
    echo, _ = stubs(channel)
    ids = set()
    for _ in range(3):
        await echo(common_pb2.Usage(), metadata=[*AUTH_A, ("x-request-id", "reuse-1")])
        ids.add(echo_service.seen["request_id"])
    assert "reuse-1" not in ids and len(ids) == 3


async def test_a_service_key_acts_for_the_end_tenant(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    with ctx.bind(request_id="svc-req-1"):
        metadata = [("authorization", "Bearer key-svc"), *outgoing_metadata(on_behalf_of="tenant-b")]
    await echo(common_pb2.Usage(), metadata=metadata)
    assert echo_service.seen["tenant"] == "tenant-b"
    assert echo_service.seen["admin"] is False  # scoped to the end tenant, not across tenants
    assert echo_service.seen["request_id"] == "svc-req-1"


async def test_a_tenant_cannot_act_for_another(channel: grpc.aio.Channel) -> None:
    echo, _ = stubs(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(common_pb2.Usage(), metadata=[*AUTH_A, ("x-llmo-tenant", "tenant-b")])
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(raised.value)
    assert info is not None and info.reason == "ON_BEHALF_FORBIDDEN"


async def test_an_undecodable_request_is_invalid_argument_with_error_info(channel: grpc.aio.Channel) -> None:
    """Bytes protobuf refuses (here a truncated field) must not surface as UNKNOWN without ErrorInfo."""
    raw = channel.unary_unary(f"/{SERVICE}/Echo", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\x0a\xff\xff", metadata=AUTH_A)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None and info.reason == "INVALID_PROTOBUF" and info.domain == "llmo.test"
    echo, _ = stubs(channel)
    assert (await echo(common_pb2.Usage(output_tokens=1), metadata=AUTH_A)).output_tokens == 2
