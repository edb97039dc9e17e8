"""Random paged caches for the kernel tests (hypothesis strategies + builders)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from kvstore import kernels

# dtype name for the cache, NumPy stand-in holding its bytes
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
KV_PRESETS = [p for p in kernels.PRESETS if p != "mla"]


@dataclass
class Case:
    axes: str
    dtype: str
    layers: int
    num_blocks: int
    block_size: int
    heads: int
    head_dim: int
    storage_perm: tuple[int, ...]
    pad: int
    one_tensor: bool
    seed: int

    def logical_shape(self) -> tuple[int, ...]:
        size = {
            "kv": 2, "block": self.num_blocks, "token": self.block_size, "head": self.heads,
            "dim": self.head_dim, "kv*dim": 2 * self.head_dim, "layer": self.layers,
        }
        return tuple(size[a] for a in self.axes_list())

    def axes_list(self) -> list[str]:
        names = kernels.PRESETS.get(self.axes, self.axes).split()
        return (["layer"] + names) if self.one_tensor else names


def make_tensors(case: Case) -> list[np.ndarray]:
    """Arrays with the case's logical axes, stored in ``storage_perm`` order (+ padding)."""
    rng = np.random.default_rng(case.seed)
    shape = case.logical_shape()
    perm = list(case.storage_perm) + [len(shape) - 1]  # innermost (dim) stays last
    stored = [shape[p] for p in perm]
    stored[0] += case.pad  # padding along the outermost stored axis breaks density
    count = 1 if case.one_tensor else case.layers
    out = []
    for _ in range(count):
        raw = rng.integers(0, 256, size=int(np.prod(stored)) * np.dtype(DTYPES[case.dtype]).itemsize,
                           dtype=np.uint8)
        arr = raw.view(DTYPES[case.dtype]).reshape(stored)
        sl = tuple([slice(0, shape[perm[0]])] + [slice(None)] * (len(stored) - 1))
        arr = arr[sl]
        out.append(np.transpose(arr, np.argsort(perm)))
    return out


def build(case: Case) -> tuple[kernels.PagedCache, list[np.ndarray]]:
    tensors = make_tensors(case)
    axes = " ".join(case.axes_list())
    src = tensors[0] if case.one_tensor else tensors
    return kernels.paged_cache(src, axes, dtype=case.dtype), tensors


@st.composite
def cases(draw: st.DrawFn, max_blocks: int = 6) -> Case:
    mla = draw(st.integers(0, 4)) == 0
    axes = "mla" if mla else draw(st.sampled_from(KV_PRESETS))
    one_tensor = draw(st.booleans())
    n_axes = len(kernels.PRESETS[axes].split()) + (1 if one_tensor else 0)
    perm = tuple(draw(st.permutations(list(range(n_axes - 1)))))
    natural = draw(st.booleans())  # half the cases keep the engine's own (dense) order
    return Case(
        axes=axes,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        layers=draw(st.integers(1, 3)),
        num_blocks=draw(st.integers(1, max_blocks)),
        block_size=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        heads=1 if mla else draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from([1, 2, 8, 16, 64] if not mla else [4, 36, 72])),
        storage_perm=tuple(range(n_axes - 1)) if natural else perm,
        pad=draw(st.sampled_from([0, 0, 1])),
        one_tensor=one_tensor,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def id_lists(num_blocks: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, num_blocks - 1), min_size=1, max_size=6)
