"""Fuzzing every decoder that reads bytes from a socket or a disk (hypothesis): frame
headers, control payloads and items, transport descriptors, remote regions, the master's
framed channel and journal records, disk index records. Nothing crashes: every input is
decoded or refused with the decoder's own clear error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.config import StoreConfig
from kvstore.errors import Corruption, InvalidArgument, KVStoreError
from kvstore.framing import HEADER
from kvstore.master import codec
from kvstore.master.fast import REQUESTS, parse
from kvstore.node import control
from kvstore.node.holds import Holds
from kvstore.node.protocol import MAGIC, VERSION, Op, parse_header
from kvstore.node.service import NodeService
from kvstore.store import LocalStore
from kvstore.tiers.disk import decode_record
from transport import wire
from transport.regions import RemoteRegion

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.binary(max_size=80)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6), max_leaves=30)


@given(st.binary(min_size=HEADER.size, max_size=HEADER.size))
@FUZZ
def test_control_frame_header(raw: bytes) -> None:
    try:
        op, flags, length = parse_header(raw)
    except ValueError:
        return
    assert raw[:4] == MAGIC and raw[4] == VERSION and length <= 64 << 20


@given(st.binary(max_size=300))
@FUZZ
def test_control_payload(raw: bytes) -> None:
    try:
        control._unpack(raw)
    except (ValueError, TypeError, msgpack.UnpackException):
        pass


@pytest.fixture(scope="module")
def service() -> Iterator[NodeService]:
    store = LocalStore(StoreConfig(dram="4MiB", prefault=False))
    store.put(b"present", b"x" * 5000)
    yield NodeService(store, Holds(60, per_owner=64))
    store.close()


@given(st.sampled_from([o for o in Op if o != Op.AUTH and o != Op.STORE]), st.lists(values, max_size=8),
       st.sampled_from([b"", b"@t/"]))
@FUZZ
def test_node_requests(service: NodeService, op: Op, items: list[Any], scope: bytes) -> None:
    try:
        out = service.handle(op, items, None, b"s" * 16, scope)
    except (ValueError, TypeError, PermissionError):
        return
    results = out.results if isinstance(out, control.Streamed) else out
    assert len(results) == len(items)
    if isinstance(out, control.Streamed):
        out.done()
    service.holds.close()  # nothing held across examples


@given(st.lists(values, max_size=4))
@FUZZ
def test_auth_items(items: list[Any]) -> None:
    try:
        token, session = control._auth_item(items, b"s" * 16)
    except ValueError:
        return
    assert len(session) == 16 and (token is None or isinstance(token, bytes))


@given(st.binary(min_size=wire.HEADER.size, max_size=wire.HEADER.size), st.binary(max_size=200))
@FUZZ
def test_transport_frames(head: bytes, body: bytes) -> None:
    try:
        h = wire.parse_header(head)
    except InvalidArgument:
        return
    try:
        wire.parse_descs(body[: h.n * wire.DESC.size], h.n)
    except (InvalidArgument, ValueError):
        pass


@given(st.binary(max_size=120))
@FUZZ
def test_remote_region_descriptors(raw: bytes) -> None:
    try:
        r = RemoteRegion.from_bytes(raw)
    except (InvalidArgument, ValueError):
        return
    assert r.nbytes >= 0


@given(st.binary(min_size=HEADER.size, max_size=HEADER.size), st.sampled_from(sorted(REQUESTS)),
       st.binary(max_size=200))
@FUZZ
def test_master_framed_channel(head: bytes, method: str, body: bytes) -> None:
    try:
        parse(head, 1 << 20)
    except ValueError:
        pass
    try:
        REQUESTS[method].FromString(body)
    except DecodeError:
        pass


@given(st.binary(max_size=120))
@FUZZ
def test_master_journal_records(raw: bytes) -> None:
    for decode in (codec.decode_object, codec.decode_node, lambda r: codec.decode_int(r, "x")):
        try:
            decode(raw)
        except Corruption:
            pass


@given(st.binary(max_size=64))
@FUZZ
def test_disk_index_records(raw: bytes) -> None:
    try:
        decode_record(raw)
    except KVStoreError as e:
        assert isinstance(e, Corruption)


ATHERIS = ("control_frame", "auth_items", "transport_frame", "remote_region", "master_frame", "master_records",
           "disk_records")


@pytest.mark.parametrize("target", ATHERIS)
def test_atheris_pass(target: str, tmp_path: Any) -> None:
    """The same decoders under coverage-guided fuzzing (atheris/libFuzzer), from valid seeds:
    10,000 inputs each, no crash (tests/security/atheris_fuzz.py)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("atheris", reason="atheris did not install here; the hypothesis pass above covers "
                                          "the same decoders")
    script = Path(__file__).with_name("atheris_fuzz.py")
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(script), "--seed", target, str(corpus)], check=True, env=env, timeout=60)
    r = subprocess.run([sys.executable, str(script), target, "-runs=10000", "-max_len=512",
                        f"-artifact_prefix={tmp_path}/", str(corpus)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "Done 10000 runs" in r.stderr, r.stderr[-4000:]
