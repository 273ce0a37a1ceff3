"""Tenant isolation helpers: who may act on which tenant, and `LLMO_ADMIN_TENANTS`."""

from __future__ import annotations

import grpc
import pytest

from llmo.core import context as ctx
from llmo.core.auth import acts_across_tenants, may_access, scoped_tenant
from llmo.core.errors import ServiceError
from llmo.core.settings import PlatformSettings, parse_admin_tenants

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-ops": "finops"}


def test_admin_tenants_parse_from_list_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_admin_tenants("finops, router ,,") == frozenset({"finops", "router"})
    assert parse_admin_tenants('["finops"]') == frozenset({"finops"})
    assert parse_admin_tenants(["finops", " "]) == frozenset({"finops"})
    assert parse_admin_tenants("") == frozenset()
    assert PlatformSettings().admin_tenants == frozenset()
    monkeypatch.setenv("LLMO_ADMIN_TENANTS", "finops,router")
    assert PlatformSettings().admin_tenants == frozenset({"finops", "router"})


def test_malformed_admin_tenants_json_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_admin_tenants('["finops"')


def test_only_admin_tenants_act_across_tenants_when_auth_is_on() -> None:
    assert acts_across_tenants("finops", KEYS, {"finops"})
    assert not acts_across_tenants("tenant-a", KEYS, {"finops"})
    # authentication off (development): everyone does
    assert acts_across_tenants("default", {}, frozenset())


def test_tenant_defaults_to_and_may_name_its_own() -> None:
    with ctx.bind(tenant="tenant-a", admin=False):
        assert scoped_tenant("") == "tenant-a"
        assert scoped_tenant("tenant-a") == "tenant-a"


def test_other_tenant_is_forbidden_with_error_info() -> None:
    with ctx.bind(tenant="tenant-a", admin=False), pytest.raises(ServiceError) as raised:
        scoped_tenant("tenant-b")
    error = raised.value
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "TENANT_FORBIDDEN"
    assert error.metadata == {"caller_tenant": "tenant-a", "requested_tenant": "tenant-b"}


def test_admin_gets_what_it_asks_for_including_all() -> None:
    with ctx.bind(tenant="finops", admin=True):
        assert scoped_tenant("tenant-b") == "tenant-b"
        assert scoped_tenant("") == ""
        assert may_access("tenant-b") and may_access("")


def test_outside_a_call_nothing_is_allowed() -> None:
    # no tenant bound and not admin: fail closed rather than widen to "all tenants"
    with pytest.raises(ServiceError) as raised:
        scoped_tenant("")
    assert raised.value.reason == "TENANT_FORBIDDEN"
    assert not may_access("tenant-a")


def test_may_access_only_own_resources() -> None:
    with ctx.bind(tenant="tenant-a", admin=False):
        assert may_access("tenant-a")
        assert not may_access("tenant-b")
        # resources over every tenant (empty owner) are for admins only
        assert not may_access("")


def test_admin_flag_is_reset_after_the_call() -> None:
    with ctx.bind(tenant="finops", admin=True):
        assert ctx.is_admin()
    assert not ctx.is_admin()
