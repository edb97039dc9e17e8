"""gRPC status codes map to the kvstore error tree in one place."""

from __future__ import annotations

import grpc
import pytest

from kvstore import errors
from kvstore.master.errors import BUSY_MARKER, NO_SPACE_MARKER, error_from_rpc, status_for


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "why") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.UNAVAILABLE, errors.TransportError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.Timeout),
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.InvalidArgument),
    (grpc.StatusCode.UNAUTHENTICATED, errors.PermissionDenied),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.INTERNAL, errors.KVStoreError),
])
def test_error_from_rpc(code: grpc.StatusCode, cls: type[errors.KVStoreError]) -> None:
    e = error_from_rpc(FakeRpcError(code, "split the batch"), "master x:1: Lookup")
    assert type(e) is cls
    assert "split the batch" in str(e) and "master x:1: Lookup" in str(e)


def test_no_space_and_retryable() -> None:
    e = error_from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{NO_SPACE_MARKER} full"))
    assert isinstance(e, errors.NoSpace)
    busy = error_from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{BUSY_MARKER} too many puts"))
    assert isinstance(busy, errors.TryAgain) and busy.retryable
    assert error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE)).retryable
    assert not error_from_rpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)).retryable


def test_status_for_is_the_inverse() -> None:
    for cls in (errors.NoSpace, errors.InvalidArgument, errors.PermissionDenied,
                errors.NotFound, errors.Timeout, errors.TransportError):
        code = status_for(cls("x"))
        details = f"{NO_SPACE_MARKER} x" if cls is errors.NoSpace else "x"
        assert isinstance(error_from_rpc(FakeRpcError(code, details)), cls)
