"""Issue 13's twelve reproductions (scripts/trust_probe.py) against the embedded stack `llmo up`
starts: nats-server, inference with the demo model, router and cost as their own processes,
with the issue's tenants, service key and FinOps admin key. Each probe must pass.

The probes are the script's own functions (one implementation of each reproduction); the
latencies they measure are reported, never asserted here (`timing=False`)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_asyncio

pytestmark = pytest.mark.slow
in_stack_loop = pytest.mark.asyncio(loop_scope="module")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "trust_probe.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trust_probe", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


probe = _load_script()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    running = await probe.start_target(tmp_path_factory.mktemp("trust"), timing=False)
    yield running
    await running.close()


@in_stack_loop
@pytest.mark.parametrize("number", sorted(probe.PROBES))
async def test_issue_13_reproduction_passes(target: Any, number: int) -> None:
    result = await probe.run_probe(target, number)
    failed = [f"sent: {c.sent}\n  came back: {c.observed}\n  expected: {c.expected}" for c in result.checks if not c.ok]
    assert result.passed, f"#{number} {result.title}\n" + "\n".join(failed) + (f"\n{result.error}" if result.error else "")
