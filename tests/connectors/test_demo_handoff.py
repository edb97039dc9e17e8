"""`kvstore demo --handoff` as a user runs it: prefill in one process, decode in another."""

import subprocess

import pytest

from kvstore.testing.cluster import CLI, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_demo_handoff_is_token_identical(tmp_path):
    pytest.importorskip("transformers", reason="needs the hf extra (transformers, torch)")
    with Cluster(tmp_path / "c", dram="64MiB").start(nodes=1) as cl:
        r = subprocess.run([*CLI, "demo", "--master", cl.master_address, "--handoff", "--prompt-tokens", "200"],
                           capture_output=True, text=True, timeout=280, env=cl.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "192 prompt tokens loaded from the store" in r.stdout
    assert "token-identical to the single-process run" in r.stdout


@pytest.mark.gpu
def test_demo_handoff_on_the_gpu_is_token_identical(tmp_path):
    with Cluster(tmp_path / "c", dram="64MiB").start(nodes=1) as cl:
        r = subprocess.run([*CLI, "demo", "--master", cl.master_address, "--handoff", "--prompt-tokens", "200",
                            "--device", "cuda"], capture_output=True, text=True, timeout=280, env=cl.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "device:                  cuda" in r.stdout
    assert "token-identical to the single-process run" in r.stdout
