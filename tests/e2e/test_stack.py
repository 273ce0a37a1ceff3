"""The embedded stack as `llmo up` runs it: every implemented service in its own
process, reachable over gRPC with health and reflection, stopped cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmo.cli.stack import Stack, StackState, check_health, implemented_services

pytestmark = pytest.mark.slow
in_stack_loop = pytest.mark.asyncio(loop_scope="module")

SERVICES = implemented_services()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    if not SERVICES:
        pytest.skip("no service is implemented")
    running = Stack(tmp_path_factory.mktemp("stack"), services=SERVICES, random_ports=True)
    await running.start()
    yield running
    codes = await running.stop()
    assert codes == {name: 0 for name in SERVICES}, f"a service did not drain and exit cleanly: {codes}"


async def reflected_services(target: str) -> set[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        names: set[str] = set()
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names |= {s.name for s in reply.list_services_response.service}
    return names


@in_stack_loop
@pytest.mark.parametrize("service", SERVICES)
async def test_every_service_is_healthy_and_reflects_its_contract(stack: Stack, service: str) -> None:
    endpoint = stack.state.services[service]
    assert await check_health(endpoint.grpc) == "SERVING"
    names = await reflected_services(endpoint.grpc)
    assert "grpc.health.v1.Health" in names
    assert any(name.startswith(f"llmo.{service}.v1.") for name in names), names


@in_stack_loop
async def test_status_command_reports_the_running_stack(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmo.cli.main", "status", "--json", "--data-dir", str(stack.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {name: s["health"] for name, s in report["services"].items()} == {name: "SERVING" for name in SERVICES}
    assert StackState.load(Path(stack.data_dir)) is not None


def test_status_without_a_stack_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmo.cli.main", "status", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "no stack running" in result.stderr


def test_serving_an_unknown_service_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmo.cli.main", "serve", "ranking"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Invalid value" in result.stderr and "visibility" in result.stderr


@in_stack_loop
async def test_a_failed_start_leaves_no_process_behind(tmp_path: Path) -> None:
    if "cost" not in SERVICES:
        pytest.skip("the cost service is not implemented")
    unreachable_db = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    stack = Stack(tmp_path, services=["cost"], random_ports=True, env={"LLMO_COST_DATABASE_URL": unreachable_db})
    with pytest.raises(RuntimeError, match="cost exited"):
        await stack.start(health_timeout=120)
    assert stack.nats.process is None, "nats-server was left running"
    assert all(process.poll() is not None for process in stack._processes.values())
