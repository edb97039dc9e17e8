"""kvstore as SGLang's HiCache L3 backend: SGLang's own factory, config and host pools, a real pool.

Pages go through the zero-copy v1 calls (and the flat-page calls SGLang uses
without ``interface_v1``) between SGLang's real ``MHATokenToKVPoolHost`` /
``MLATokenToKVPoolHost`` (CPU, unpinned) and a real kvstore master + node.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pools
import pytest
import torch

from kvstore.client import Client
from kvstore.errors import ConfigError
from kvstore.testing.cluster import Cluster
from tests.connectors.conftest import corrupt_value

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("pool"), dram="256MiB")
    try:
        yield c.start(nodes=1)
    finally:
        c.stop()


def test_sglang_factory_loads_the_backend_in_a_fresh_process(cluster: Cluster) -> None:
    code = ("import sys, pools; h = pools.mha_host(); b = pools.backend(sys.argv[1], h); "
            "print(type(b).__module__, type(b).__name__, b.page_bytes)")
    out = subprocess.run([sys.executable, "-c", code, cluster.master_address], cwd=HERE, capture_output=True,
                         text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["connectors.sglang.backend", "KVStoreHiCacheStorage",
                                       str(pools.LAYERS * 2 * pools.HEADS * pools.DIM * 2 * pools.PAGE)]


@pytest.mark.parametrize("layout", ["page_first", "layer_first", "page_first_direct"])
def test_pages_round_trip_through_the_host_pool_zero_copy(cluster: Cluster, layout: str) -> None:
    host = pools.mha_host(layout)
    pools.fill(host, 1)
    be = pools.backend(cluster.master_address, host)
    ks = pools.keys(6, f"rt-{layout}")
    src = pools.pages(host, 6)
    assert be.batch_set_v1(ks, src) == [True] * 6
    assert be.batch_exists(ks) == 6
    dst = pools.pages(host, 6)
    assert be.batch_get_v1(ks, dst) == [True] * 6
    for i in range(6):
        assert pools.page_bytes(host, dst, i) == pools.page_bytes(host, src, i)
        assert torch.equal(host.get_data_page(int(dst[i * pools.PAGE])), host.get_data_page(int(src[i * pools.PAGE])))
    assert be.client.counters["hits"] >= 6
    stats = be.get_stats()
    assert sum(stats.prefetch_pgs) == 6 and sum(stats.backup_pgs) == 6
    be.close()


def test_hybrid_pools_v2_round_trip_and_hit_policies(cluster: Cluster) -> None:
    """A hybrid model's extra host pools (SGLang's real MambaPoolHost, a second KV-shaped
    pool as an indexer) through the v2 calls: pages round trip per pool, and
    batch_exists_v2 honours TRAILING_PAGES (every restorable prefix length) and ALL_PAGES."""
    from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer

    host = pools.mha_host()
    pools.fill(host, 5)
    be = pools.backend(cluster.master_address, host)
    mamba, indexer = pools.mamba_host(), pools.mha_host(layers=1)
    pools.fill(indexer, 6)
    be.register_mem_host_pool_v2(mamba, PoolName.MAMBA)
    be.register_mem_host_pool_v2(indexer, PoolName.INDEXER)
    ks = pools.keys(6, "hybrid")
    kv = pools.pages(host, 6)
    assert be.batch_set_v2([PoolTransfer(PoolName.KV, host_indices=kv, keys=ks)]) == {PoolName.KV: [True] * 6}
    states = mamba.alloc(2)
    idx = pools.pages(indexer, 3)
    got = be.batch_set_v2([PoolTransfer(PoolName.MAMBA, host_indices=states, keys=[ks[1], ks[4]]),
                           PoolTransfer(PoolName.INDEXER, host_indices=idx, keys=ks[:3])])
    assert got == {PoolName.MAMBA: [True, True], PoolName.INDEXER: [True] * 3}
    assert be.batch_set_v1(ks[:2], kv[:2 * pools.PAGE]) == [True, True]  # already there: still stored
    # the state after pages 2 and 5 exists: those prefixes are restorable, the longest wins
    trailing = PoolTransfer(PoolName.MAMBA, keys=[ks[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES)
    r = be.batch_exists_v2(ks, [trailing])
    assert (r.kv_hit_pages, r.restorable_prefix_pages, r.extra_pool_hit_pages) == \
        (5, [2, 5], {PoolName.KV: 6, PoolName.MAMBA: 5})
    every = PoolTransfer(PoolName.INDEXER, keys=ks, hit_policy=PoolHitPolicy.ALL_PAGES)
    r = be.batch_exists_v2(ks, [trailing, every])
    assert (r.kv_hit_pages, r.restorable_prefix_pages) == (2, [2])
    assert be.batch_exists_v2(pools.keys(3, "none"), [trailing]).kv_hit_pages == 0
    # pools never share keys: the states are not KV pages
    assert be.batch_exists([ks[1]]) == 1 and be.batch_exists(pools.keys(1, "hybrid-state")) == 0
    # read back into fresh slots, byte for byte
    states2, idx2 = mamba.alloc(2), pools.pages(indexer, 3)
    got = be.batch_get_v2([PoolTransfer(PoolName.MAMBA, host_indices=states2, keys=[ks[1], ks[4]]),
                           PoolTransfer(PoolName.INDEXER, host_indices=idx2, keys=ks[:3]),
                           PoolTransfer(PoolName.SWA, host_indices=states2, keys=[ks[0]])])
    assert got == {PoolName.MAMBA: [True, True], PoolName.INDEXER: [True] * 3, PoolName.SWA: [False]}
    for a, b in ((states, states2),):
        pa, sa = mamba.get_page_buffer_meta(a)
        pb_, sb = mamba.get_page_buffer_meta(b)
        assert [pools.host_bytes(int(p), int(n)).tobytes() for p, n in zip(pa, sa, strict=True)] == \
            [pools.host_bytes(int(p), int(n)).tobytes() for p, n in zip(pb_, sb, strict=True)]
    for i in range(3):
        assert pools.page_bytes(indexer, idx2, i) == pools.page_bytes(indexer, idx, i)
    be.close()


def test_batch_exists_counts_the_leading_pages_and_stops_at_a_hole(cluster: Cluster) -> None:
    host = pools.mha_host()
    pools.fill(host, 2)
    be = pools.backend(cluster.master_address, host)
    ks = pools.keys(5, "hole")
    idx = pools.pages(host, 5)
    stored = [0, 1, 3, 4]
    assert be.batch_set_v1([ks[i] for i in stored], torch.cat([idx[i * pools.PAGE:(i + 1) * pools.PAGE]
                                                              for i in stored])) == [True] * 4
    assert be.batch_exists(ks) == 2
    assert be.batch_exists(ks[3:]) == 2
    assert be.batch_exists([]) == 0
    got = be.batch_get_v1(ks, pools.pages(host, 5))
    assert got == [True, True, False, True, True]  # per page; SGLang uses the leading run
    be.close()


def test_another_process_with_the_same_model_hits_and_another_model_or_tp_layout_does_not(cluster: Cluster) -> None:
    host = pools.mha_host()
    pools.fill(host, 3)
    be = pools.backend(cluster.master_address, host)
    ks = pools.keys(4, "share")
    idx = pools.pages(host, 4)
    assert all(be.batch_set_v1(ks, idx))
    want = [hashlib.sha256(pools.page_bytes(host, idx, i)).hexdigest() for i in range(4)]

    def instance(model: str, tp_rank: int, tp_size: int) -> dict[str, object]:
        out = subprocess.run([sys.executable, str(HERE / "_instance.py"), cluster.master_address, model,
                              str(tp_rank), str(tp_size), "page_first", json.dumps(ks)],
                             capture_output=True, text=True, timeout=120, env=_env())
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    same = instance("tiny-llama", 0, 1)
    assert same["found"] == 4 and same["ok"] == [True] * 4 and same["pages"] == want
    for model, rank, size in (("other-model", 0, 1), ("tiny-llama", 0, 2), ("tiny-llama", 1, 2)):
        other = instance(model, rank, size)
        assert other["found"] == 0 and other["ok"] == [False] * 4, (model, rank, size)
    be.close()


def test_mla_pages_are_written_by_the_writer_rank_and_read_by_every_rank(cluster: Cluster) -> None:
    host = pools.mla_host()
    pools.fill(host, 4)
    reader = pools.backend(cluster.master_address, host, mla=True, tp_rank=1, tp_size=2)
    writer = pools.backend(cluster.master_address, host, mla=True, tp_rank=0, tp_size=2)
    assert not reader.is_writer and writer.is_writer
    ks = pools.keys(3, "mla")
    idx = pools.pages(host, 3)
    assert reader.batch_set_v1(ks, idx) == [True] * 3  # not the writer: stores nothing, says done
    assert reader.batch_exists(ks) == 0
    assert writer.batch_set_v1(ks, idx) == [True] * 3
    dst = pools.pages(host, 3)
    assert reader.batch_exists(ks) == 3 and reader.batch_get_v1(ks, dst) == [True] * 3
    assert all(pools.page_bytes(host, dst, i) == pools.page_bytes(host, idx, i) for i in range(3))
    for be in (reader, writer):
        be.close()


def test_flat_page_calls_without_interface_v1(cluster: Cluster) -> None:
    host = pools.mha_host()
    pools.fill(host, 5)
    be = pools.backend(cluster.master_address, host, interface_v1=False)
    ks = pools.keys(3, "flat")
    idx = pools.pages(host, 3)
    data = [host.get_data_page(int(idx[i * pools.PAGE])) for i in range(3)]
    assert be.batch_set(ks, data) is True
    assert be.batch_exists(ks) == 3 and be.exists(ks[0])
    got = be.batch_get(ks + pools.keys(1, "absent"), [host.get_dummy_flat_data_page() for _ in range(4)])
    assert got[3] is None
    assert all(torch.equal(g, d) for g, d in zip(got[:3], data, strict=True))
    be.close()


def test_a_corrupt_page_is_a_miss(cluster: Cluster) -> None:
    host = pools.mha_host()
    pools.fill(host, 6)
    be = pools.backend(cluster.master_address, host)
    ks = pools.keys(2, "corrupt")
    idx = pools.pages(host, 2)
    assert all(be.batch_set_v1(ks, idx))
    assert corrupt_value(cluster.nodes[0].pid, pools.page_bytes(host, idx, 1)) >= 1
    dst = pools.pages(host, 2)
    assert be.batch_get_v1(ks, dst) == [True, False]
    assert pools.page_bytes(host, dst, 0) == pools.page_bytes(host, idx, 0)
    with Client(cluster.master_address) as c:  # and the pool dropped it
        assert not c.exists(be._keys([ks[1]], "v1")[0])
    be.close()


def test_config_errors_name_the_key(cluster: Cluster) -> None:
    host = pools.mha_host()
    for extra, key in (({}, "master"), ({"master": "127.0.0.1:1", "timeout": "soon"}, "timeout"),
                       ({"master": "127.0.0.1:1", "token_file": "/nonexistent/t"}, "token_file")):
        with pytest.raises(ConfigError, match=key):
            from connectors.sglang import KVStoreHiCacheStorage

            KVStoreHiCacheStorage(pools.storage_config({**pools.EXTRA, **extra}), {})
    del host


def test_a_killed_node_turns_a_batch_into_misses_without_raising(tmp_path: Path) -> None:
    c = Cluster(tmp_path, dram="64MiB", node_ttl="3s").start(nodes=1)
    try:
        host = pools.mha_host()
        pools.fill(host, 7)
        be = pools.backend(c.master_address, host)
        ks = pools.keys(8, "kill")
        idx = pools.pages(host, 8)
        assert all(be.batch_set_v1(ks, idx))
        want = [pools.page_bytes(host, idx, i) for i in range(8)]
        bad: list[str] = []
        stop = threading.Event()

        def reader() -> None:  # batches in flight while the node dies
            dst = pools.pages(host, 8)
            while not stop.is_set():
                try:
                    got = be.batch_get_v1(ks, dst)
                except Exception as e:  # noqa: BLE001 - the test's finding
                    bad.append(repr(e))
                    return
                bad.extend(f"page {i}" for i in range(8) if got[i] and pools.page_bytes(host, dst, i) != want[i])

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)
        c.nodes[0].signal(signal.SIGKILL)
        c.nodes[0].popen.wait(10)  # gone (its memory may stay mapped here: never read again)
        time.sleep(0.3)
        stop.set()
        t.join(30)
        assert not bad
        assert be.batch_get_v1(ks, pools.pages(host, 8)) == [False] * 8
        assert be.batch_set_v1(pools.keys(2, "kill-more"), pools.pages(host, 2)) == [False, False]
        assert be.counters["errors"] >= 1 or be.batch_exists(ks) == 0
        be.close()
    finally:
        c.stop()


def _env() -> dict[str, str]:
    root, shims = str(HERE.parents[1]), str(HERE / "shims")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), root, shims, os.environ.get("PYTHONPATH", "")])}
