"""A host-memory stand-in for :mod:`connectors.vllm.gpu`, for unit tests of the vLLM
worker's CUDA path on machines without a GPU (the real module runs in the tests
marked ``gpu`` and in benchmarks/gpu_check.py).

Same interface; the "device" work runs at once on a host cache with the CPU kernels
(a gather per layer over every block of the step, a scatter per layer), and
``calls`` records what the worker asked for, in order, so a test can check the
plumbing: one batched gather per layer, waits before stores, staging settled
before reuse, the compute stream made to wait per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore import kernels

calls: list[tuple[Any, ...]] = []


class _Event:
    def __init__(self, what: tuple[Any, ...]) -> None:
        self.what = what


class GpuSaves:
    def __init__(self, cache: kernels.PagedCache, block_ids: Sequence[int], stream: Any) -> None:
        self.cache, self.ids = cache, list(block_ids)
        n = kernels.chunk_nbytes(cache, len(self.ids), fmt="raw") // cache.num_layers
        self.host = np.zeros((cache.num_layers, n), np.uint8)
        self.last: Any = None
        calls.append(("saves", tuple(self.ids)))

    def layer(self, layer: int) -> None:
        kernels.gather(self.cache, self.ids, self.host[layer], layer=layer, whole_chunk=False, fmt="raw")
        self.last = _Event(("gathered", layer))
        calls.append(("gather", layer, len(self.ids)))

    def wait(self) -> None:
        calls.append(("save_wait",))


class GpuLoads:
    def __init__(self, device_id: int) -> None:
        self._staging: np.ndarray | None = None
        self.pending: Any = None

    def staging(self, nbytes: int) -> np.ndarray:
        self.settle()
        if self._staging is None or len(self._staging) < nbytes:
            self._staging = np.empty(nbytes, np.uint8)
        return self._staging

    @property
    def buffer(self) -> Any:
        return self._staging

    def scatter(self, cache: kernels.PagedCache, block_ids: Sequence[int], chunk: Any, layer: int,
                after: Any = None, positions: Sequence[int] | None = None) -> Any:
        calls.append(("scatter", layer, tuple(block_ids), after is not None))
        kernels.scatter(cache, list(block_ids), chunk, layer=layer, whole_chunk=False, fmt="raw", positions=positions)
        self.pending = _Event(("scattered", layer))
        return self.pending

    def settle(self) -> None:
        calls.append(("settle",))
        self.pending = None


def record_current(device_id: int) -> Any:
    return _Event(("compute",))


def side_stream(device_id: int) -> Any:
    return None


def wait_on_device(event: Any, device_id: int) -> None:
    calls.append(("device_wait", event.what))
