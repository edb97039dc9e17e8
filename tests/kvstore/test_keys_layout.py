import hashlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore import InvalidArgument, KVLayout, Namespace, chunk_keys

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float16", chunk_tokens=16)
NS = Namespace(model="tiny-llama", layout=LAYOUT)

tokens_st = st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=100)


def test_chain_definition_matches_design():
    toks = list(range(40))
    keys = chunk_keys(NS, toks)
    assert len(keys) == 2  # partial last chunk has no key by default
    k0 = hashlib.sha256(NS.root() + np.arange(16, dtype="<u4").tobytes()).digest()
    k1 = hashlib.sha256(k0 + np.arange(16, 32, dtype="<u4").tobytes()).digest()
    assert keys == [k0, k1]


@given(tokens_st, tokens_st)
def test_shared_prefix_shares_keys(a, b):
    ka, kb = chunk_keys(NS, a), chunk_keys(NS, b)
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    full = common // 16
    assert ka[:full] == kb[:full]
    # The first chunk that differs and every later one differ.
    for i in range(full, min(len(ka), len(kb))):
        assert ka[i] != kb[i]


@pytest.mark.parametrize(
    "other",
    [
        Namespace(model="tiny-llama-2", layout=LAYOUT),
        Namespace(model="tiny-llama", layout=KVLayout(4, 2, 8, "float32", 16)),
        Namespace(model="tiny-llama", layout=LAYOUT, tp_rank=1, tp_size=2),
        Namespace(model="tiny-llama", layout=LAYOUT, tp_rank=0, tp_size=2),
        Namespace(model="tiny-llama", layout=LAYOUT, cache_salt="tenant-b"),
    ],
)
def test_any_namespace_difference_gives_disjoint_keys(other):
    toks = list(range(64))
    assert not set(chunk_keys(NS, toks)) & set(chunk_keys(other, toks))


def test_partial_chunk_key_is_opt_in_and_commits_to_length():
    toks = list(range(20))
    assert len(chunk_keys(NS, toks)) == 1
    with_tail = chunk_keys(NS, toks, include_partial=True)
    assert len(with_tail) == 2 and with_tail[0] == chunk_keys(NS, toks)[0]
    # A tail of 4 tokens never equals the key of a tail that starts the same but is longer.
    assert chunk_keys(NS, list(range(21)), include_partial=True)[1] != with_tail[1]


def test_parent_continues_the_chain():
    toks = list(range(64))
    keys = chunk_keys(NS, toks)
    assert chunk_keys(NS, toks[32:], parent=keys[1]) == keys[2:]


def test_keys_identical_in_another_process():
    code = (
        "from kvstore import KVLayout, Namespace, chunk_keys;"
        "ns=Namespace(model='tiny-llama', layout=KVLayout(4,2,8,'float16',16));"
        "print(b''.join(chunk_keys(ns, list(range(64)))).hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert bytes.fromhex(out.stdout.strip()) == b"".join(chunk_keys(NS, list(range(64))))


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5], [[1, 2]]])
def test_bad_tokens_rejected(bad):
    with pytest.raises(InvalidArgument):
        chunk_keys(NS, bad)


def test_layout_sizes_and_layer_ranges():
    lay = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", chunk_tokens=256)
    per_layer = 2 * 256 * 8 * 128 * 2
    assert lay.layer_bytes() == per_layer
    assert lay.chunk_bytes() == 32 * per_layer
    assert lay.layer_range(5) == (5 * per_layer, per_layer)
    assert lay.kv_range(5, "v") == (5 * per_layer + per_layer // 2, per_layer // 2)
    ranges = [lay.layer_range(i) for i in range(32)]
    assert all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert lay.chunk_bytes(100) == 32 * 2 * 100 * 8 * 128 * 2


def test_mla_layout():
    mla = KVLayout(num_layers=2, num_kv_heads=1, head_dim=576, dtype="bfloat16", kind="mla")
    assert mla.layer_bytes() == 256 * 576 * 2
    with pytest.raises(InvalidArgument):
        mla.kv_range(0, "k")
    with pytest.raises(InvalidArgument):
        KVLayout(num_layers=2, num_kv_heads=4, head_dim=576, kind="mla")


@given(
    st.integers(1, 64), st.integers(1, 16), st.sampled_from([64, 128]),
    st.sampled_from(["float16", "float32"]), st.integers(1, 512),
)
def test_fingerprint_is_injective_on_fields(layers, heads, dim, dtype, chunk):
    a = KVLayout(layers, heads, dim, dtype, chunk)
    b = KVLayout(layers + 1, heads, dim, dtype, chunk)
    c = KVLayout(layers, heads, dim, dtype, chunk + 1)
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3
    assert a.fingerprint() == KVLayout(layers, heads, dim, dtype, chunk).fingerprint()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_layers=0, num_kv_heads=1, head_dim=1),
        dict(num_layers=1, num_kv_heads=-1, head_dim=1),
        dict(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float64x"),
        dict(num_layers=1, num_kv_heads=1, head_dim=1, chunk_tokens=0),
    ],
)
def test_bad_layout_rejected(kwargs):
    with pytest.raises(InvalidArgument):
        KVLayout(**kwargs)
