"""API-key authentication: `authorization: Bearer <key>` maps to a tenant.

Tenant isolation: a caller acts on its own tenant only, unless it is an admin
(a tenant listed in `LLMO_ADMIN_TENANTS`, or anyone while authentication is
off). Servicers pass every tenant a request names through `scoped_tenant`.

Acting for a caller: a trusted service (an admin key, such as the router's) that
calls another service for an end tenant sends that tenant in `x-llmo-tenant`
and its own request id in `x-request-id`. `resolve_caller` honours both only
from admins: the downstream service then scopes and charges the end tenant,
never the service's own. Anyone else's `x-request-id` is kept for log
correlation only (`client_request_id`); the platform mints the request id, so a
client cannot choose the exactly-once key of its own usage.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from llmo.core import context as ctx
from llmo.core.errors import ServiceError, permission_denied, unauthenticated
from llmo.core.limits import MAX_ID_LEN, check_identifier, is_identifier

ON_BEHALF_HEADER = "x-llmo-tenant"
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class Caller:
    """Who a call is for, resolved once at the edge (gRPC interceptor or HTTP edge)."""

    tenant: str  # the tenant the call acts on and is charged to
    admin: bool  # may act across tenants (False when a service acts for one end tenant)
    key_tenant: str  # the tenant of the API key itself (the service, when acting for someone)
    request_id: str  # minted here, or a trusted service's own id
    client_request_id: str  # the caller's `x-request-id` when it was not trusted (logs only)


def resolve_caller(
    metadata: Mapping[str, str],
    api_keys: Mapping[str, str],
    admin_tenants: Collection[str],
    *,
    default_tenant: str,
    mint: str = "",
) -> Caller:
    """Authenticate the caller and decide the tenant and request id of the call.

    Raises UNAUTHENTICATED for a bad key, PERMISSION_DENIED (`ON_BEHALF_FORBIDDEN`)
    when a non-admin names another tenant in `x-llmo-tenant`, INVALID_ARGUMENT
    (`INVALID_IDENTIFIER`) for a malformed `x-llmo-tenant`. `mint` is the request
    id used when none is trusted (a fresh one is made when empty).
    """
    key_tenant = tenant_for(metadata, api_keys, default_tenant=default_tenant)
    admin = acts_across_tenants(key_tenant, api_keys, admin_tenants)
    tenant = key_tenant
    on_behalf = metadata.get(ON_BEHALF_HEADER, "")
    if on_behalf and on_behalf != key_tenant:
        if not admin:
            raise permission_denied(
                "ON_BEHALF_FORBIDDEN",
                f"only service keys may act for another tenant ({ON_BEHALF_HEADER})",
                caller_tenant=key_tenant,
            )
        tenant = check_identifier(on_behalf, ON_BEHALF_HEADER)
        admin = False
    sent = metadata.get(REQUEST_ID_HEADER, "")
    trusted = acts_across_tenants(key_tenant, api_keys, admin_tenants) and is_identifier(sent)
    request_id = sent if trusted else (mint or ctx.new_request_id())
    client_request_id = "" if trusted else sent[:MAX_ID_LEN]
    return Caller(tenant, admin, key_tenant, request_id, client_request_id)


def tenant_for(
    metadata: Mapping[str, str], api_keys: Mapping[str, str], *, default_tenant: str
) -> str:
    """Return the tenant of the caller, or raise UNAUTHENTICATED.

    With no keys configured (development), every caller is `default_tenant`.
    """
    if not api_keys:
        return default_tenant
    header = metadata.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise unauthenticated("API_KEY_MISSING", "missing `authorization: Bearer <api key>` metadata")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthenticated("API_KEY_MALFORMED", "authorization metadata must be `Bearer <api key>`")
    return _lookup(key.strip(), api_keys)


def acts_across_tenants(tenant: str, api_keys: Mapping[str, str], admin_tenants: Collection[str]) -> bool:
    """Whether `tenant` may act on other tenants: authentication off, or an admin tenant."""
    return not api_keys or tenant in admin_tenants


def scoped_tenant(requested: str) -> str:
    """The tenant the current call may act on when it asks for `requested`.

    Admins (and every caller with authentication off) get `requested` as given,
    where empty means all tenants for the RPCs that allow it. Anyone else gets
    their own tenant for an empty or own `requested`, and PERMISSION_DENIED
    (`TENANT_FORBIDDEN`) for another tenant.
    """
    if ctx.is_admin():
        return requested
    caller = ctx.current_tenant()
    if caller and requested in ("", caller):
        return caller
    raise permission_denied(
        "TENANT_FORBIDDEN",
        f"tenant {caller or ''!r} may not act on tenant {requested!r}",
        caller_tenant=caller or "",
        requested_tenant=requested,
    )


def may_access(tenant: str) -> bool:
    """Whether the current call may see a resource that belongs to `tenant`
    (an empty owner, e.g. a budget over every tenant, is for admins only)."""
    return ctx.is_admin() or (bool(tenant) and tenant == ctx.current_tenant())


def _lookup(key: str, api_keys: Mapping[str, str]) -> str:
    tenant: str | None = None
    for candidate, owner in api_keys.items():
        # Compare every key in constant time so timing does not leak key prefixes.
        if hmac.compare_digest(candidate.encode(), key.encode()):
            tenant = owner
    if tenant is None:
        raise unauthenticated("API_KEY_INVALID", "the API key is not valid")
    return tenant


def is_auth_error(error: Exception) -> bool:
    return isinstance(error, ServiceError) and error.reason.startswith("API_KEY_")
