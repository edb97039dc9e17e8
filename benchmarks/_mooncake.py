"""Mooncake Store as a peer of kvstore in benchmarks/store.py.

Everything comes from the ``mooncake-transfer-engine-non-cuda`` wheel
(``pip install mooncake-transfer-engine-non-cuda``) and runs on loopback:

* ``mooncake_master`` serves its RPC and its metrics page on 127.0.0.1 (free ports).
  There is no etcd and no HTTP metadata server: peers exchange segment
  descriptors by P2P handshake (``metadata_server="P2PHANDSHAKE"``).
* ``mooncake_client``, Mooncake's standalone store process, mounts the pool's
  memory (``pool_bytes``, 2 GiB like ``kvstore up --dram 2GiB``). The benchmark
  clients mount none, so every put and get crosses loopback TCP, as kvstore's TCP
  path does. With ``pool_bytes=0`` each client mounts its own segment instead
  (Mooncake's embedded mode); a client then reads the values it holds itself
  with a memcpy, and values held by a client that has closed are gone.
* Transfers use the ``tcp`` protocol; each client registers one source and one
  destination buffer and calls ``put_from``/``get_into`` on them (zero-copy: no
  staging through Mooncake's local buffer, no new Python objects per value).

Every process advertises 127.0.0.1 (``MC_TCP_BIND_ADDRESS``), so all traffic stays
on loopback, but the transfer engine's handshake and data listeners bind the
wildcard address whatever it is told (hard-coded in Mooncake).
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

LOOPBACK = "127.0.0.1"
MiB = 1 << 20
INSTALL = "pip install mooncake-transfer-engine-non-cuda"


def _binary(name: str) -> str:
    """A program shipped inside the mooncake package (or, failing that, on PATH)."""
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise ImportError(f"Mooncake Store is not installed ({name} not found): {INSTALL}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _capacity(metrics_port: int) -> int:
    """Bytes of memory mounted in the pool, from the master's Prometheus page."""
    conn = http.client.HTTPConnection(LOOPBACK, metrics_port, timeout=2)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("master_total_capacity_bytes "):
            return int(float(line.split()[1]))
    return 0


def _wait(ready: Callable[[], bool], procs: list[tuple[subprocess.Popen[bytes], Path]], what: str,
          timeout: float = 30) -> None:
    """Poll ``ready()`` until it is true; fail early if one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with {proc.returncode} "
                                   f"before {what}; {log}:\n{_tail(log)}")
        try:
            if ready():
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    proc, log = procs[-1]
    raise RuntimeError(f"timed out waiting for {what}; {log}:\n{_tail(log)}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def start_master(tmp: Path, pool_bytes: int = 2 << 30) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start ``mooncake_master`` (and, if ``pool_bytes``, a store process) on loopback.

    Both run in a new process group, the master's (a new session could not hold the
    store process too), so ``os.killpg(proc.pid, SIGTERM)`` on the returned process
    stops them. Logs: ``tmp/mooncake_master.log``,
    ``tmp/mooncake_store.log`` and ``tmp/mooncake_client_<pid>.log`` (benchmark clients).
    Returns the master process and the JSON-serializable settings ``worker`` needs.
    """
    master_bin, store_bin = _binary("mooncake_master"), _binary("mooncake_client")
    tmp.mkdir(parents=True, exist_ok=True)
    rpc_port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "MC_TCP_BIND_ADDRESS": LOOPBACK}
    master_log = tmp / "mooncake_master.log"
    with open(master_log, "wb") as out:
        master = subprocess.Popen(
            [master_bin, f"--rpc_address={LOOPBACK}", f"--rpc_port={rpc_port}",
             f"--metrics_host={LOOPBACK}", f"--metrics_port={metrics_port}",
             "--enable_http_metadata_server=false", "--rpc_thread_num=4"],
            stdout=out, stderr=subprocess.STDOUT, env=env, process_group=0)
    settings: dict[str, Any] = {
        "master_server_addr": f"{LOOPBACK}:{rpc_port}",
        "metadata_server": "P2PHANDSHAKE",
        "protocol": "tcp",
        "pool_bytes": pool_bytes,
        "log_dir": str(tmp),
    }
    procs = [(master, master_log)]
    try:
        _wait(lambda: _port_open(rpc_port) and _port_open(metrics_port), procs, "the master's ports")
        if pool_bytes:
            store_log = tmp / "mooncake_store.log"
            with open(store_log, "wb") as out:
                store = subprocess.Popen(
                    [store_bin, f"--host={LOOPBACK}", f"--port={_free_port()}",
                     f"--master_server_address={settings['master_server_addr']}",
                     "--metadata_server=P2PHANDSHAKE", "--protocol=tcp",
                     f"--global_segment_size={pool_bytes}", "--local_buffer_size=0"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, process_group=master.pid)
            procs.append((store, store_log))
            _wait(lambda: _capacity(metrics_port) >= pool_bytes, procs,
                  f"the store process to mount {pool_bytes} bytes")
    except BaseException:
        os.killpg(master.pid, 15)
        master.wait(10)
        raise
    return master, settings


@contextmanager
def _stderr_to(log: Path) -> Iterator[None]:
    """Send this process's fd 2 (glog writes there) to ``log`` for the duration."""
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"Mooncake {what} failed: error {rc}")


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """In a spawned client process: put ``n`` values, then read each back ``rounds`` times.

    Times each ``put_from`` and each ``get_into`` call; the values come from the
    registered source buffer and land in the registered destination buffer.
    """
    size, n, rounds, prefix = task["size"], task["n"], task["rounds"], task["prefix"]
    cfg = task["mooncake"]
    os.environ["MC_TCP_BIND_ADDRESS"] = LOOPBACK
    from mooncake.store import MooncakeDistributedStore

    value = np.random.default_rng(task["seed"]).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    src_ptr, dst_ptr = value.ctypes.data, dst.ctypes.data
    keys = [f"{prefix}-{i}" for i in range(n)]
    # Without a store process each client mounts room for its own values, twice over:
    # the master may place another client's values here too.
    segment = 0 if cfg["pool_bytes"] else 2 * n * size + 64 * MiB
    log = Path(cfg["log_dir"]) / f"mooncake_client_{os.getpid()}.log"
    puts: list[float] = []
    gets: list[float] = []
    try:
        with _stderr_to(log):
            store = MooncakeDistributedStore()
            try:
                _ok(store.setup(LOOPBACK, cfg["metadata_server"], segment, 0, cfg["protocol"], "",
                                cfg["master_server_addr"]), "setup")
                for buf in (value, dst):
                    _ok(store.register_buffer(buf.ctypes.data, size), "register_buffer")
                # steady state: connections up before anything is timed (as for every system)
                _ok(store.put_from(f"{prefix}-warm", src_ptr, size), "put_from(warm-up)")
                if store.get_into(f"{prefix}-warm", dst_ptr, size) != size:
                    raise RuntimeError("Mooncake warm-up get_into missed")
                for k in keys:
                    t = time.perf_counter()
                    rc = store.put_from(k, src_ptr, size)
                    puts.append(time.perf_counter() - t)
                    _ok(rc, f"put_from({k!r})")
                start = time.perf_counter()
                for _ in range(rounds):
                    for k in keys:
                        t = time.perf_counter()
                        got = store.get_into(k, dst_ptr, size)
                        gets.append(time.perf_counter() - t)
                        if got != size:  # a benchmark that silently missed would measure nothing
                            raise AssertionError(f"mooncake get_into({k!r}) read {got}, not {size}")
                wall = time.perf_counter() - start
                dst[:] = 0
                got = store.get_into(keys[0], dst_ptr, size)
                if got != size or not np.array_equal(dst, value):
                    raise AssertionError(f"mooncake get_into({keys[0]!r}) returned wrong bytes")
                for k in [*keys, f"{prefix}-warm"]:  # force: a get leaves a lease (10 s) that refuses a plain remove
                    _ok(store.remove(k, True), f"remove({k!r})")
                for buf in (value, dst):
                    _ok(store.unregister_buffer(buf.ctypes.data), "unregister_buffer")
            finally:
                store.close()
    except BaseException as e:
        e.add_note(f"{log}:\n{_tail(log)}")
        raise
    return {"puts": puts, "gets": gets, "get_wall": wall, "get_bytes": size * len(gets), "get_into": gets}
