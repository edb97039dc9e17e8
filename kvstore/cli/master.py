"""``kvstore master``: run the metadata master until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from kvstore.config import MasterConfig, load_config
from kvstore.units import parse_duration


@click.command("master")
@click.option("--host", default=None, help="Address to bind [default: 127.0.0.1, master.host].")
@click.option("--port", type=int, default=None,
              help="gRPC port; 0 picks a free one [default: 5555, master.port].")
@click.option("--metrics-port", type=int, default=None,
              help="Prometheus /metrics port; 0 picks a free one, -1 disables "
                   "[default: 0, master.metrics_port].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="RocksDB directory; metadata survives restarts [default: in memory only].")
@click.option("--node-ttl", default=None,
              help="A node silent this long is dead, e.g. 10s [default: 10s, master.node_ttl].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="TOML config file; its [master] section is used (flags win).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with a shared token; every RPC must then send "
                   "'authorization: Bearer <token>'.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM certificate: serve gRPC and the framed channel over TLS [default: plain].")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Mutual TLS: require clients and nodes to present a certificate this CA (PEM) "
                   "signed [default: none asked, master.tls_client_ca]. Needs --tls-cert.")
@click.option("--auth-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Credentials directory from `kvstore auth init`: a token per role (admin, node, "
                   "client per tenant) [default: none, master.auth_dir].")
@click.option("--etcd", default=None,
              help="etcd endpoints HOST:PORT[,HOST:PORT]: elect one leader among the masters of "
                   "--cluster; the others wait as standbys [default: one master, no etcd].")
@click.option("--cluster", default=None,
              help="Cluster name in etcd; nodes and clients use etcd://HOST:PORT/NAME as the master "
                   "[default: default, master.cluster].")
@click.option("--advertise", default=None,
              help="HOST:PORT nodes and clients reach this master at, published in etcd when it "
                   "leads [default: --host and the bound port].")
@click.option("--leader-ttl", default=None,
              help="etcd lease of the leader, whole seconds >= 2: a standby takes over this long "
                   "after the leader dies [default: 3s, master.leader_ttl].")
def master(host: str | None, port: int | None, metrics_port: int | None, data_dir: Path | None,
           node_ttl: str | None, config_file: Path | None, token_file: Path | None, tls_cert: Path | None,
           tls_key: Path | None, tls_client_ca: Path | None, auth_dir: Path | None,
           etcd: str | None,
           cluster: str | None, advertise: str | None, leader_ttl: str | None) -> None:
    """Run the metadata master: knows where every chunk lives, never touches data.

    Prints its address, serves until Ctrl-C or SIGTERM, then shuts down cleanly.
    With --etcd it campaigns for the leadership of --cluster: as a standby it
    refuses calls (UNAVAILABLE) until the leader's etcd lease runs out, then
    leads with a table the nodes rebuild as they re-register with it.
    """
    flags: dict[str, Any] = {"host": host, "port": port, "metrics_port": metrics_port,
                             "data_dir": str(data_dir) if data_dir else None,
                             "node_ttl": node_ttl,
                             "token_file": str(token_file) if token_file else None,
                             "auth_dir": str(auth_dir) if auth_dir else None,
                             "tls_cert": str(tls_cert) if tls_cert else None,
                             "tls_key": str(tls_key) if tls_key else None,
                             "tls_client_ca": str(tls_client_ca) if tls_client_ca else None,
                             "etcd": etcd, "cluster": cluster, "advertise": advertise,
                             "leader_ttl": leader_ttl}
    overrides = {f"master.{k}": v for k, v in flags.items() if v is not None}
    if node_ttl is not None:
        # A shorter TTL needs faster heartbeats: cap them at a fifth of it.
        ttl = parse_duration(node_ttl, name="master.node_ttl")
        configured = load_config(config_file).master.heartbeat_interval
        overrides["master.heartbeat_interval"] = min(configured, ttl / 5)
    cfg = load_config(config_file, overrides).master
    asyncio.run(_serve(cfg))


async def _serve(cfg: MasterConfig) -> None:
    from kvstore.master.server import start_master

    server = await start_master(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.stop()))
    metrics = f", metrics on http://{cfg.host}:{server.metrics_port}/metrics" \
        if server.metrics_port is not None else ""
    store = f", data in {cfg.data_dir}" if cfg.data_dir else ", in memory only (no --data-dir)"
    fast = f", framed channel on {server.fast_address}" if server.fast_address else ""
    ha = f"; campaigning for cluster {cfg.cluster!r} in etcd {cfg.etcd} (etcd://{cfg.etcd}/{cfg.cluster})" \
        if cfg.etcd else ""
    click.echo(f"kvstore master listening on {server.address}{fast}{metrics}{store}{ha}", nl=True)
    await server.wait_stopped()
    click.echo("kvstore master stopped")
