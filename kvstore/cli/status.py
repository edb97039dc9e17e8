"""``kvstore status``: what the pool holds, as a table."""

from __future__ import annotations

from pathlib import Path

import click

from kvstore.cli.node import read_token
from kvstore.units import format_size


@click.command("status")
@click.option("--master", default="127.0.0.1:5555", show_default=True, help="Master address host:port, or etcd://HOST:PORT/CLUSTER (follow the leader of a cluster of masters).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with this caller's token: the master's shared token, or one from `kvstore auth init`.")
@click.option("--tls-ca", default=None, help="CA (PEM) verifying the master's and nodes' TLS certificates.")
@click.option("--tls-cert", default=None,
              help="Client certificate (PEM) for a master and nodes that require one (mutual TLS).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the master.")
def status(master: str, token_file: Path | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None, timeout: float) -> None:
    """Print nodes, tiers (used/capacity), objects and hit/miss counts."""
    from kvstore.client import Client

    with Client(master, timeout=timeout, token=read_token(token_file), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as c:
        s = c.stats()
    click.echo(f"master {master}: {len(s.nodes)} node(s), {s.objects} object(s) "
               f"({format_size(s.bytes)}), {s.pending} pending, {s.leases} lease(s), {s.pins} pin(s)")
    rows = [("node", "epoch", "host", "tier", "used / capacity", "objects")]
    for n in s.nodes:
        for i, t in enumerate(n.tiers):
            rows.append((n.node_id if i == 0 else "", str(n.epoch) if i == 0 else "",
                         n.control_address if i == 0 else "", t.name,
                         f"{format_size(t.used)} / {format_size(t.capacity)}", str(n.objects) if i == 0 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if s.counters:
        click.echo("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(s.counters.items())))
