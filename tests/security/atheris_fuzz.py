"""Coverage-guided fuzzing (atheris, libFuzzer) of every decoder that reads bytes from a
socket or a disk: the same decoders and the same accepted errors as test_fuzz.py's
hypothesis pass, but driven by coverage of kvstore's own code.

    python tests/security/atheris_fuzz.py TARGET -runs=20000

Exits non-zero (libFuzzer's crash report) when a decoder raises anything but its own
clear error. ``test_fuzz.py::test_atheris_pass`` runs every target.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["kvstore", "transport"]):
    import msgpack
    from google.protobuf.message import DecodeError

    from kvstore.config import StoreConfig
    from kvstore.errors import Corruption, InvalidArgument, KVStoreError
    from kvstore.framing import HEADER
    from kvstore.master import codec
    from kvstore.master.fast import REQUESTS, parse
    from kvstore.node import control
    from kvstore.node.holds import Holds
    from kvstore.node.protocol import Op, parse_header
    from kvstore.node.service import NodeService
    from kvstore.store import LocalStore
    from kvstore.tiers.disk import decode_record
    from transport import wire
    from transport.regions import RemoteRegion

_service: NodeService | None = None


def _node() -> NodeService:
    global _service
    if _service is None:
        store = LocalStore(StoreConfig(dram="4MiB", prefault=False))
        store.put(b"present", b"x" * 5000)
        _service = NodeService(store, Holds(60, per_owner=64))
    return _service


def control_frame(data: bytes) -> None:
    """A whole request as the node's control server reads it: header, payload, handler."""
    if len(data) < HEADER.size:  # the server reads exactly a header's bytes before parsing
        return
    try:
        op, _flags, length = parse_header(data[:HEADER.size])
        items = control._unpack(data[HEADER.size:HEADER.size + length])
    except (ValueError, TypeError, msgpack.UnpackException):
        return
    if not isinstance(items, list) or op not in {int(o) for o in Op} or op in (Op.AUTH, Op.STORE):
        return
    service = _node()
    try:
        out = service.handle(Op(op), items, None, b"s" * 16, b"@t/" if data[-1:] == b"t" else b"")
    except (ValueError, TypeError, PermissionError):
        return
    if isinstance(out, control.Streamed):
        out.done()
    service.holds.close()


def auth_items(data: bytes) -> None:
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=False)
        control._auth_item(items if isinstance(items, list) else [items], b"s" * 16)
    except (ValueError, TypeError, msgpack.UnpackException):
        return


def transport_frame(data: bytes) -> None:
    if len(data) < wire.HEADER.size:  # read whole, as the header is
        return
    try:
        h = wire.parse_header(data[:wire.HEADER.size])
    except (InvalidArgument, ValueError):
        return
    body = data[wire.HEADER.size:wire.HEADER.size + h.n * wire.DESC.size]
    if len(body) < h.n * wire.DESC.size:  # the server reads the descriptors whole before parsing
        return
    try:
        wire.parse_descs(body, h.n)
    except (InvalidArgument, ValueError):
        return


def remote_region(data: bytes) -> None:
    try:
        RemoteRegion.from_bytes(data)
    except (InvalidArgument, ValueError):
        return


def master_frame(data: bytes) -> None:
    if len(data) >= HEADER.size:  # the channel reads exactly a header's bytes before parsing
        try:
            parse(data[:HEADER.size], 1 << 20)
        except ValueError:
            pass
    method = sorted(REQUESTS)[data[0] % len(REQUESTS)] if data else "Lookup"
    try:
        REQUESTS[method].FromString(data[1:])
    except DecodeError:
        return


def master_records(data: bytes) -> None:
    for decode in (codec.decode_object, codec.decode_node, lambda r: codec.decode_int(r, "x")):
        try:
            decode(data)
        except Corruption:
            pass


def disk_records(data: bytes) -> None:
    try:
        decode_record(data)
    except KVStoreError as e:
        if not isinstance(e, Corruption):
            raise


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs per target, for the fuzzer to mutate from (magic numbers and framing
    are hard to guess from nothing)."""
    from kvstore.master.fast import OPS, frame
    from kvstore.node.protocol import pack_frame
    from kvstore.v1 import master_pb2 as mpb

    item_sets = {Op.ACQUIRE: [b"present", b"absent"], Op.FETCH: [[b"present", 1], [b"present", 1, [[0, 10]]]],
                 Op.ALLOCATE: [[b"k", 4096]], Op.COMMIT: [[1, b"k", 7]], Op.RELEASE: [1, 2], Op.REMOVE: [b"present"],
                 Op.MAPS: [b"shm"]}
    lookup = mpb.LookupRequest(keys=[b"a", b"b"]).SerializeToString()
    return {
        "control_frame": [pack_frame(op, msgpack.packb(items)) for op, items in item_sets.items()],
        "auth_items": [msgpack.packb([None, b"s" * 16]), msgpack.packb(["token", b"s" * 16])],
        "transport_frame": [b"\x00" * (wire.HEADER.size + wire.DESC.size)],
        "remote_region": [b"\x00" * 40],
        "master_frame": [frame(OPS["Lookup"], lookup)[:HEADER.size] + lookup],
        "master_records": [b"\x01" * 24],
        "disk_records": [b"\x00" * 32],
    }


TARGETS: dict[str, Callable[[bytes], Any]] = {
    f.__name__: f for f in (control_frame, auth_items, transport_frame, remote_region, master_frame,
                            master_records, disk_records)}


def main() -> None:
    """``TARGET [libFuzzer flags]``; ``--seed DIR`` writes the target's seed inputs to DIR
    (pass DIR as the corpus: a libFuzzer argument after the flags) and exits."""
    if sys.argv[1] == "--seed":
        import pathlib

        out = pathlib.Path(sys.argv[3])
        out.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()[sys.argv[2]]):
            (out / f"seed-{i}").write_bytes(seed)
        return
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
