"""Layer-pipelined loads into a paged KV cache on a GPU: transfer overlaps compute.

A load of ``L`` layers queues, for each layer, the copy of that layer's chunk bytes
to the GPU (from pinned host memory: the pool's page-locked arena, or a pinned
staging buffer) and the scatter kernel that puts them into the engine's blocks,
on a side stream of its own, and records a CUDA event per layer. The forward pass
calls :meth:`LayerLoad.wait` before attention of layer ``l``: its stream waits on
the device for layer ``l``'s event (the host never blocks), so the transfer of the
later layers runs while the earlier layers compute::

    load = LayerLoad(cache, block_ids, chunks_by_layer)   # queued, returns at once
    for l in range(num_layers):
        load.wait(l)                                      # on torch's current stream
        ...attention of layer l...

Each layer is one copy and one kernel launch for every block of the load, however
many chunks or requests they came from, prepared once (:func:`kvstore.kernels.prepare_layers`):
the host cost per layer is one copy call and one launch, whatever the number of blocks. Needs torch with CUDA (the engines' framework); the caches are torch
CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore import kernels
from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.kernels.paged import ChunkFormat, PagedCache


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency of every engine
        raise KVStoreError(f"layer-pipelined loads need torch with CUDA ({e})") from e
    return torch


class LayerLoad:
    """A queued layer-by-layer load; see the module docstring.

    ``chunks``: one host buffer per layer (``chunk_nbytes`` of one layer each: the
    bytes of ``layer_range(l)`` of every chunk, back to back), page-locked for the
    copy to overlap (pageable memory works, without overlap). ``staging``: a device
    ``uint8`` tensor of at least one layer's bytes per layer in flight (made when
    not given).
    """

    def __init__(self, cache: PagedCache, block_ids: Any, chunks: Sequence[Any], *, fmt: ChunkFormat = "canonical",
                 num_tokens: int | None = None, stream: Any = None, staging: Any = None) -> None:
        torch = self._torch = _torch()
        if cache.device != "cuda" or not any(isinstance(o, torch.Tensor) and o.is_cuda for o in cache.owners):
            raise InvalidArgument("LayerLoad needs a paged cache of torch CUDA tensors")
        if len(chunks) != cache.num_layers:
            raise InvalidArgument(f"{len(chunks)} layer buffers for a cache of {cache.num_layers} layers")
        dev = self._device = torch.device("cuda", cache.device_id)
        copy = kernels.prepare_layers(cache, block_ids, scatter=True, fmt=fmt, num_tokens=num_tokens)
        per_layer = copy.layer_bytes
        self.stream = stream if stream is not None else torch.cuda.Stream(device=dev)
        if staging is None:
            staging = torch.empty(cache.num_layers * per_layer, dtype=torch.uint8, device=dev)
        if staging.numel() < cache.num_layers * per_layer:
            raise InvalidArgument(f"staging holds {staging.numel()} bytes, the load needs "
                                  f"{cache.num_layers * per_layer}")
        self.events = []
        caller = torch.cuda.current_stream(dev)
        self.stream.wait_stream(caller)  # the cache's blocks are free to overwrite as of now
        with torch.cuda.stream(self.stream):
            for layer, host in enumerate(chunks):
                src = torch.as_tensor(host).view(torch.uint8).reshape(-1) if not isinstance(host, torch.Tensor) \
                    else host.view(torch.uint8).reshape(-1)
                if src.numel() != per_layer:
                    raise InvalidArgument(f"layer {layer}: {src.numel()} bytes, one layer of this load is {per_layer}")
                dst = staging[layer * per_layer : (layer + 1) * per_layer]
                dst.copy_(src, non_blocking=True)
                copy(layer, dst)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self.events.append(ev)
        self._staging = staging
        self._sources = list(chunks)  # kept alive until the copies ran

    def wait(self, layer: int) -> None:
        """Make the caller's current stream wait (on the device) for layer ``layer``."""
        self._torch.cuda.current_stream(self._device).wait_event(self.events[layer])

    def done(self) -> bool:
        """Whether every layer has landed (polls, never blocks)."""
        return all(ev.query() for ev in self.events)

    def synchronize(self) -> None:
        """Block the host until every layer has landed."""
        self.events[-1].synchronize()
