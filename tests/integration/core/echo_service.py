"""A tiny gRPC service for exercising the shared server runtime over real sockets.

Messages are `llmo.common.v1.Usage` so no test-only proto is needed:
`input_tokens` selects the behaviour, `output_tokens` carries data back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from llmo.core import context as ctx
from llmo.core.errors import invalid_argument
from llmo.core.server import GrpcServer
from llmo.core.settings import PlatformSettings, ServiceSettings
from llmo.protos.common.v1 import common_pb2

SERVICE = "llmo.test.v1.EchoService"
FAIL_INVALID, FAIL_CRASH, SLOW, WHO = 1, 2, 3, 4

seen: dict[str, Any] = {}


class EchoSettings(ServiceSettings):
    service = "cost"  # borrows a default port table entry; tests always pass port=0


async def echo(request: common_pb2.Usage, context: grpc.aio.ServicerContext) -> common_pb2.Usage:
    if request.input_tokens == FAIL_INVALID:
        raise invalid_argument("TOKENS_NEGATIVE", "input_tokens must be >= 0", field="input_tokens")
    if request.input_tokens == FAIL_CRASH:
        raise RuntimeError("secret internal detail")
    if request.input_tokens == SLOW:
        await asyncio.sleep(request.output_tokens / 1000)
    seen["tenant"] = ctx.current_tenant()
    seen["admin"] = ctx.is_admin()
    seen["request_id"] = ctx.current_request_id()
    trace = ctx.current_trace()
    seen["trace_id"] = trace.trace_id if trace else None
    seen["remaining"] = ctx.remaining_seconds()
    return common_pb2.Usage(input_tokens=request.input_tokens, output_tokens=request.output_tokens + 1)


async def count(request: common_pb2.Usage, context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.Usage]:
    for i in range(request.output_tokens):
        if request.input_tokens == FAIL_INVALID and i == 2:
            raise invalid_argument("STREAM_BROKEN", "failed after two items")
        yield common_pb2.Usage(output_tokens=i)


def add_echo(_servicer: object, server: grpc.aio.Server) -> None:
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=common_pb2.Usage.FromString, response_serializer=common_pb2.Usage.SerializeToString
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            count, request_deserializer=common_pb2.Usage.FromString, response_serializer=common_pb2.Usage.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def make_server(api_keys: dict[str, str] | None = None, drain_seconds: float = 5.0,
                admin_tenants: frozenset[str] = frozenset()) -> GrpcServer:
    settings = EchoSettings(platform=PlatformSettings(api_keys=api_keys or {}, drain_seconds=drain_seconds,
                                                      admin_tenants=admin_tenants))
    server = GrpcServer("test", settings, port=0)
    server.add_service(add_echo, None, SERVICE)
    return server


def stubs(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    unary = channel.unary_unary(
        f"/{SERVICE}/Echo",
        request_serializer=common_pb2.Usage.SerializeToString,
        response_deserializer=common_pb2.Usage.FromString,
    )
    stream = channel.unary_stream(
        f"/{SERVICE}/Count",
        request_serializer=common_pb2.Usage.SerializeToString,
        response_deserializer=common_pb2.Usage.FromString,
    )
    return unary, stream


async def serve_until_signal(port_file: str) -> None:
    """Entry point of the drain test's child process."""
    from pathlib import Path

    from llmo.core.server import wait_for_shutdown_signal

    server = make_server(drain_seconds=10.0)
    port = await server.start()
    Path(port_file).write_text(str(port))
    await wait_for_shutdown_signal()
    await server.stop()


if __name__ == "__main__":
    import sys

    asyncio.run(serve_until_signal(sys.argv[1]))
