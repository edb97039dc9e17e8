"""``kvstore demo``: put and get a few hundred chunks through a running pool, with throughput."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from kvstore.cli.node import read_token
from kvstore.units import format_size, parse_size


@click.command("demo")
@click.option("--master", default="127.0.0.1:5555", show_default=True, help="Master address host:port, or etcd://HOST:PORT/CLUSTER (follow the leader of a cluster of masters).")
@click.option("--chunks", default=256, show_default=True, help="How many chunks to put and get.")
@click.option("--size", default="1MiB", show_default=True, help="Bytes per chunk.")
@click.option("--batch", default=16, show_default=True, help="Chunks per batched call.")
@click.option("--tcp", is_flag=True, help="Disable the same-host shared-memory path (use TCP).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with this caller's token: the master's shared token, or one from `kvstore auth init`.")
@click.option("--handoff", is_flag=True,
              help="Instead: prefill a prompt with a tiny local Llama in one process, decode it in "
                   "another from the store, and compare with a single-process run (needs kvstore[hf]).")
@click.option("--prompt-tokens", default=300, show_default=True, help="Prompt length for --handoff.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where --handoff runs the model: cuda keeps the model, its cache and the chunks on the "
                   "GPU (needs CuPy and a GPU).")
def demo(master: str, chunks: int, size: str, batch: int, tcp: bool, token_file: Path | None,
         handoff: bool, prompt_tokens: int, device: str) -> None:
    """Put CHUNKS chunks, read them back verified, print throughput, remove them.

    With --handoff: a prefill -> decode handoff of a real (tiny, random) transformers model.
    """
    if handoff:
        _handoff(master, prompt_tokens, device)
        return
    if device != "cpu":
        raise click.UsageError("--device applies to --handoff only")
    from kvstore.client import Client

    n = parse_size(size, name="--size")
    rng = np.random.default_rng()
    run = int(rng.integers(0, 2**63))
    keys = [b"demo-%x-%06d" % (run, i) for i in range(chunks)]
    values = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(min(chunks, 16))]
    with Client(master, same_host=not tcp, token=read_token(token_file)) as c:
        t = time.perf_counter()
        for i in range(0, chunks, batch):
            c.put_batch([(k, values[j % len(values)]) for j, k in enumerate(keys[i:i + batch], i)])
        put_s = time.perf_counter() - t
        bufs = [np.empty(n, dtype=np.uint8) for _ in range(batch)]
        ok = 0
        t = time.perf_counter()
        for i in range(0, chunks, batch):
            part = keys[i:i + batch]
            got = c.get_into_batch(part, bufs[: len(part)])
            ok += sum(1 for j, g in enumerate(got)
                      if g == n and np.array_equal(bufs[j], values[(i + j) % len(values)]))
        get_s = time.perf_counter() - t
        hit = c.longest_prefix(keys)
        c.remove_batch(keys, force=True)
        path = "shm" if c.counters["hits.one_sided"] or c.counters["puts.direct"] else "tcp"
    total = n * chunks
    click.echo(f"put {chunks} x {format_size(n)}: {put_s * 1e3:.0f} ms, {total / put_s / 1e9:.2f} GB/s")
    click.echo(f"get {chunks} x {format_size(n)}: {get_s * 1e3:.0f} ms, {total / get_s / 1e9:.2f} GB/s, "
               f"{ok}/{chunks} byte-identical (path: {path})")
    click.echo(f"longest_prefix before removal: {hit}/{chunks}")
    if ok != chunks:
        raise click.ClickException(f"{chunks - ok} chunk(s) missing or wrong")


def _handoff(master: str, prompt_tokens: int, device: str = "cpu") -> None:
    """Prefill in one process, decode in another from the store, token-identical to one process."""
    import json
    import os
    import random
    import subprocess
    import sys
    import tempfile

    try:
        from connectors.testing.tiny_model import TinyModelSpec, build_tiny_llama
    except ImportError as e:
        raise click.ClickException(
            f"--handoff needs transformers and torch: pip install 'kvstore[hf]' ({e})") from e
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(op: str, model: Path, tokens: list[int]) -> tuple[dict[str, object], float]:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "connectors.hf.handoff", op, str(model), master,
                              json.dumps(tokens), "16", "64", device], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise click.ClickException(f"{op} failed: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="kvstore-handoff-") as d:
        click.echo("building a tiny random Llama and a tokenizer locally (no downloads)...")
        model = build_tiny_llama(Path(d) / "model", TinyModelSpec(layers=4, hidden=256, heads=4, kv_heads=2))
        rng = random.Random()
        tokens = [rng.randrange(2, 500) for _ in range(prompt_tokens)]
        want, t_local = run("local", model, tokens)
        stored, t_pre = run("prefill", model, tokens)
        got, t_dec = run("decode", model, tokens)
    same = got["tokens"] == want["tokens"]
    click.echo(f"device:                  {device}")
    click.echo(f"single process:          {t_local:.2f}s  tokens {want['tokens']}")
    click.echo(f"prefill process:         {t_pre:.2f}s  stored {stored['chunks']} chunk(s) of 64 tokens")
    click.echo(f"decode process:          {t_dec:.2f}s  {got['cached']} prompt tokens loaded from the store")
    click.echo(f"decoded tokens:          {got['tokens']}")
    click.echo("token-identical to the single-process run" if same else "MISMATCH with the single-process run")
    if not same:
        raise click.ClickException("handoff output differs")
