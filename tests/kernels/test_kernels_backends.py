"""Backend choice, the loud NumPy fallback, threads, fork, and the CUDA sources."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore import kernels
from kvstore.errors import KVStoreError
from kvstore.kernels import cpu

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
needs_native = pytest.mark.skipif(cpu.native() is None, reason=f"native build missing: {cpu.native_error()}")


def flash_cache(num_blocks: int = 64) -> kernels.PagedCache:
    data = np.random.default_rng(3).integers(0, 2**16, size=(4, 2, num_blocks, 16, 8, 64), dtype=np.uint16)
    return kernels.paged_cache(data, "layer kv block token head dim", dtype="float16")


@pytest.fixture
def missing_native() -> Iterator[None]:
    cpu._reset_for_tests(error="simulated: kvstore._native not built")
    try:
        yield
    finally:
        cpu._reset_for_tests()


def test_fallback_is_loud_and_counted(missing_native: None, caplog: pytest.LogCaptureFixture) -> None:
    cache = flash_cache(8)
    out = np.empty(kernels.chunk_nbytes(cache, 2), np.uint8)
    kernels._config["warned"] = 0
    before = kernels.stats()["fallback_calls"]
    with caplog.at_level(logging.WARNING, logger="kvstore.kernels"):
        kernels.gather(cache, [1, 2], out)
        kernels.scatter(cache, [1, 2], out)
    st = kernels.stats()
    assert st["fallback_calls"] == before + 2
    assert st["native_available"] is False and "simulated" in st["native_error"]
    assert any("NumPy reference" in r.getMessage() for r in caplog.records)
    with pytest.raises(KVStoreError, match="native"):
        kernels.gather(cache, [1], out, backend="native")


def test_explicit_numpy_backend_is_not_a_fallback() -> None:
    cache = flash_cache(8)
    out = np.empty(kernels.chunk_nbytes(cache, 1), np.uint8)
    before = kernels.stats()["fallback_calls"]
    kernels.gather(cache, [3], out, backend="numpy")
    assert kernels.stats()["fallback_calls"] == before


@needs_native
def test_stats_count_native_calls_and_bytes() -> None:
    cache = flash_cache(8)
    out = np.empty(kernels.chunk_nbytes(cache, 2), np.uint8)
    before = kernels.stats()
    kernels.gather(cache, [0, 1], out)
    after = kernels.stats()
    assert after["calls_native"] == before.get("calls_native", 0) + 1
    assert after["bytes_native"] == before.get("bytes_native", 0) + out.nbytes


@needs_native
def test_concurrent_callers_share_the_pool() -> None:
    cache = flash_cache()
    n = kernels.chunk_nbytes(cache, 16)
    want = np.empty(n, np.uint8)
    kernels.gather(cache, list(range(16)), want, backend="numpy")
    errors: list[str] = []

    def work(k: int) -> None:
        out = np.empty(n, np.uint8)
        for r in range(30):
            kernels.gather(cache, list(range(16)), out, threads=1 + (k + r) % 3)
            if not np.array_equal(out, want):
                errors.append(f"thread {k} round {r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_works_after_fork() -> None:
    cache = flash_cache()
    out = np.empty(kernels.chunk_nbytes(cache, 16), np.uint8)
    kernels.gather(cache, list(range(16)), out, threads=2)  # parent pool has workers now
    pid = os.fork()
    if pid == 0:  # child: a fresh pool, not the parent's dead threads
        code = 1
        try:
            again = np.empty_like(out)
            kernels.gather(cache, list(range(16)), again, threads=2)
            code = 0 if np.array_equal(again, out) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("backend_missing", [False, True])
def test_copy_matches(backend_missing: bool) -> None:
    if backend_missing:
        cpu._reset_for_tests(error="simulated")
    try:
        src = np.random.default_rng(4).integers(0, 256, 3 << 20, dtype=np.uint8)
        dst = np.zeros(src.nbytes + 5, np.uint8)
        assert kernels.copy(dst, src, threads=2) == src.nbytes
        assert np.array_equal(dst[: src.nbytes], src) and not dst[src.nbytes :].any()
    finally:
        cpu._reset_for_tests()


@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(source: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: CUDA sources are compiled at run time by NVRTC only")
    res = subprocess.run(
        [nvcc, "-ptx", "-std=c++17", "-arch=compute_80", "-Werror", "all-warnings",
         str(source), "-o", str(tmp_path / "out.ptx")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    ptx = (tmp_path / "out.ptx").read_text()
    entries = {"paged_copy.cu": [f"kvs_paged_copy_v{v}" for v in (16, 8, 4, 2, 1)],
               "device_sum.cu": ["kvs_dsum", "kvs_dsum_copy"]}[source.name]
    for name in entries:
        assert f".entry {name}(" in ptx


def test_cuda_source_is_found() -> None:
    from kvstore.kernels import cuda  # imports no CuPy until a GPU cache is used

    assert cuda.source_path().name == "paged_copy.cu"
