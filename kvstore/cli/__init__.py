"""The ``kvstore`` command line. Each subcommand lives in its own module."""

from __future__ import annotations

import logging
import sys

import click

from kvstore import __version__
from kvstore.errors import KVStoreError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kvstore")
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging verbosity.")
def cli(log_level: str) -> None:
    """kvstore: KV-cache storage and transfer for LLM serving."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from kvstore.cli.auth import auth
    from kvstore.cli.demo import demo
    from kvstore.cli.events import events
    from kvstore.cli.local_demo import local_demo
    from kvstore.cli.master import master
    from kvstore.cli.node import node
    from kvstore.cli.status import status
    from kvstore.cli.up import up

    for command in (up, master, node, status, events, demo, local_demo, auth):
        cli.add_command(command)
    from kvstore.cli.proxy import proxy; cli.add_command(proxy)  # noqa: E702, I001


_register()


def main() -> None:
    """Console-script entry: kvstore errors become one clear line and exit status 2."""
    try:
        cli()
    except KVStoreError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
