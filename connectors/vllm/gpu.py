"""The vLLM worker's CUDA path: saves and loads on side streams, ordered by CUDA events,
so the forward pass never waits on the host for them.

**Saves.** At :meth:`GpuSaves.layer` (after attention of layer ``l``, on the
model-runner thread) the save stream waits on the device for the compute stream,
gathers layer ``l`` of *every* block the step saves in one kernel launch (prepared
once per step: :func:`kvstore.kernels.prepare_layers`) into a device buffer of one
layer, copies it into page-locked host memory and records an event. The host does
not wait; the save thread synchronizes the step's last event before it stores.

**Loads.** The loader thread fetches a group of layers of every request of the
step into device staging (the client DMAs them from the pool: docs/gpu.md), then
launches one scatter per layer for the blocks of all of them (each read from its
slot of the staging: ``positions``) on the load stream and records an event; ``wait_for_layer_load``
makes the compute stream wait for that event (on the device, not the host).
Before the next group reuses the staging, the loader thread waits for the
previous group's scatters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore import kernels


def _torch() -> Any:
    import torch

    return torch


class GpuSaves:
    """One step's saves of a CUDA cache: every block of ``block_ids`` (the saves' blocks
    back to back), layer by layer; :attr:`host` is ``[layer][block]`` in pinned memory."""

    def __init__(self, cache: kernels.PagedCache, block_ids: Sequence[int], stream: Any) -> None:
        torch = self._torch = _torch()
        self.device = torch.device("cuda", cache.device_id)
        self.copy = kernels.prepare_layers(cache, list(block_ids), scatter=False, fmt="raw")
        n = self.copy.layer_bytes
        self.stream = stream
        self._dev = torch.empty(n, dtype=torch.uint8, device=self.device)  # one layer; reused in stream order
        self.pinned = torch.empty(cache.num_layers * n, dtype=torch.uint8, pin_memory=True)
        self.host: np.ndarray = self.pinned.numpy().reshape(cache.num_layers, n)
        self.last: Any = None

    def layer(self, layer: int) -> None:
        """Queue the gather and the copy to the host of ``layer``; returns at once."""
        torch = self._torch
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the layer's KV is written
        with torch.cuda.stream(self.stream):
            self.copy(layer, self._dev)
            n = self.copy.layer_bytes
            self.pinned[layer * n : (layer + 1) * n].copy_(self._dev, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.last = ev

    def wait(self) -> None:
        """Block until every queued layer is in :attr:`host` (the save thread calls this)."""
        if self.last is not None:
            self.last.synchronize()


class GpuLoads:
    """Device staging and the load stream of one loader thread."""

    def __init__(self, device_id: int) -> None:
        torch = self._torch = _torch()
        self.device = torch.device("cuda", device_id)
        self.stream = side_stream(device_id)
        self._staging: Any = None
        self.pending: Any = None  # the last scatter's event

    def staging(self, nbytes: int) -> Any:
        """A CUDA ``uint8`` buffer of at least ``nbytes`` (grown, never shrunk), free to
        overwrite: the scatters that read it before have run."""
        self.settle()
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self.device)
        return self._staging

    @property
    def buffer(self) -> Any:
        """The whole staging buffer (chunk positions count from its start)."""
        return self._staging

    def scatter(self, cache: kernels.PagedCache, block_ids: Sequence[int], chunk: Any, layer: int,
                after: Any = None, positions: Sequence[int] | None = None) -> Any:
        """Queue layer ``layer``'s scatter from ``chunk`` (device memory; block ``i`` at slot
        ``positions[i]``) on the load stream, behind ``after`` (an event) when given;
        returns its event."""
        torch = self._torch
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            kernels.scatter(cache, block_ids, chunk, layer=layer, whole_chunk=False, fmt="raw", positions=positions)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.pending = ev
        return ev

    def settle(self) -> None:
        """Wait (host) for the scatters queued so far."""
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None


def record_current(device_id: int) -> Any:
    """An event recorded now on the caller's current stream of device ``device_id``."""
    torch = _torch()
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(torch.device("cuda", device_id)))
    return ev


def side_stream(device_id: int) -> Any:
    """A CUDA stream of the connector's own on device ``device_id``."""
    torch = _torch()
    return torch.cuda.Stream(torch.device("cuda", device_id))


def wait_on_device(event: Any, device_id: int) -> None:
    """Make the caller's current stream wait for ``event`` (the host does not block)."""
    torch = _torch()
    torch.cuda.current_stream(torch.device("cuda", device_id)).wait_event(event)
