"""`llmo config`: every knob with its value and source, secrets never printed."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from llmo.cli.config import mask
from llmo.cli.main import cli

SECRETS = ("sekrit-one", "sekrit-two", "hunter2", "router-cost-key", "upstream-key")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("LLMO_")]:
        monkeypatch.delenv(name)


def _configure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMO_API_KEYS", "sekrit-one=acme,sekrit-two=globex")
    monkeypatch.setenv("LLMO_COST_DATABASE_URL", "postgresql+psycopg://ledger:hunter2@db:5432/cost")
    monkeypatch.setenv("LLMO_ROUTER_COST_API_KEY", "router-cost-key")
    monkeypatch.setenv("LLMO_INFERENCE_OPENAI_API_KEY", "upstream-key")
    monkeypatch.setenv("LLMO_COST_ADDRESS", "cost.llmo.svc:50056")
    monkeypatch.setenv("LLMO_COST_INGEST_BATCH", "250")


def test_json_lists_every_knob_with_value_and_source(monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch)
    result = CliRunner().invoke(cli, ["config", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(row["scope"], row["variable"]): row for row in json.loads(result.output)}
    assert rows[("cost", "LLMO_COST_INGEST_BATCH")] | {"description": ""} == {
        "variable": "LLMO_COST_INGEST_BATCH", "scope": "cost", "knob": "ingest_batch", "type": "int",
        "value": "250", "source": "environment", "default": "1000", "error": None, "description": "",
    }
    assert rows[("cost", "LLMO_COST_ACK_WAIT_S")]["source"] == "default"
    assert rows[("router", "LLMO_ROUTER_COST_TARGET")]["value"] == "cost.llmo.svc:50056"
    assert rows[("router", "LLMO_ROUTER_COST_TARGET")]["source"] == "environment (LLMO_COST_ADDRESS)"
    assert rows[("platform", "LLMO_API_KEYS")]["value"] == "****=acme,****=globex"
    assert rows[("cost", "LLMO_COST_DATABASE_URL")]["value"] == "postgresql+psycopg://ledger:****@db:5432/cost"
    assert rows[("router", "LLMO_ROUTER_COST_API_KEY")]["value"] == "****"
    assert {("ops", "LLMO_OPS_BACKEND"), ("native", "LLMO_NATIVE_ISA"), ("llmo command", "LLMO_BENCHMARKS_DIR")} <= set(rows)
    assert not [secret for secret in SECRETS if secret in result.output]


def test_table_is_readable_and_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch)
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 0, result.output
    assert "LLMO_COST_INGEST_BATCH" in result.output and "environment" in result.output
    assert not [secret for secret in SECRETS if secret in result.output]


def test_an_invalid_value_is_named_and_the_rest_still_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMO_COST_INGEST_BATCH", "lots")
    monkeypatch.setenv("LLMO_ROUTER_COST_API_KEY", "router-cost-key")
    result = CliRunner().invoke(cli, ["config", "--json"])
    assert result.exit_code == 1
    rows = {(row["scope"], row["variable"]): row for row in json.loads(result.output.split("\nError:")[0])}
    bad = rows[("cost", "LLMO_COST_INGEST_BATCH")]
    assert bad["value"] == "lots" and "integer" in bad["error"]
    assert rows[("cost", "LLMO_COST_ACK_WAIT_S")]["error"] is None
    assert rows[("router", "LLMO_ROUTER_COST_API_KEY")]["value"] == "****"
    assert "invalid values" in result.output


def test_mask_hides_credentials_only() -> None:
    assert mask("nats_url", "nats://app:pw@nats:4222") == "nats://app:****@nats:4222"
    assert mask("nats_url", "nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert mask("openai_api_key", "") == ""
    assert mask("api_key", "k") == "****"
    assert mask("drain_seconds", 10.0) == "10.0"


def test_markdown_is_the_knob_table() -> None:
    result = CliRunner().invoke(cli, ["config", "--markdown"])
    assert result.exit_code == 0
    assert result.output.startswith("| variable | knob | type | default | meaning |")
    assert "| `LLMO_ROUTER_COST_TARGET` | router: `cost_target` | str | empty |" in result.output
