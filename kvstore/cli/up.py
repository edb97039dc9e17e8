"""``kvstore up``: an embedded master and one store node on 127.0.0.1, one command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kvstore.cli.node import read_token, serve_until_signal
from kvstore.config import load_config


@click.command("up")
@click.option("--port", default=5555, show_default=True, help="Master gRPC port (0: any free port).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("kvstore-data"),
              show_default=True, help="Master metadata and the node's disk tier live here.")
@click.option("--dram", default="1GiB", show_default=True, help="DRAM tier capacity of the node.")
@click.option("--disk", default="4GiB", show_default=True, help="Disk tier capacity (0 disables it).")
@click.option("--metrics-port", default=0, show_default=True,
              help="Prometheus port of the master (0: any free port, -1: off); the node takes the next.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Require 'authorization: Bearer <token>' on every master RPC.")
@click.option("--tls-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory from `kvstore auth init --tls` (its tls/ part): the master and the node's "
                   "control channel serve TLS; clients pass tls_ca=DIR/tls/ca.pem.")
@click.option("--mtls", is_flag=True,
              help="With --tls-dir: also require client certificates signed by its CA (mutual TLS); "
                   "clients add tls_cert=DIR/tls/client.pem, tls_key=DIR/tls/client.key.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML config file ([master], [node], [store] sections; flags win).")
def up(port: int, data_dir: Path, dram: str, disk: str, metrics_port: int, token_file: Path | None,
       tls_dir: Path | None, mtls: bool, config_file: Path | None) -> None:
    """Run a master and one node in this process with sane defaults, until Ctrl-C.

    Clients connect to the printed address: ``kvstore.Client("127.0.0.1:5555")``.
    """
    from kvstore.master.server import serve_master
    from kvstore.node.daemon import StoreNode
    from kvstore.units import parse_size

    overrides: dict[str, Any] = {
        "master.host": "127.0.0.1", "master.port": port, "master.data_dir": str(data_dir / "master"),
        "master.metrics_port": metrics_port, "store.dram": dram,
        "node.node_id": "local", "node.metrics_port": -1 if metrics_port < 0 else 0,
    }
    if parse_size(disk, name="--disk") > 0:
        overrides.update({"store.disk_dir": str(data_dir / "node"), "store.disk": disk})
    if token_file is not None:
        overrides["master.token_file"] = str(token_file)
    if tls_dir is not None:
        tls = tls_dir / "tls" if (tls_dir / "tls" / "server.pem").exists() else tls_dir
        overrides.update({"master.tls_cert": str(tls / "server.pem"), "master.tls_key": str(tls / "server.key"),
                          "node.tls_cert": str(tls / "server.pem"), "node.tls_key": str(tls / "server.key"),
                          "node.tls_ca": str(tls / "ca.pem")})
        if mtls:
            overrides.update({"master.tls_client_ca": str(tls / "ca.pem"), "node.tls_client_ca": str(tls / "ca.pem")})
    elif mtls:
        raise click.UsageError("--mtls needs --tls-dir")
    cfg = load_config(config_file, overrides)
    token = read_token(token_file)
    master = serve_master(cfg.master, token=token)
    try:
        node_cfg = load_config(config_file, {**overrides, "node.master": master.address}).node
        node = StoreNode(node_cfg, cfg.store, token=token).start()
    except BaseException:
        master.stop()
        raise
    tiers = f"DRAM {dram}" + (f", disk {disk} under {data_dir / 'node'}" if "store.disk_dir" in overrides else "")
    click.echo(f"kvstore up: master {master.address}, node {node.node_id} ({tiers})")
    if master.metrics_port:
        click.echo(f"  metrics: http://127.0.0.1:{master.metrics_port}/metrics (master), "
                   f"http://127.0.0.1:{node.metrics_port}/metrics (node)")
    click.echo(f"  try: kvstore demo --master {master.address}    (Ctrl-C stops)", nl=True)

    def stop() -> None:
        node.stop()
        master.stop()
        click.echo("kvstore stopped")

    serve_until_signal(stop)
