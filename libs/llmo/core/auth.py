"""API-key authentication: `authorization: Bearer <key>` maps to a tenant."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from llmo.core.errors import ServiceError, unauthenticated


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
