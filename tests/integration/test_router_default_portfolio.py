"""The portfolio the router writes for itself, as `llmo up` runs it: it works with API keys
on (the router presents the service key `llmo up` mints) and follows the inference service
to a new port after a restart on the same data directory, until a user edits it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from llmo.cli.stack import (
    EVALUATION_KEY_ENV,
    EVALUATION_SERVICE_TENANT,
    RETRIEVAL_KEY_ENV,
    RETRIEVAL_SERVICE_TENANT,
    ROUTER_SERVICE_TENANT,
    VISIBILITY_KEY_ENV,
    VISIBILITY_SERVICE_TENANT,
    service_keys,
)
from llmo.core.natsd import NatsServer
from llmo.core.settings import parse_admin_tenants, parse_api_keys
from llmo.protos.router.v1 import router_service_pb2 as pb
from llmo.protos.router.v1 import router_service_pb2_grpc as pb_grpc
from llmo.router.default_portfolio import INFERENCE_KEY_ENV, is_generated
from llmo.router.fake_backend import FakeBackend
from llmo.router.main import start
from llmo.router.settings import RouterSettings

from .test_router_service import KEYS, complete, user_msg


def settings(tmp_path: Path, url: str) -> RouterSettings:
    return RouterSettings(
        database_url=f"sqlite:///{tmp_path / 'router.db'}",
        metrics_port=-1,
        events=False,
        inference_http_url=url,
        platform={"data_dir": tmp_path, "drain_seconds": 0.2, "api_keys": KEYS},
    )


async def answer_from(s: RouterSettings, key: str = "key-a") -> str:
    router = await start(s, port=0, http_port=-1, metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            out = await complete(pb_grpc.RouterServiceStub(channel), pb.CompleteRequest(messages=user_msg("hello"), skip_cache=True), key)
        return out[-1].finish_reason
    finally:
        await router.stop()


def test_llmo_up_mints_a_service_key_for_each_service_calling_another_when_api_keys_are_on() -> None:
    assert service_keys({}) == ({}, {})  # authentication off: nothing to mint
    env = {"LLMO_API_KEYS": "k1=tenantA,k2=tenantB", "LLMO_ADMIN_TENANTS": "finops"}
    shared, per_service = service_keys(env)
    key = per_service["router"][INFERENCE_KEY_ENV]
    generator_key = per_service["retrieval"][RETRIEVAL_KEY_ENV]
    judge_key = per_service["evaluation"][EVALUATION_KEY_ENV]
    engine_key = per_service["visibility"][VISIBILITY_KEY_ENV]
    assert parse_api_keys(shared["LLMO_API_KEYS"]) == {"k1": "tenantA", "k2": "tenantB", key: ROUTER_SERVICE_TENANT,
                                                       generator_key: RETRIEVAL_SERVICE_TENANT,
                                                       judge_key: EVALUATION_SERVICE_TENANT,
                                                       engine_key: VISIBILITY_SERVICE_TENANT}
    assert parse_admin_tenants(shared["LLMO_ADMIN_TENANTS"]) == {"finops", ROUTER_SERVICE_TENANT,
                                                                 RETRIEVAL_SERVICE_TENANT, EVALUATION_SERVICE_TENANT,
                                                                 VISIBILITY_SERVICE_TENANT}
    assert per_service["router"]["LLMO_ROUTER_COST_API_KEY"] == key
    assert len({key, generator_key, judge_key, engine_key}) == 4
    # An operator who chose the services' keys keeps them.
    chosen = {INFERENCE_KEY_ENV: "mine", RETRIEVAL_KEY_ENV: "theirs", EVALUATION_KEY_ENV: "ours",
              VISIBILITY_KEY_ENV: "yours"}
    assert service_keys({**env, **chosen}) == ({}, {})
    _, only_retrieval = service_keys({**env, INFERENCE_KEY_ENV: "mine", EVALUATION_KEY_ENV: "ours",
                                      VISIBILITY_KEY_ENV: "yours"})
    assert set(only_retrieval) == {"retrieval"}


async def test_the_default_portfolio_works_with_api_keys_on(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await FakeBackend(tokens=3, api_key="svc-key").start()
    try:
        monkeypatch.setenv(INFERENCE_KEY_ENV, "svc-key")
        assert await answer_from(settings(tmp_path, f"http://127.0.0.1:{backend.port}")) == "stop"
        assert backend.headers[-1]["authorization"] == "Bearer svc-key"
        assert backend.headers[-1]["x-llmo-tenant"] == "tenant-a"  # inference charges the end tenant
    finally:
        await backend.stop()


async def test_the_default_portfolio_follows_inference_to_a_new_port_until_edited(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    first, second = await FakeBackend(tokens=3).start(), await FakeBackend(tokens=3).start()
    try:
        assert await answer_from(settings(tmp_path, f"http://127.0.0.1:{first.port}")) == "stop"
        assert first.calls == {"llmo-demo": 1}
        # `llmo up --random-ports` again on the same data dir: inference is elsewhere now.
        assert await answer_from(settings(tmp_path, f"http://127.0.0.1:{second.port}")) == "stop"
        assert second.calls == {"llmo-demo": 1} and first.calls == {"llmo-demo": 1}
        # A user's edit makes the file theirs: it is kept as written.
        path = tmp_path / "router" / "portfolio.yaml"
        edited = path.read_text().replace("max_output_tokens: 256", "max_output_tokens: 128")
        path.write_text(edited)
        assert not is_generated(edited)
        assert await answer_from(settings(tmp_path, f"http://127.0.0.1:{first.port}")) == "stop"
        assert path.read_text() == edited and second.calls == {"llmo-demo": 2}
    finally:
        await first.stop()
        await second.stop()
