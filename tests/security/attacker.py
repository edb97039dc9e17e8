"""An unauthorized peer (run by the security tests, often as another uid): tries every
listener of a secured pool and prints one JSON object, attempt -> "refused: ..." or
"SERVED: ...". Usage: ``attacker.py SPEC_JSON`` (addresses, descriptors, a key and its
checksum: the worst case, an attacker who knows where the bytes are)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from typing import Any

import grpc
import msgpack


def _control(address: str, frames: list[bytes]) -> list[tuple[Any, int, Any]]:
    """Send raw control frames on one connection; what the node answered to each."""
    from kvstore.framing import HEADER
    from kvstore.node.protocol import parse_header
    from transport.wire import recv_bytes

    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        out = []
        for f in frames:
            try:
                s.sendall(f)
                op, flags, n = parse_header(recv_bytes(s, HEADER.size))
                out.append((op, flags, msgpack.unpackb(recv_bytes(s, n), raw=False)))
            except (OSError, ValueError, Exception) as e:  # noqa: BLE001 - any end of service is a refusal
                out.append(("closed", 0, str(e)[:80]))
                break
    return out


def control_attempts(spec: dict[str, Any]) -> dict[str, str]:
    from kvstore.node.protocol import Op, SlotStatus, pack_frame

    key, want = bytes.fromhex(spec["key"]), spec["checksum"]
    res = {}
    tries = {
        "control_fetch_without_auth": [pack_frame(Op.FETCH, msgpack.packb([[key, want]]))],
        "control_acquire_without_auth": [pack_frame(Op.ACQUIRE, msgpack.packb([key]))],
        "control_allocate_without_auth": [pack_frame(Op.ALLOCATE, msgpack.packb([[b"evil", 4096]]))],
        "control_release_without_auth": [pack_frame(Op.RELEASE, msgpack.packb(list(range(1, 64))))],
        "control_fetch_bad_token": [pack_frame(Op.AUTH, msgpack.packb([b"guess", secrets.token_bytes(16)])),
                                    pack_frame(Op.FETCH, msgpack.packb([[key, want]]))],
        "control_big_preauth_frame": [pack_frame(Op.AUTH, msgpack.packb([b"x" * 100_000, b"s" * 16]))],
    }
    for name, frames in tries.items():
        target = frames[-1][5]  # the op byte of the frame the attack is about (header "<4sBBHI")
        got = _control(spec["control"], frames)
        served = any(op == target | 0x80 and flags == 0 for op, flags, _ in got) and target != Op.AUTH \
            or (target == Op.AUTH and any(p == [int(SlotStatus.OK)] for _, _, p in got))
        res[name] = ("SERVED: " if served else "refused: ") + repr(got)[:160]
    return res


def tcp_attempts(spec: dict[str, Any]) -> dict[str, str]:
    from kvstore.errors import KVStoreError
    from transport.base import TransportOptions
    from transport.regions import Desc, RemoteRegion
    from transport.registry import create

    res = {}
    for name, token in (("tcp_read_without_token", None), ("tcp_read_bad_token", b"guess")):
        t = create("tcp://127.0.0.1:0", TransportOptions(token=token))
        try:
            peer = t.connect(bytes.fromhex(spec["tcp_meta"]), timeout=5)
            local = t.allocate(4096, name="steal")
            remote = RemoteRegion.from_bytes(bytes.fromhex(spec["tcp_region"]))
            t.read(peer, [Desc(local, 0, remote, 0, 4096)], timeout=5).wait()
            res[name] = "SERVED: read 4096 arena bytes"
        except KVStoreError as e:
            res[name] = f"refused: {type(e).__name__}: {str(e)[:100]}"
        finally:
            t.close()
    return res


def shm_attempts(spec: dict[str, Any]) -> dict[str, str]:
    from kvstore.errors import KVStoreError
    from transport.base import TransportOptions
    from transport.regions import RemoteRegion
    from transport.registry import create

    t = create("shm://", TransportOptions(listen=False))
    try:
        peer = t.connect(bytes.fromhex(spec["shm_meta"]), timeout=5)
        view = t.map_remote(peer, RemoteRegion.from_bytes(bytes.fromhex(spec["shm_region"])), timeout=5)
        return {"shm_map_arena": f"SERVED: mapped {len(view)} bytes"}
    except (KVStoreError, OSError) as e:
        return {"shm_map_arena": f"refused: {type(e).__name__}: {str(e)[:100]}"}
    finally:
        t.close()


def master_attempts(spec: dict[str, Any]) -> dict[str, str]:
    from kvstore.v1 import master_pb2 as pb
    from kvstore.v1 import master_pb2_grpc as pb_grpc

    res = {}
    client = [("authorization", f"Bearer {spec['client_token']}")]
    node = [("authorization", f"Bearer {spec['node_token']}")] if spec.get("node_token") else None
    reg = pb.RegisterNodeRequest(node_id=spec["node_id"], host="evil", control_address="127.0.0.1:9",
                                 tiers=[pb.TierCapacity(name="dram", capacity=1 << 50)])
    tries: list[tuple[str, str, Any, Any]] = [
        ("master_register_without_token", "RegisterNode", reg, None),
        ("master_register_with_client_token", "RegisterNode", reg, client),
        ("master_heartbeat_with_client_token", "Heartbeat", pb.HeartbeatRequest(node_id=spec["node_id"], epoch=1),
         client),
        ("master_lookup_without_token", "Lookup", pb.LookupRequest(keys=[bytes.fromhex(spec["key"])]), None),
    ]
    if node is not None:
        tries.append(("master_lookup_with_node_token", "Lookup",
                      pb.LookupRequest(keys=[bytes.fromhex(spec["key"])]), node))
    with grpc.insecure_channel(spec["master"]) as ch:
        stub = pb_grpc.MasterStub(ch)
        for name, method, req, md in tries:
            try:
                getattr(stub, method)(req, timeout=5, metadata=md)
                res[name] = "SERVED"
            except grpc.RpcError as e:
                res[name] = f"refused: {e.code().name}: {(e.details() or '')[:80]}"
    return res


def drop_to(uid: int) -> None:
    """Become ``uid`` (root only), after everything the attacks use is imported: the
    interpreter and the venv may not be readable by that user."""
    import encodings.idna  # noqa: F401 - socket name resolution loads it lazily

    import grpc  # noqa: F401
    import numpy  # noqa: F401

    import kvstore.errors  # noqa: F401
    import kvstore.framing  # noqa: F401
    import kvstore.node.protocol  # noqa: F401
    import kvstore.v1.master_pb2_grpc  # noqa: F401
    import transport.base  # noqa: F401
    import transport.regions  # noqa: F401
    import transport.registry  # noqa: F401
    import transport.shm.transport  # noqa: F401
    import transport.tcp.transport  # noqa: F401
    import transport.wire  # noqa: F401

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("uid") is not None:
        drop_to(int(spec["uid"]))
        assert os.getuid() == int(spec["uid"])
    out: dict[str, str] = {}
    for part in spec["parts"]:
        out.update({"control": control_attempts, "tcp": tcp_attempts, "shm": shm_attempts,
                    "master": master_attempts}[part](spec))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
