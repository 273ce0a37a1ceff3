"""What every service's CLI group needs to reach its running service over gRPC: the default
address (the stack `llmo up` runs in the data directory, else the service's default port) and
one call with gRPC failures turned into a one-line error (exit code 1, no traceback)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import grpc

from llmo.core.client import create_channel, outgoing_metadata
from llmo.core.errors import error_info
from llmo.core.settings import DEFAULT_GRPC_PORTS

T = TypeVar("T")


def default_endpoint(service: str) -> str:
    """`host:port` of `service` in the stack `llmo up` runs in the data directory, else its default port."""
    try:
        from llmo.cli.stack import StackState
        from llmo.core.settings import PlatformSettings

        state = StackState.load(PlatformSettings().data_dir)
    except Exception:  # no stack state, or an unreadable one: the default port
        state = None
    if state is not None and service in state.services:
        return state.services[service].grpc
    return f"127.0.0.1:{DEFAULT_GRPC_PORTS[service]}"


def call_service(service: str, endpoint: str, api_key: str | None, stub_class: Callable[[grpc.aio.Channel], Any],
                 action: Callable[[Any, list[tuple[str, str]]], Awaitable[T]]) -> T:
    """Run `action(stub, metadata)` against the service; a failed call becomes a ClickException
    naming the service, the status and the ErrorInfo reason."""

    async def run() -> T:
        async with create_channel(endpoint) as channel:
            return await action(stub_class(channel), outgoing_metadata(api_key))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        reason = f" [{info.reason}]" if info else ""
        raise click.ClickException(f"{service} service at {endpoint}: {error.code().name}{reason}: {error.details()}"
                                   ) from error
