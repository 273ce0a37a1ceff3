from __future__ import annotations

import pytest

from llmo.router.settings import RouterSettings


def test_router_settings_read_the_stack_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RouterSettings().resolved_grpc_port() == 50051
    assert RouterSettings().resolved_http_port() == 8080
    assert RouterSettings(http_port=-1).resolved_http_port() is None
    monkeypatch.setenv("LLMO_COST_ADDRESS", "127.0.0.1:50056")
    monkeypatch.setenv("LLMO_INFERENCE_HTTP_URL", "http://127.0.0.1:8000")
    s = RouterSettings()
    assert s.cost_target == "127.0.0.1:50056" and s.inference_http_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("LLMO_ROUTER_COST_TARGET", "10.0.0.1:1")
    assert RouterSettings().cost_target == "10.0.0.1:1"
    assert RouterSettings(cost_target="x:1").cost_target == "x:1"
