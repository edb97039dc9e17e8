"""Fixtures for the transport suites: a peer transport in a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from transport.base import Peer, Transport
from transport.regions import RemoteRegion
from transport.registry import create

ROOT = Path(__file__).resolve().parents[2]
PEER_BYTES = 260 << 20


def _ucx_available() -> bool:
    try:
        import ucxx  # noqa: F401, PLC0415
    except ImportError:
        return False
    return (ROOT / "transport" / "ucx" / "transport.py").exists()


BACKENDS = [
    pytest.param("tcp://127.0.0.1:0", id="tcp"),
    pytest.param("shm://", id="shm"),
    pytest.param(
        "ucx://127.0.0.1:0",
        id="ucx",
        marks=[
            pytest.mark.ucx,
            pytest.mark.skipif(not _ucx_available(), reason="ucxx is not installed (pip install 'kvstore[ucx]')"),
        ],
    ),
]


class PeerProcess:
    """The peer process, its metadata and its region; commands go over stdin."""

    def __init__(self, uri: str, nbytes: int = PEER_BYTES) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "transport" / "peer.py"), uri, str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        line = self._line().split()
        if not line:
            raise RuntimeError(f"peer for {uri} failed to start (rc={self.proc.poll()})")
        self.metadata = bytes.fromhex(line[0])
        self.region = RemoteRegion.from_bytes(bytes.fromhex(line[1]))
        self.nbytes = nbytes

    def cmd(self, *args: object) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(str(a) for a in args) + "\n")
        self.proc.stdin.flush()
        return self._line().strip()

    def _line(self) -> str:
        """Next reply line; UCX prints its warnings to stdout, skip them."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line or not (line.startswith("[") and "UCX" in line):
                return line

    def sum(self, off: int, n: int) -> int:
        return int(self.cmd("sum", off, n))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Transport, Peer, PeerProcess]]:
    """(local transport, connected peer, peer process) for each backend, per module."""
    uri: str = request.param
    proc = PeerProcess(uri)
    t = create(uri)
    try:
        peer = t.connect(proc.metadata, timeout=20)
        yield t, peer, proc
    finally:
        t.close()
        proc.stop()


def pattern(n: int, salt: int = 0) -> np.ndarray:
    return np.resize((np.arange(251, dtype=np.uint8) + salt).astype(np.uint8), n)


@pytest.fixture(params=BACKENDS)
def spawn(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[PeerProcess]]]:
    """(backend URI, list to append spawned peers to); every peer is stopped at teardown."""
    procs: list[PeerProcess] = []
    yield request.param, procs
    for p in procs:
        p.kill()
