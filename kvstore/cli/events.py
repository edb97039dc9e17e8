"""``kvstore events``: tail the pool's event stream (chunks stored/removed/evicted/lost,
nodes joined/left)."""

from __future__ import annotations

from pathlib import Path

import click

from kvstore.cli.node import read_token


@click.command("events")
@click.option("--master", default="127.0.0.1:5555", show_default=True,
              help="Master address host:port, or etcd://HOST:PORT/CLUSTER (follow the leader of a cluster of masters).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with this caller's token: the master's shared token, or one from `kvstore auth init`.")
@click.option("--tls-ca", default=None, help="CA (PEM) verifying the master's and nodes' TLS certificates.")
@click.option("--tls-cert", default=None,
              help="Client certificate (PEM) for a master and nodes that require one (mutual TLS).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--after", default=0, show_default=True,
              help="Resume after this sequence number (the last one you saw); 0: all the master retains.")
@click.option("--from-now", is_flag=True, help="Only events from now on.")
@click.option("--count", default=0, show_default=True, help="Stop after this many events (0: follow until Ctrl-C).")
@click.option("--seconds", default=0.0, show_default=True, help="Stop after this many seconds (0: no limit).")
def events(master: str, token_file: Path | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
           after: int, from_now: bool, count: int,
           seconds: float) -> None:
    """Print one line per event: seq, time, kind, key (hex), size, nodes.

    A RESYNC line means events were missed (the subscriber fell behind the master's
    window, master.events_window): rebuild what you track from `kvstore status` or Lookup.
    """
    from kvstore.client import Client
    from kvstore.v1 import master_pb2 as pb

    n = 0
    with Client(master, token=read_token(token_file), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as c:
        for e in c.watch_events(after=after, from_now=from_now, timeout=seconds or None):
            kind = pb.PoolEvent.Kind.Name(e.kind)
            click.echo(f"{e.seq}\t{e.time_ms}\t{kind}\t{e.key.hex() or '-'}\t{e.size}\t{','.join(e.nodes) or '-'}")
            n += 1
            if count and n >= count:
                break
