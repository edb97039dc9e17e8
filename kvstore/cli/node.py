"""``kvstore node``: a store node daemon contributing DRAM (and disk) to the pool."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from kvstore.config import load_config


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise click.BadParameter(f"token file {path} is empty")
    return token


def serve_until_signal(stop: Any) -> None:
    """Block until SIGINT/SIGTERM, then call ``stop()``."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()


@click.command("node")
@click.option("--master", default="127.0.0.1:5555", show_default=True, help="Master address host:port, or etcd://HOST:PORT/CLUSTER (follow the leader of a cluster of masters).")
@click.option("--node-id", default="", help="Stable node name (default: hostname-port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the node's services bind.")
@click.option("--control-port", default=0, show_default=True, help="Node control service port (0: any).")
@click.option("--transport", "transports", multiple=True, default=("shm://", "tcp://"), show_default=True,
              help="Transport to serve (repeatable): shm://, tcp://, ucx://.")
@click.option("--dram", default="1GiB", show_default=True, help="DRAM tier capacity.")
@click.option("--disk-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Disk tier directory (no disk tier when unset).")
@click.option("--disk", default="4GiB", show_default=True, help="Disk tier capacity.")
@click.option("--metrics-port", default=0, show_default=True, help="Prometheus port (0: any, -1: off).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with this caller's token: the master's shared token, or one from `kvstore auth init`.")
@click.option("--tls-cert", default=None, help="PEM certificate: serve the control channel over TLS.")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-ca", default=None, help="CA (PEM) verifying the master's TLS certificate.")
@click.option("--tls-client-ca", default=None,
              help="Mutual TLS: require peers of the control channel and tcp:// to present a certificate "
                   "this CA (PEM) signed. --tls-cert is also presented to the master.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML config file ([store] and [node] sections; flags given win).")
def node(master: str, node_id: str, host: str, control_port: int, transports: tuple[str, ...], dram: str,
         disk_dir: Path | None, disk: str, metrics_port: int, token_file: Path | None,
         tls_cert: str | None, tls_key: str | None, tls_ca: str | None, tls_client_ca: str | None,
         config_file: Path | None) -> None:
    """Run a store node: serve DRAM/disk to clients and register with the master."""
    from kvstore.node.daemon import StoreNode

    ctx = click.get_current_context()

    def given(name: str) -> bool:  # flags set on the command line beat the file; defaults do not
        return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT

    overrides: dict[str, Any] = {f"store.{k}": v for k, v in (("dram", dram), ("disk", disk)) if given(k)}
    if disk_dir is not None:
        overrides["store.disk_dir"] = str(disk_dir)
    flags = {"master": master, "node_id": node_id, "host": host, "control_port": control_port,
             "transports": list(transports), "metrics_port": metrics_port, "tls_cert": tls_cert,
             "tls_key": tls_key, "tls_ca": tls_ca, "tls_client_ca": tls_client_ca}
    overrides.update({f"node.{k}": v for k, v in flags.items() if given(k)})
    cfg = load_config(config_file, overrides)
    ncfg = cfg.node
    n = StoreNode(ncfg, cfg.store, token=read_token(token_file)).start()
    click.echo(f"kvstore node {n.node_id} serving on {n.control_address} "
               f"({', '.join(t.scheme for t in n.transports)}), master {master}"
               + (f", metrics on :{n.metrics_port}" if n.metrics_port else ""), err=False)
    serve_until_signal(n.stop)
