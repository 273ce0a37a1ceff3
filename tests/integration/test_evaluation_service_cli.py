"""`llmo eval import / run / gate / compare` as a user runs them (their own process) against the real
evaluation service started in-process on a socket: a CI pipeline's gate exits non-zero on failure."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmo.core.settings import PlatformSettings
from llmo.evaluation.main import start
from llmo.evaluation.settings import EvaluationSettings
from llmo.protos.evaluation.v1 import evaluation_service_pb2 as pb
from llmo.protos.evaluation.v1 import evaluation_service_pb2_grpc as pb_grpc

KEY = "cli-key"


class Service:
    """The evaluation service on its own event loop in a thread (each CLI command runs its own loop)."""

    def __init__(self, data: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = EvaluationSettings(database_url=f"sqlite:///{data / 'evaluation.db'}", metrics_port=-1,
                                      judge_url="", target_url="", consume_events=False, publish_events=False,
                                      platform=PlatformSettings(data_dir=data, api_keys={KEY: "tenant-cli"},
                                                                nats_url="nats://127.0.0.1:1", drain_seconds=0.5))
        self.running = self.run(start(settings, port=0, metrics=False))
        self.address = f"127.0.0.1:{self.running.port}"

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def close(self) -> None:
        self.run(self.running.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = Service(tmp_path_factory.mktemp("evaluation-cli"))
    try:
        yield running
    finally:
        running.close()


def llmo(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMO_API_KEY", "LLMO_EVALUATION_ENDPOINT")}
    return subprocess.run([sys.executable, "-m", "llmo.cli.main", "eval", "--address", service.address, "--api-key",
                           KEY, *args], capture_output=True, text=True, timeout=300,
                          env={**env, "COLUMNS": "200", "LLMO_LOG_LEVEL": "warning"})


def test_import_run_gate_and_compare_from_the_command_line(service: Service, tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"id": f"e{i}", "input": "2+2?", "output": "4", "reference": "4",
                                        "topic": "math"}) + "\n" for i in range(4)))
    bad = tmp_path / "bad.csv"
    bad.write_text("id,input,output,reference,human_helpful\n" + "".join(f"e{i},2+2?,five,4,2\n" for i in range(4)))
    for path, dataset in ((good, "good"), (bad, "bad")):
        done = llmo(service, "import", str(path), "--dataset", dataset)
        assert done.returncode == 0 and f"imported 4 examples into datasets/{dataset}" in done.stdout, done.stderr

    async def gate() -> None:
        channel = grpc.aio.insecure_channel(service.address)
        await pb_grpc.EvaluationServiceStub(channel).CreateGate(pb.CreateGateRequest(gate_id="exact", gate=pb.Gate(
            conditions=[pb.GateCondition(metric="exact_match", aggregation=pb.AGGREGATION_CI_LOW,
                                         comparator=pb.COMPARATOR_GREATER_THAN_OR_EQUAL, threshold=0.9)])),
            metadata=[("authorization", f"Bearer {KEY}")])
        await channel.close()

    service.run(gate())
    passed = llmo(service, "run", "--dataset", "good", "--metric", "exact_match", "--gate", "exact", "--run-id", "r-good")
    assert passed.returncode == 0 and "exact_match" in passed.stdout and "passed" in passed.stdout, passed.stderr
    failed = llmo(service, "run", "--dataset", "bad", "--metric", "exact_match", "--gate", "exact", "--run-id", "r-bad")
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    assert llmo(service, "gate", "--gate", "exact", "--run", "r-good").returncode == 0
    checked = llmo(service, "gate", "--gate", "exact", "--run", "r-bad", "--json")
    assert checked.returncode == 1 and json.loads(checked.stdout)["conditions"][0].get("observed", 0.0) == 0.0
    compared = json.loads(llmo(service, "compare", "r-good", "r-bad", "--json").stdout)
    assert compared["comparisons"][0]["meanDelta"] == -1.0 and compared["comparisons"][0]["lossRate"] == 1.0
    # bad input: a clear error naming the file and line, exit status 2; a missing dataset, exit status 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "ok"}\n{"output": "no input"}\n')
    done = llmo(service, "import", str(broken), "--dataset", "x")
    assert done.returncode == 2 and "line 2" in done.stderr and "input" in done.stderr
    missing = llmo(service, "run", "--dataset", "nope", "--metric", "exact_match")
    assert missing.returncode == 1 and "DATASET_NOT_FOUND" in missing.stderr
