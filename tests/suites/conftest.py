"""The generated suites: hypothesis profiles, the shared stack, and the tally they print.

`LLMO_SUITE_EXAMPLES` (default 8) bounds generated inputs per case; `LLMO_SUITE_PROFILE=shrink`
also shrinks failures to a minimal input (slower; use it to investigate, CI runs `ci`).
The per-service counts are printed at the end and written to `LLMO_SUITE_SUMMARY`
(default: <pytest basetemp>/suites-summary.json).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.suites import contract
from tests.suites.registry import SERVICES
from tests.suites.stack import Stack, start_stack

EXAMPLES = int(os.environ.get("LLMO_SUITE_EXAMPLES", "8"))
_COMMON = {
    "deadline": None,
    "database": None,
    "derandomize": True,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                              HealthCheck.function_scoped_fixture],
}
settings.register_profile("ci", max_examples=EXAMPLES, phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.register_profile("shrink", max_examples=EXAMPLES,
                          phases=[Phase.explicit, Phase.generate, Phase.shrink], **_COMMON)
PROFILE = os.environ.get("LLMO_SUITE_PROFILE", "ci")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "suites: generated bad-input and tenancy suites (tests/suites)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/suites/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.suites)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Every registered service, started once for the module against one real nats-server."""
    running = start_stack(tmp_path_factory.mktemp("stack"), [(entry.name, entry.start) for entry in SERVICES])
    try:
        yield running
    finally:
        running.stop()


def _summary_path(config: pytest.Config) -> Path:
    if os.environ.get("LLMO_SUITE_SUMMARY"):
        return Path(os.environ["LLMO_SUITE_SUMMARY"])
    return Path(config._tmp_path_factory.getbasetemp()) / "suites-summary.json"  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    data = contract.summary()
    if not data:
        return
    path = _summary_path(config)
    path.write_text(json.dumps(data, indent=2))
    terminalreporter.section("generated suites: inputs tried / failed per service")
    for name, row in data.items():
        terminalreporter.write_line(f"{name}: {row['inputs_tried']} tried, {row['inputs_failed']} failed, "
                                    f"{len(row['failing_cases'])} failing cases")
        for case, what in row["failing_cases"].items():
            terminalreporter.write_line(f"    {case}: {contract.preview(what, 400)}")
    terminalreporter.write_line(f"summary: {path}")
