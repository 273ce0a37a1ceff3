"""API-key authentication: `authorization: Bearer <key>` maps to a tenant.

Tenant isolation: a caller acts on its own tenant only, unless it is an admin
(a tenant listed in `LLMO_ADMIN_TENANTS`, or anyone while authentication is
off). Servicers pass every tenant a request names through `scoped_tenant`.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping

from llmo.core import context as ctx
from llmo.core.errors import ServiceError, permission_denied, unauthenticated


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
