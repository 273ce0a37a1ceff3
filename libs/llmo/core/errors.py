"""Errors with a stable machine-readable reason.

Servicers raise `ServiceError` (usually through the helpers below); the server
interceptor turns it into the canonical gRPC status with a
`google.rpc.ErrorInfo` detail (`reason`, `domain` = `llmo.<service>`,
`metadata`). Clients branch on `reason`, never on the message text.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


MAX_MESSAGE_CHARS = 512
MAX_METADATA_VALUE_CHARS = 128
MAX_METADATA_ENTRIES = 16


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text)} chars)"


class ServiceError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, object] | None = None,
        *,
        domain: str | None = None,
    ) -> None:
        # Bounded here, once for every service and both edges: an error must never echo
        # unbounded input (gRPC trailers are limited to 16 KB; past that the client gets a
        # bare RESOURCE_EXHAUSTED with no ErrorInfo).
        message = _bounded(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.reason = _bounded(reason, MAX_METADATA_VALUE_CHARS)
        self.message = message
        items = list((metadata or {}).items())[:MAX_METADATA_ENTRIES]
        self.metadata = {_bounded(str(k), 64): _bounded(str(v), MAX_METADATA_VALUE_CHARS) for k, v in items}
        self.domain = domain

    def to_status(self, domain: str) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain or domain, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.reason!r}, {self.message!r})"


def invalid_argument(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def not_found(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, message, metadata)


def already_exists(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, reason, message, metadata)


def failed_precondition(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata)


def resource_exhausted(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, metadata)


def unauthenticated(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message, metadata)


def permission_denied(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, reason, message, metadata)


def unavailable(reason: str, message: str, **metadata: object) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, metadata)


def error_info(error: grpc.RpcError | grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if the server sent one."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


# code_pb2 is imported so the canonical code numbers stay in sync with grpc's.
assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]
