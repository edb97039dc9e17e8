"""A throwaway single-member etcd on loopback (Debian ``etcd-server``), for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from kvstore.testing.cluster import free_port


def etcd_binary() -> str | None:
    return shutil.which("etcd")


class EtcdServer:
    """``with EtcdServer() as etcd: etcd.endpoint`` -> ``"127.0.0.1:PORT"`` (``host``: bind
    another address of this namespace); its data dir is temporary, its log is
    ``etcd.log``. Raises RuntimeError if etcd is missing or fails."""

    def __init__(self, data_dir: Path | None = None, host: str = "127.0.0.1") -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server; `make install` does)")
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvstore-etcd-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port, peer = free_port(), free_port()
        self.endpoint = f"{host}:{self.port}"
        self.log = self.data_dir / "etcd.log"
        client, peer_url = f"http://{self.endpoint}", f"http://{host}:{peer}"
        self._cmd = [binary, "--name", "kv", "--data-dir", str(self.data_dir / "data"),
                     "--listen-client-urls", client, "--advertise-client-urls", client,
                     "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                     "--initial-cluster", f"kv={peer_url}", "--logger", "zap", "--log-outputs", "stderr"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> EtcdServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self._cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        from aetcd.rpc import RangeRequest, rpc_pb2_grpc

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}); see {self.log}")
            with grpc.insecure_channel(self.endpoint) as ch:
                try:
                    rpc_pb2_grpc.KVStub(ch).Range(RangeRequest(key=b"/health"), timeout=1)
                    return self
                except grpc.RpcError:
                    time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not answer within {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
