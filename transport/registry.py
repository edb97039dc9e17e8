"""Backends by URI scheme: ``create("tcp://127.0.0.1:0")``.

Built-in schemes are imported lazily (``ucx://`` needs the optional ``ucxx``);
third-party backends register through the ``kvstore.transports`` entry-point
group (name = scheme, value = ``module:Class``) or :func:`register_backend`.
Every backend has the same constructor, ``Backend(uri, options)``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from kvstore.errors import InvalidArgument
from transport.base import Transport, TransportOptions

ENTRY_POINT_GROUP = "kvstore.transports"

_BUILTIN = {
    "tcp": "transport.tcp.transport:TcpTransport",
    "shm": "transport.shm.transport:ShmTransport",
    "ucx": "transport.ucx.transport:UcxTransport",
    "inproc": "transport.testing.inproc:InprocTransport",
}
_extra: dict[str, type[Transport]] = {}


def register_backend(scheme: str, cls: type[Transport]) -> None:
    """Make ``scheme://`` URIs build ``cls`` (overrides entry points and built-ins)."""
    _extra[scheme] = cls


def schemes() -> list[str]:
    """Every scheme that :func:`create` knows (without importing the backends)."""
    eps = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(_BUILTIN) | set(_extra) | eps)


def backend_class(scheme: str) -> type[Transport]:
    """The class serving ``scheme``; raises InvalidArgument for unknown schemes.

    An optional backend whose dependency is missing raises its own clear error
    (e.g. ``ucx://`` says to ``pip install 'kvstore[ucx]'``).
    """
    if scheme in _extra:
        return _extra[scheme]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            cls = ep.load()
            return _checked(scheme, cls)
    target = _BUILTIN.get(scheme)
    if target is None:
        raise InvalidArgument(f"no transport for scheme {scheme!r}; known: {', '.join(schemes())}")
    mod, _, attr = target.partition(":")
    return _checked(scheme, getattr(importlib.import_module(mod), attr))


def create(uri: str, options: TransportOptions | None = None) -> Transport:
    """Build the transport for ``uri`` (``scheme://address[?param=value]``)."""
    scheme = urlsplit(uri).scheme
    if not scheme:
        raise InvalidArgument(f"transport URI {uri!r} has no scheme (e.g. tcp://127.0.0.1:0)")
    return backend_class(scheme)(uri, options)


def _checked(scheme: str, cls: object) -> type[Transport]:
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise InvalidArgument(f"transport {scheme!r} entry point is not a Transport subclass")
    return cls
