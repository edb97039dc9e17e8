"""The pool's commands as a user runs them: kvstore up, demo, status, then Ctrl-C."""

import signal
import subprocess
import time

import pytest

from kvstore.testing.cluster import CLI, free_port

pytestmark = pytest.mark.timeout(120)


def test_up_demo_status_and_clean_shutdown(tmp_path):
    port = free_port()
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                           "--dram", "128MiB", "--disk", "64MiB"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = up.stdout.readline()
        assert f"master 127.0.0.1:{port}" in first, first
        master = f"127.0.0.1:{port}"
        demo = subprocess.run([*CLI, "demo", "--master", master, "--chunks", "32", "--size", "256KiB"],
                              capture_output=True, text=True, timeout=60)
        assert demo.returncode == 0, demo.stderr
        assert "32/32 byte-identical (path: shm)" in demo.stdout
        demo_tcp = subprocess.run([*CLI, "demo", "--master", master, "--chunks", "8", "--tcp"],
                                  capture_output=True, text=True, timeout=60)
        assert demo_tcp.returncode == 0 and "(path: tcp)" in demo_tcp.stdout, demo_tcp.stderr
        status = subprocess.run([*CLI, "status", "--master", master], capture_output=True, text=True,
                                timeout=30)
        assert status.returncode == 0, status.stderr
        assert "1 node(s)" in status.stdout and "local" in status.stdout and "dram" in status.stdout
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=30)
    assert up.returncode == 0, out
    assert "kvstore stopped" in out


def test_status_against_nothing_is_one_clear_line():
    r = subprocess.run([*CLI, "status", "--master", f"127.0.0.1:{free_port()}", "--timeout", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_node_refuses_bad_config(tmp_path):
    t = time.monotonic()
    r = subprocess.run([*CLI, "node", "--dram", "lots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "store.dram" in r.stderr
    assert time.monotonic() - t < 30
