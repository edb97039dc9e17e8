"""gRPC status codes <-> :mod:`kvstore.errors`, in one place (clients and the servicer).

==================================  =====================================
gRPC status                         kvstore error
==================================  =====================================
UNAVAILABLE, ABORTED, CANCELLED     TransportError (retryable)
DEADLINE_EXCEEDED                   Timeout (retryable)
INVALID_ARGUMENT, OUT_OF_RANGE,     InvalidArgument
FAILED_PRECONDITION
RESOURCE_EXHAUSTED                  InvalidArgument for a request over a
                                    limit (message or batch size), NoSpace
                                    when storage (or a tenant quota) is
                                    full, TryAgain past a tenant's puts in
                                    flight
UNAUTHENTICATED, PERMISSION_DENIED  PermissionDenied
NOT_FOUND                           NotFound
ALREADY_EXISTS                      InvalidArgument
anything else (INTERNAL, UNKNOWN)   KVStoreError
==================================  =====================================
"""

from __future__ import annotations

import grpc

from kvstore.errors import (
    InvalidArgument,
    KVStoreError,
    NoSpace,
    NotFound,
    PermissionDenied,
    Timeout,
    TransportError,
    TryAgain,
)

# A RESOURCE_EXHAUSTED whose details start with this marker means "storage full".
NO_SPACE_MARKER = "no space:"
# ... and with this one "too much in flight right now": retry later.
BUSY_MARKER = "busy:"

_BY_CODE: dict[grpc.StatusCode, type[KVStoreError]] = {
    grpc.StatusCode.UNAVAILABLE: TransportError,
    grpc.StatusCode.ABORTED: TransportError,
    grpc.StatusCode.CANCELLED: TransportError,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def error_from_rpc(e: grpc.RpcError, what: str = "master") -> KVStoreError:
    """The :class:`~kvstore.errors.KVStoreError` for a failed gRPC call. Never raises.

    ``what`` prefixes the message (``"master 127.0.0.1:5555: Lookup"``); the
    server's details are kept, so the message says what to do next.
    """
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    return error_from_status(code, details, what)


def error_from_status(code: grpc.StatusCode | None, details: str, what: str = "master") -> KVStoreError:
    """The error for a call answered with ``code`` (either channel of the master)."""
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    msg = f"{what}: {name}: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if details.startswith(NO_SPACE_MARKER):
            return NoSpace(msg)
        return TryAgain(msg) if details.startswith(BUSY_MARKER) else InvalidArgument(msg)
    cls = _BY_CODE.get(code) if isinstance(code, grpc.StatusCode) else None
    return (cls or KVStoreError)(msg)


def status_for(err: KVStoreError) -> grpc.StatusCode:
    """The gRPC status the servicer answers for ``err`` (the inverse mapping)."""
    if isinstance(err, NoSpace):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, Timeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(err, TransportError | TryAgain):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class CallError(Exception):
    """A master call answered with a gRPC status instead of a response (either channel)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
