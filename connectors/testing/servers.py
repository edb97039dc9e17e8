"""vLLM OpenAI servers (and the proxy) as child processes, for the tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from connectors.testing.engine import ENGINE_ENV, ROOT


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``args`` in its own session (so :func:`stop` ends its children too), output to ``log``."""
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env=env or {**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
                            start_new_session=True)


def vllm_server(model: Path, port: int, log: Path, kv: dict[str, Any] | None, *extra: str,
                max_model_len: int = 1024) -> subprocess.Popen[bytes]:
    """``vllm.entrypoints.openai.api_server`` on 127.0.0.1 (CPU, float32, eager, 32-token
    blocks), with the KV transfer config ``kv`` (None: no connector) and ``extra`` flags."""
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # servers run the engine core in its own process
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--block-size", "32", "--max-model-len", str(max_model_len), "--seed", "0", *extra]
    if kv is not None:
        args += ["--kv-transfer-config", json.dumps(kv)]
    return start(args, log, env)


def wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> None:
    """Until ``url`` answers 200; RuntimeError if one of ``procs`` exits meanwhile."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a server exited with {p.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not ready in {timeout}s")


def post(url: str, body: dict[str, Any], timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return bytes(r.read())


def stop(p: subprocess.Popen[bytes]) -> None:
    """SIGTERM its session, SIGKILL after 30 s."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
