"""``kvstore auth``: credentials for a secured deployment (tokens per role, per tenant)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("auth")
def auth() -> None:
    """Create and extend a credentials directory (see docs/security.md).

    The master reads DIR/credentials.json (master.auth_dir, --auth-dir); hand
    DIR/node.token to nodes (--token-file), DIR/tenants/NAME.token to a tenant's
    clients and DIR/admin.token to operators.
    """


@auth.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tenant", default="default", show_default=True, help="Name of the first tenant.")
@click.option("--tls", is_flag=True,
              help="Also make a CA, a server certificate and a client certificate (DIRECTORY/tls), and "
                   "client certificates naming the admin and the tenant (DIRECTORY/tls/admin.pem, "
                   "DIRECTORY/tls/tenants/NAME.pem): under mutual TLS they stand in for the tokens.")
@click.option("--tls-host", "tls_hosts", multiple=True,
              help="Host name or IP the certificate covers (repeatable; localhost and 127.0.0.1 always).")
def init(directory: Path, tenant: str, tls: bool, tls_hosts: tuple[str, ...]) -> None:
    """Create DIRECTORY (0700) with an admin, a node and one client token."""
    from kvstore.auth import init as make

    files = make(directory, tenant)
    click.echo(f"credentials in {directory / 'credentials.json'} (digests only); tokens (0600):")
    for role, path in files.items():
        click.echo(f"  {role:<16} {path}")
    click.echo(f"start the master with --auth-dir {directory}; nodes with --token-file {files['node']}")
    if tls:
        from kvstore.tls import make as make_tls

        t = make_tls(directory / "tls", list(tls_hosts))
        click.echo(f"TLS: CA {t['ca']}, certificate {t['cert']} (key {t['key']}) for "
                   f"{', '.join([*tls_hosts, 'localhost', '127.0.0.1'])}; serve with --tls-cert/--tls-key, "
                   f"verify with --tls-ca {t['ca']}; client certificate {t['client_cert']} "
                   f"(key {t['client_key']}) for masters and nodes run with --tls-client-ca {t['ca']}")
        from kvstore.tls import issue

        admin, _ = issue(directory / "tls", directory / "tls" / "admin", "admin")
        mine, _ = issue(directory / "tls", directory / "tls" / "tenants" / tenant, "client", tenant)
        click.echo(f"identity certificates (mutual TLS, no token needed): admin {admin}, tenant {tenant} {mine}")


@auth.command("add-tenant")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("--quota", default=None, help="Most bytes the tenant's keys may hold in the pool, e.g. 10GiB "
                                            "[default: no limit].")
@click.option("--max-pins", type=click.IntRange(min=1), default=None,
              help="Most of the tenant's keys pinned at once [default: no limit].")
@click.option("--max-puts-in-flight", type=click.IntRange(min=1), default=None,
              help="Most of the tenant's keys reserved by puts not yet ended; beyond it puts get "
                   "TryAgain [default: no limit].")
@click.option("--tls", is_flag=True,
              help="Also issue a client certificate naming the tenant (DIRECTORY/tls/tenants/NAME.pem and "
                   ".key), signed by the CA of `kvstore auth init --tls`.")
def add_tenant(directory: Path, name: str, quota: str | None, max_pins: int | None,
               max_puts_in_flight: int | None, tls: bool) -> None:
    """Add a client token for tenant NAME (a running master picks it up within a second)."""
    from kvstore.auth import add_tenant as add
    from kvstore.units import parse_size

    limit = parse_size(quota, name="--quota") if quota is not None else None
    if tls and not (directory / "tls" / "ca.key").exists():
        from kvstore.errors import ConfigError

        raise ConfigError(f"--tls: {directory / 'tls' / 'ca.key'} does not exist; make the CA with "
                          "`kvstore auth init --tls` (nothing was added)")
    path = add(directory, name, limit, max_pins=max_pins, max_puts_in_flight=max_puts_in_flight)
    limits = [f"quota {quota}" if quota else "", f"max {max_pins} pins" if max_pins else "",
              f"max {max_puts_in_flight} puts in flight" if max_puts_in_flight else ""]
    click.echo(f"tenant {name}: token in {path}" + "".join(f", {x}" for x in limits if x))
    if tls:
        from kvstore.tls import issue

        cert, key = issue(directory / "tls", directory / "tls" / "tenants" / name, "client", name)
        click.echo(f"tenant {name}: client certificate {cert} (key {key})")
