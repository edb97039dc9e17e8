"""The HBM tier of LocalStore: device sums, placement, verified reads, demotion to DRAM,
zero-copy device views and CUDA IPC exports.

Without a GPU the tier runs on :class:`kvstore.testing.fake_cuda.HostHbmDevice` (host
shared memory posing as a device arena, the NumPy device sum, work that lands only
at ``wait``), so the tier's logic is checked here; the tests marked ``gpu`` run the
same paths on CUDA through CuPy and the kernels of csrc/cuda/device_sum.cu.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from kvstore import LocalStore
from kvstore.checksum import key_seed
from kvstore.config import StoreConfig
from kvstore.device_sum import GOLDEN, LENGTH, device_sum, mix
from kvstore.errors import ConfigError, InvalidArgument, NoSpace
from kvstore.testing.fake_cuda import FakeCudaArray, HostCopier, HostHbmDevice

KiB = 1024


def _slow_device_sum(data: bytes, key: bytes) -> int:
    """The definition, word by word (docs/gpu.md), to check the NumPy reference against."""
    seed, m = key_seed(key), (1 << 64) - 1
    padded = data + b"\0" * (-len(data) % 8)
    acc = 0
    for i in range(len(padded) // 8):
        w = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        acc = (acc + mix(w ^ ((seed + (i + 1) * GOLDEN) & m))) & m
    return mix(acc ^ ((len(data) * LENGTH) & m) ^ seed)


class Shifted:
    """CUDA-looking memory starting ``shift`` bytes into a FakeCudaArray (misaligned)."""

    def __init__(self, base: FakeCudaArray, shift: int) -> None:
        self.base, self.shift = base, shift

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        iface = dict(self.base.__cuda_array_interface__)
        iface["shape"] = (len(self.base.host) - self.shift,)
        iface["data"] = (iface["data"][0] + self.shift, False)
        return iface


def _value(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _device(data: bytes) -> FakeCudaArray:
    arr = FakeCudaArray(len(data))
    arr.host[:] = np.frombuffer(data, np.uint8)
    return arr


@pytest.fixture
def dev() -> HostHbmDevice:
    return HostHbmDevice()


@pytest.fixture
def store(dev: HostHbmDevice) -> Any:
    s = LocalStore(dram="1MiB", hbm="256KiB", high_watermark=0.9, low_watermark=0.5, prefault=False,
                   hbm_device=dev, device_copier=HostCopier())
    yield s
    s.close()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1000, 4097])
def test_device_sum_reference_matches_its_definition(n: int) -> None:
    data = _value(n, n)
    assert device_sum(data, b"k") == _slow_device_sum(data, b"k")


def test_device_sum_sees_keys_sizes_flips_and_swaps() -> None:
    data = _value(4096, 1)
    base = device_sum(data, b"a")
    assert device_sum(data, b"b") != base  # read under another key: no match
    assert device_sum(data + b"\0", b"a") != base  # trailing zero byte
    flipped = bytearray(data)
    flipped[1234] ^= 0x10
    assert device_sum(bytes(flipped), b"a") != base
    swapped = data[8:16] + data[:8] + data[16:]  # two words trade places
    assert device_sum(swapped, b"a") != base


def test_cuda_values_land_in_hbm_and_read_back_verified(store: Any, dev: HostHbmDevice) -> None:
    data = _value(20 * KiB + 3)
    store.put(b"k", _device(data))
    st = store.stats()
    assert st["tiers"]["hbm"]["chunks"] == 1 and st["tiers"]["dram"]["chunks"] == 0
    assert ("sum_copy", len(data)) in dev.ops  # copied and summed in one kernel
    out = FakeCudaArray(len(data) + 16)
    dev.ops.clear()
    assert store.get_into(b"k", out) == len(data)
    assert out.host[: len(data)].tobytes() == data
    assert dev.ops == [("sum_copy", len(data))]  # device to device, verified as it copies
    dev.ops.clear()
    assert store.get(b"k") == data
    assert dev.ops == [("sum", len(data)), ("d2h", len(data))]  # verified before it leaves the GPU
    assert store.exists(b"k") and store.size_of(b"k") == len(data)
    assert store.stats()["counters"]["hits.hbm"] == 2


def test_misaligned_device_buffers_take_a_copy_and_a_separate_sum(store: Any, dev: HostHbmDevice) -> None:
    data = _value(10 * KiB + 5, 2)
    base = FakeCudaArray(len(data) + 3)
    base.host[3:] = np.frombuffer(data, np.uint8)
    store.put(b"k", Shifted(base, 3))
    assert dev.ops == [("d2d", len(data)), ("sum", len(data))]
    out = FakeCudaArray(len(data) + 8)
    dev.ops.clear()
    assert store.get_into(b"k", Shifted(out, 5)) == len(data)
    assert dev.ops == [("sum", len(data)), ("d2d", len(data))]  # verify first, then copy
    assert out.host[5 : 5 + len(data)].tobytes() == data


def test_host_values_go_to_dram_and_replace_what_hbm_held(store: Any) -> None:
    store.put(b"k", _device(b"x" * 4096))
    store.put(b"k", b"y" * 100)
    st = store.stats()
    assert st["tiers"]["hbm"]["chunks"] == 0 and st["tiers"]["dram"]["chunks"] == 1
    out = FakeCudaArray(100)
    assert store.get_into(b"k", out) == 100 and out.tobytes() == b"y" * 100  # DRAM -> device
    store.put(b"k", _device(b"z" * 50))
    assert store.get(b"k") == b"z" * 50 and store.stats()["tiers"]["dram"]["chunks"] == 0
    assert store.remove(b"k") and not store.exists(b"k") and store.get(b"k") is None


def test_a_corrupt_hbm_chunk_is_a_miss_and_never_reaches_a_host_buffer(store: Any, dev: HostHbmDevice) -> None:
    data = _value(8 * KiB, 3)
    store.put(b"k", _device(data))
    view = store.device_view(b"k")
    addr = view.__cuda_array_interface__["data"][0]
    del view
    gc.collect()
    dev.poke(addr + 100, bytes([data[100] ^ 1]))
    out = bytearray(b"\xee" * len(data))
    assert store.get_into(b"k", out) is None
    assert out == b"\xee" * len(data)  # nothing copied off the device
    assert not store.exists(b"k")
    assert store.stats()["counters"]["corrupt.hbm"] == 1
    store.put(b"k2", _device(data))
    view = store.device_view(b"k2")
    addr = view.__cuda_array_interface__["data"][0]
    del view
    gc.collect()
    dev.poke(addr, bytes([data[0] ^ 0x80]))
    assert store.get_into(b"k2", FakeCudaArray(len(data))) is None  # device destination: a miss too
    assert store.device_view(b"k2") is None and store.stats()["counters"]["corrupt.hbm"] == 2


def test_demotion_moves_cold_chunks_to_dram_and_keeps_every_value(store: Any) -> None:
    values = {f"k{i}".encode(): _value(40 * KiB, 10 + i) for i in range(10)}  # 400 KiB > 256 KiB of HBM
    for k, v in values.items():
        store.put(k, _device(v))
    st = store.stats()
    assert st["counters"]["demotions.hbm"] >= 4
    assert st["tiers"]["hbm"]["used"] <= 0.9 * st["tiers"]["hbm"]["capacity"]
    assert st["tiers"]["dram"]["chunks"] == st["counters"]["demotions.hbm"]
    for k, v in values.items():
        out = FakeCudaArray(len(v))
        assert store.get_into(k, out) == len(v) and out.tobytes() == v
        assert store.get(k) == v
    hbm_keys = set(store._hbm.keys())
    assert b"k9" in hbm_keys and b"k0" not in hbm_keys  # the coldest went first


def test_pinned_chunks_stay_and_a_full_pinned_tier_says_no_space(store: Any) -> None:
    for i in range(5):
        store.put(f"p{i}".encode(), _device(_value(48 * KiB, i)), pin=True)
    assert store.stats()["counters"].get("demotions.hbm", 0) == 0
    with pytest.raises(NoSpace):
        store.put(b"more", _device(_value(40 * KiB)))
    with pytest.raises(NoSpace):  # a failed replacement keeps the old value
        store.put(b"p1", _device(_value(60 * KiB)))
    assert store.get(b"p1") == _value(48 * KiB, 1)
    assert store.unpin(b"p0")
    store.put(b"more", _device(_value(40 * KiB)))
    assert store._hbm.keys()[-1] == b"more" and not store._hbm.contains(b"p0")
    assert store.get(b"p0") == _value(48 * KiB, 0)  # demoted, not lost


def test_device_views_are_zero_copy_and_hold_their_bytes(store: Any) -> None:
    data = _value(30 * KiB, 4)
    store.put(b"k", _device(data))
    view = store.device_view(b"k")
    assert view.tobytes() == data
    used = store.stats()["tiers"]["hbm"]["used"]
    store.remove(b"k")
    for i in range(6):  # churn: the viewed extent must not be handed out again
        store.put(f"x{i}".encode(), _device(_value(30 * KiB, 50 + i)))
    assert view.tobytes() == data
    del view
    gc.collect()
    store.remove_batch([f"x{i}".encode() for i in range(6)])
    assert store.stats()["tiers"]["hbm"]["used"] == 0 < used
    assert store.device_view(b"absent") is None


_READER = r"""
import json, sys
from kvstore.testing.fake_cuda import FakeCudaArray, HostHbmDevice
from kvstore.tiers.hbm import DeviceChunk, read_exported
from kvstore.devmem import device_buffer
d = json.loads(sys.stdin.read())
chunk = DeviceChunk.from_dict({**d, "handle": d["handle"].encode(), "key": bytes.fromhex(d["key"])})
out = FakeCudaArray(chunk.size)
ok = read_exported(chunk, device_buffer(out), HostHbmDevice())
print(json.dumps({"ok": ok, "data": out.tobytes().hex() if ok else ""}))
"""


def _read_in_another_process(chunk: Any) -> dict[str, Any]:
    d = chunk.to_dict()
    d["handle"], d["key"] = d["handle"].decode(), d["key"].hex()
    res = subprocess.run([sys.executable, "-c", _READER], input=json.dumps(d), capture_output=True,
                         text=True, timeout=60, check=True)
    return dict(json.loads(res.stdout))


def test_exports_are_read_by_another_process_device_to_device(store: Any, dev: HostHbmDevice) -> None:
    data = _value(50 * KiB + 1, 5)
    store.put(b"k", _device(data))
    chunk = store.export(b"k")
    assert chunk is not None and chunk.size == len(data)
    got = _read_in_another_process(chunk)
    assert got["ok"] and bytes.fromhex(got["data"]) == data
    again = store.export(b"k")  # a second export of the same chunk
    store.remove(b"k")  # the exports hold the bytes until released
    assert _read_in_another_process(chunk)["ok"]
    store.release_export(again)
    assert store.stats()["tiers"]["hbm"]["used"] > 0
    store.release_export(chunk)
    assert store.stats()["tiers"]["hbm"]["used"] == 0
    with pytest.raises(KeyError):
        store.release_export(chunk)
    store.put(b"k", _device(data))
    chunk = store.export(b"k")
    dev.poke(store._hbm.arena.address + chunk.offset + 7, bytes([data[7] ^ 4]))
    assert _read_in_another_process(chunk) == {"ok": False, "data": ""}
    store.release_export(chunk)
    assert store.export(b"absent") is None


def test_bad_input_is_refused_before_anything_moves(store: Any, dev: HostHbmDevice) -> None:
    store.put(b"k", _device(b"a" * 1000))
    with pytest.raises(InvalidArgument):
        store.get_into(b"k", FakeCudaArray(999))
    with pytest.raises(InvalidArgument):
        store.get_into(b"k", FakeCudaArray(1000, readonly=True))
    with pytest.raises(InvalidArgument):
        store.put(b"big", _device(b"b" * (300 * KiB)))  # larger than the tier
    with pytest.raises(InvalidArgument):
        store.put(b"empty", FakeCudaArray(0))
    assert store.get(b"k") == b"a" * 1000


def test_config_checks_and_the_node_refuses_an_hbm_tier() -> None:
    with pytest.raises(ConfigError):
        StoreConfig(hbm="1KiB")
    with pytest.raises(ConfigError):
        StoreConfig(hbm_device=-1)
    from kvstore.config import NodeConfig
    from kvstore.node.daemon import StoreNode

    with pytest.raises(ConfigError, match="store.hbm"):
        StoreNode(NodeConfig(), StoreConfig(hbm="64MiB"))


def test_cuda_values_without_an_hbm_tier_are_copied_into_dram() -> None:
    copier = HostCopier()
    with LocalStore(dram="1MiB", prefault=False, device_copier=copier) as s:
        data = _value(5000, 7)
        s.put(b"k", _device(data))
        assert s.stats()["tiers"]["dram"]["chunks"] == 1 and s.get(b"k") == data
        out = FakeCudaArray(5000)
        assert s.get_into(b"k", out) == 5000 and out.tobytes() == data
        assert s.device_view(b"k") is None and s.export(b"k") is None
        assert copier.registered  # the arena was page-locked for the DMA


# -- on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 13, 4096, (3 << 20) + 5])
def test_gpu_kernel_sums_match_the_host_reference(n: int) -> None:
    import cupy as cp

    from kvstore.device_sum import finish, total
    from kvstore.devmem import device_buffer
    from kvstore.tiers.cuda_device import CudaHbmDevice

    d = CudaHbmDevice(0)
    data = _value(n, n)
    src = cp.asarray(np.frombuffer(data, np.uint8))
    dst = cp.zeros(n, dtype=cp.uint8)
    seed = key_seed(b"key")
    d.sum(device_buffer(src), seed)
    d.sum(device_buffer(src), seed, device_buffer(dst))
    a, b = d.wait()
    assert a == b == total(data, seed)
    assert finish(a, n, seed) == device_sum(data, b"key")
    assert cp.asnumpy(dst).tobytes() == data


@pytest.mark.gpu
def test_gpu_hbm_tier_end_to_end() -> None:
    import torch

    with LocalStore(dram="64MiB", hbm="32MiB", high_watermark=0.9, low_watermark=0.5, prefault=False) as s:
        vals = {f"k{i}".encode(): torch.randint(0, 255, (4 << 20,), dtype=torch.uint8, device="cuda")
                for i in range(12)}  # 48 MiB: some are demoted
        for k, v in vals.items():
            s.put(k, v)
        assert s.stats()["counters"]["demotions.hbm"] >= 4
        for k, v in vals.items():
            out = torch.empty_like(v)
            assert s.get_into(k, out) == v.numel() and torch.equal(out, v)
        view = s.device_view(b"k11")
        assert view is not None and bool((torch.as_tensor(view, device="cuda") == vals[b"k11"]).all())
        view[5] ^= 1  # corrupt it in place
        del view
        assert s.get_into(b"k11", torch.empty_like(vals[b"k11"])) is None
        assert s.stats()["counters"]["corrupt.hbm"] == 1


_GPU_READER = r"""
import json, sys
import torch
from kvstore.devmem import device_buffer
from kvstore.tiers.cuda_device import CudaHbmDevice
from kvstore.tiers.hbm import DeviceChunk, read_exported
d = json.loads(sys.stdin.read())
chunk = DeviceChunk.from_dict({**d, "handle": bytes.fromhex(d["handle"]), "key": bytes.fromhex(d["key"])})
out = torch.empty(chunk.size, dtype=torch.uint8, device="cuda")
ok = read_exported(chunk, device_buffer(out), CudaHbmDevice(0))
print(json.dumps({"ok": ok, "sum": int(out.to(torch.int64).sum()) if ok else -1}))
"""


@pytest.mark.gpu
def test_gpu_ipc_export_is_read_by_another_process() -> None:
    import torch

    with LocalStore(dram="16MiB", hbm="16MiB", prefault=False) as s:
        v = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda")
        s.put(b"k", v)
        chunk = s.export(b"k")
        d = chunk.to_dict()
        d["handle"], d["key"] = d["handle"].hex(), d["key"].hex()
        res = subprocess.run([sys.executable, "-c", _GPU_READER], input=json.dumps(d), capture_output=True,
                             text=True, timeout=120, check=True)
        got = json.loads(res.stdout)
        assert got["ok"] and got["sum"] == int(v.to(torch.int64).sum())
        s.release_export(chunk)


def test_concurrent_puts_reads_views_and_removes_never_serve_wrong_bytes(dev: HostHbmDevice) -> None:
    """Four threads put, read (device and host), view and remove overlapping keys while
    demotion runs: every hit has the bytes of one of the key's values, nothing else."""
    import threading

    values = {i: [_value(12 * KiB + 8 * v, 100 * i + v) for v in range(3)] for i in range(8)}
    errors: list[str] = []
    with LocalStore(dram="1MiB", hbm="128KiB", high_watermark=0.8, low_watermark=0.5, prefault=False,
                    hbm_device=dev, device_copier=HostCopier()) as s:

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(150):
                i, v = int(rng.integers(8)), int(rng.integers(3))
                key = b"c%d" % i
                op = int(rng.integers(5))
                if op == 0:
                    s.put(key, _device(values[i][v]))
                elif op == 1:
                    out = FakeCudaArray(16 * KiB)
                    got = s.get_into(key, out)
                    if got is not None and out.tobytes()[:got] not in values[i]:
                        errors.append(f"device read of {key!r}")
                elif op == 2:
                    got_b = s.get(key)
                    if got_b is not None and bytes(got_b) not in values[i]:
                        errors.append(f"host read of {key!r}")
                elif op == 3:
                    view = s.device_view(key)
                    if view is not None and view.tobytes() not in values[i]:
                        errors.append(f"view of {key!r}")
                else:
                    s.remove(key)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
        st = s.stats()
    assert errors == []
    assert st["counters"].get("corrupt.hbm", 0) == 0 and st["counters"]["demotions.hbm"] > 0


def test_racing_puts_of_one_key_in_both_tiers_never_lose_it(dev: HostHbmDevice) -> None:
    """A CUDA put (HBM, then the key dropped from DRAM) paused between its two steps while
    a host put of the same key (dropped from HBM, then put in DRAM) comes in: the host put
    waits for it, so the key ends with the host value, never in neither tier."""
    import threading

    with LocalStore(dram="1MiB", hbm="256KiB", prefault=False, hbm_device=dev, device_copier=HostCopier()) as s:
        host_done = threading.Event()
        real_remove = s._m.remove

        def slow_remove(k: bytes) -> bool:
            if threading.current_thread().name == "device-put":
                host_done.wait(1.0)  # the host put runs now, unless it has to wait for this one
            return real_remove(k)

        s._m.remove = slow_remove  # type: ignore[method-assign]
        device_put = threading.Thread(target=s.put, args=(b"k", _device(b"d" * 4096)), name="device-put")
        device_put.start()
        while not s._hbm.contains(b"k"):  # the device put is in its window
            pass

        def host_put() -> None:
            s.put(b"k", b"h" * 4096)
            host_done.set()

        host = threading.Thread(target=host_put)
        host.start()
        device_put.join()
        host.join()
        assert s.get(b"k") == b"h" * 4096
        tiers = s.stats()["tiers"]
        assert (tiers["hbm"]["chunks"], tiers["dram"]["chunks"]) == (0, 1)


def test_a_corrupt_dram_chunk_never_reaches_a_device_buffer() -> None:
    copier = HostCopier()
    with LocalStore(dram="1MiB", prefault=False, device_copier=copier) as s:
        s.put(b"k", b"v" * 5000)
        loc = s.location(b"k")
        assert loc is not None
        s.arena.buffer[loc[0] + 10] ^= 1
        out = FakeCudaArray(5000, fill=0xAB)
        assert s.get_into(b"k", out) is None
        assert out.tobytes() == bytes([0xAB]) * 5000 and copier.to_device_from == []
        c = s.stats()["counters"]
        assert c["corrupt.dram"] == 1 and c["misses.corrupt"] == 1 and not s.exists(b"k")
