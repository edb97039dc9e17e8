"""``kvstore local-demo``: the embedded tiered store at work on a synthetic KV workload."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from kvstore.config import load_config
from kvstore.keys import Namespace, chunk_keys, key_hex
from kvstore.layout import KVLayout
from kvstore.store import LocalStore
from kvstore.tiers.disk import decode_record
from kvstore.units import format_size


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-9) / 1e9:.2f} GB/s"


@click.command("local-demo")
@click.option("--dram", default="32MiB", show_default=True, help="DRAM tier capacity.")
@click.option("--disk", default="256MiB", show_default=True, help="Disk tier capacity.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Disk tier directory (default: a temporary directory, removed afterwards).")
@click.option("--prompt-tokens", default=8192, show_default=True, help="Tokens in the first prompt.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML config file; its [store] section is used (flags above win).")
def local_demo(dram: str, disk: str, data_dir: Path | None, prompt_tokens: int,
               config_file: Path | None) -> None:
    """Run the node-local store on a synthetic KV-cache workload and print what happens.

    Stores the KV chunks of a prompt, finds the shared prefix of a second prompt,
    overflows DRAM into the disk tier, restarts the store from disk, and shows a
    corrupted chunk being detected and served as a miss.
    """
    tmp = None
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="kvstore-demo-"))
        data_dir = tmp
    try:
        cfg = load_config(config_file, {"store.dram": dram, "store.disk": disk,
                                        "store.disk_dir": str(data_dir)}).store
        _run(cfg, prompt_tokens)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(cfg, prompt_tokens: int) -> None:  # type: ignore[no-untyped-def]
    layout = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", chunk_tokens=256)
    ns = Namespace(model="demo/tiny-llama", layout=layout)
    size = layout.chunk_bytes()
    rng = np.random.default_rng(0)
    echo = click.echo
    echo(f"layout: {layout.num_layers} layers x {layout.num_kv_heads} kv heads x {layout.head_dim} "
         f"dim, {layout.dtype}, {layout.chunk_tokens} tokens/chunk = {format_size(size)} per chunk")
    echo(f"store:  DRAM {format_size(cfg.dram)}, disk {format_size(cfg.disk)} under {cfg.disk_dir}")

    prompt_a = rng.integers(0, 32000, prompt_tokens)
    keys_a = chunk_keys(ns, prompt_a)
    chunks = {k: rng.integers(0, 256, size, dtype=np.uint8) for k in keys_a}

    with LocalStore(cfg) as store:
        echo(f"\n1. prefill A: {prompt_tokens} tokens -> {len(keys_a)} chunks")
        t = time.perf_counter()
        for k in keys_a:
            store.put(k, chunks[k])
        dt = time.perf_counter() - t
        echo(f"   put {len(keys_a)} chunks ({format_size(size * len(keys_a))}) in {dt * 1e3:.1f} ms, "
             f"{_gbps(size * len(keys_a), dt)}")

        shared = (prompt_tokens * 3 // 4) // 256 * 256
        prompt_b = np.concatenate([prompt_a[:shared], rng.integers(0, 32000, 1000)])
        keys_b = chunk_keys(ns, prompt_b)
        hits = store.longest_prefix(keys_b)
        echo(f"\n2. request B shares {shared} tokens with A: longest_prefix = {hits} of "
             f"{len(keys_b)} chunks ({hits * 256} tokens need no prefill)")
        buf = np.empty(size, dtype=np.uint8)
        t = time.perf_counter()
        ok = 0
        for k in keys_b[:hits]:
            store.get_into(k, buf)
            ok += int(np.array_equal(buf, chunks[k]))
        dt = time.perf_counter() - t
        echo(f"   loaded {hits} chunks in {dt * 1e3:.1f} ms ({_gbps(size * hits, dt)}), "
             f"{ok}/{hits} byte-identical")

        s = store.stats()
        echo(f"\n3. DRAM holds {s['tiers']['dram']['chunks']} chunks; "
             f"{s['counters'].get('demotions', 0)} demoted to disk, "
             f"{s['counters'].get('promotions', 0)} promoted back on hit")
        oldest = keys_a[0]
        t = time.perf_counter()
        got = store.get(oldest)
        echo(f"   oldest chunk read back in {(time.perf_counter() - t) * 1e3:.1f} ms, "
             f"identical: {got is not None and bytes(got) == chunks[oldest].tobytes()}")
        on_disk = [k for k in keys_a if store._m.disk is not None and store._m.disk.contains(k)]

    echo(f"\n4. restart: reopening the store from {cfg.disk_dir}")
    victim = on_disk[-1] if on_disk else None
    if victim is not None:
        _flip_byte(Path(cfg.disk_dir), victim)
    with LocalStore(cfg) as store:
        found = sum(store.exists(k) for k in on_disk)
        echo(f"   {found}/{len(on_disk)} chunks on disk found again after restart")
        if victim is not None:
            echo(f"\n5. flipped one byte of chunk {key_hex(victim)} on disk")
            got = store.get(victim)
            c = store.stats()["counters"]
            echo(f"   get -> {'miss' if got is None else 'DATA (wrong!)'}; corrupt chunks detected: "
                 f"{c.get('corrupt.disk', 0)}; never served")
        _print_stats(store.stats())


def _flip_byte(data_dir: Path, key: bytes) -> None:
    from rocksdict import Options, Rdict

    db = Rdict(str(data_dir / "index"), Options(raw_mode=True))
    try:
        offset, size, _ = decode_record(db[key])  # type: ignore[arg-type]
    finally:
        db.close()
    with open(data_dir / "chunks.dat", "r+b") as f:
        f.seek(offset + size // 3)
        b = f.read(1)
        f.seek(offset + size // 3)
        f.write(bytes([b[0] ^ 0xFF]))


def _print_stats(stats: dict) -> None:  # type: ignore[type-arg]
    click.echo("\n   tier   used / capacity          chunks")
    for name, t in stats["tiers"].items():
        click.echo(f"   {name:<6} {format_size(t['used']):>9} / {format_size(t['capacity']):<9}"
                   f"      {t['chunks']:>5}")
    counters = ", ".join(f"{k}={v}" for k, v in sorted(stats["counters"].items()) if v)
    click.echo(f"   counters: {counters or 'none'}")
