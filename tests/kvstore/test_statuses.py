"""Every status vocabulary maps to the error tree, in one place, and they agree."""

import grpc
import pytest

from kvstore import errors
from kvstore.errors import STATUS_ERRORS, status_error
from kvstore.master.errors import _BY_CODE
from kvstore.node.protocol import SlotStatus
from kvstore.v1 import master_pb2 as mpb
from transport import wire


@pytest.mark.parametrize("names", [
    [s.name for s in SlotStatus],
    list(mpb.ItemStatus.keys()),
    list(wire.STATUS_NAMES.values()),
], ids=["node-slot", "master-item", "transport-wire"])
def test_every_status_has_a_meaning(names):
    missing = [n for n in names if n not in STATUS_ERRORS]
    assert not missing, f"statuses with no entry in kvstore.errors.STATUS_ERRORS: {missing}"


def test_what_callers_may_retry():
    for name in ("BUSY", "LEASED", "EXPIRED"):
        err = status_error(name, "x")
        assert err is not None and err.retryable
    for name in ("NO_SPACE", "CORRUPT", "INVALID", "PINNED", "NOT_FOUND", "MALFORMED"):
        err = status_error(name, "x")
        assert err is not None and not err.retryable
    assert status_error("OK", "x") is None and status_error("ALREADY_EXISTS", "x") is None
    assert type(status_error("SOMETHING_NEW", "x")) is errors.KVStoreError


def test_wire_replies_use_the_same_table():
    assert isinstance(wire.status_error(wire.E_CORRUPT, "m"), errors.Corruption)
    assert isinstance(wire.status_error(wire.E_MALFORMED, "m"), errors.InvalidArgument)
    assert isinstance(wire.status_error(99, "m"), errors.TransportError)


def test_grpc_codes_agree_with_item_statuses_where_they_mean_the_same():
    assert _BY_CODE[grpc.StatusCode.NOT_FOUND] is STATUS_ERRORS["NOT_FOUND"]
    assert _BY_CODE[grpc.StatusCode.INVALID_ARGUMENT] is STATUS_ERRORS["INVALID"]
    assert all(c.retryable for code, c in _BY_CODE.items()
               if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED))
