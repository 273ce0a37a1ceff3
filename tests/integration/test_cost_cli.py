"""`llmo cost ...` and the demo step against a real cost-service process (gRPC over a socket)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmo.core.natsd import free_port
from llmo.cost.cli import cli
from llmo.cost.demo import run_demo


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("cost-cli")
    port = free_port()
    env = {
        **os.environ,
        "LLMO_DATA_DIR": str(data),
        "LLMO_LOG_LEVEL": "warning",
        "LLMO_COST_GRPC_PORT": str(port),
        "LLMO_COST_METRICS_PORT": "-1",
        "LLMO_COST_CONSUME_EVENTS": "false",
    }
    proc = subprocess.Popen([sys.executable, "-m", "llmo.cost.main"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"cost service did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.1)
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def seeded(endpoint: str) -> str:
    import asyncio

    lines = asyncio.run(run_demo({"cost": endpoint}))
    assert any("duplicate=True" in line for line in lines)
    assert any("break-even 1.45B tokens/month" in line for line in lines)
    # $0.0159 spent + $0.01 estimated passes the $0.02 soft limit of the demo budget
    assert any(line.startswith("cost: CheckBudget gpt-4o for demo: DOWNGRADE") and line.endswith("-> use gpt-4o-mini") for line in lines)
    return endpoint


def test_report_json_csv_and_table(seeded: str, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--endpoint", seeded, "report", "--since", "1d", "--group-by", "model", "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [row["model"] for row in document["rows"]] == ["gpt-4o", "gpt-4o-mini", "llmo-demo"]
    # gpt-4o: 3000 * 2.50 + 800 * 10.00 per 1M = $0.0155
    assert document["rows"][0]["cost_usd"] == "0.015500"
    assert document["total"]["requests"] == 3
    assert document["rows"][0]["ttft_p50_ms"] == 320.0

    target = tmp_path / "spend.csv"
    result = runner.invoke(cli, ["--endpoint", seeded, "report", "--group-by", "tenant,model", "--csv", str(target)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(target.read_text().splitlines()))
    assert {(r["tenant"], r["model"]) for r in rows} == {("demo", "gpt-4o"), ("demo", "gpt-4o-mini"), ("demo", "llmo-demo")}
    assert "gpt-4o-mini" in result.output and "total" in result.output  # the table is printed too

    result = runner.invoke(cli, ["--endpoint", seeded, "report", "--group-by", "colour"])
    assert result.exit_code != 0 and "unknown dimension 'colour'" in result.output


def test_prices_and_tco(seeded: str) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--endpoint", seeded, "prices", "--model", "o3"])
    assert result.exit_code == 0, result.output
    assert "2025-04-16" in result.output and "2025-06-10" in result.output
    args = ["--tokens-per-month", "160000000", "--input-fraction", "0.75", "--api-input", "0.25", "--api-output", "2"]
    args += ["--gpu-hourly", "1.19", "--hours-per-month", "729.6", "--throughput", "2500", "--overhead", "0.15", "--json"]
    result = runner.invoke(cli, ["--endpoint", seeded, "tco", *args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["self_hosted_monthly_usd"] == "998.457600"
    assert summary["break_even_tokens_per_month"] == 1_452_301_964
    assert summary["cheaper"] == "api"


def test_errors_are_clear(seeded: str) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--endpoint", seeded, "prices", "--model", "nope"])
    assert result.exit_code != 0 and "NOT_FOUND [UNKNOWN_MODEL]" in result.output
    result = runner.invoke(cli, ["--endpoint", f"127.0.0.1:{free_port()}", "report"])
    assert result.exit_code != 0 and "UNAVAILABLE" in result.output
