"""Splitting batches across parallel streams, and write-then-notify composition."""

from __future__ import annotations

from collections.abc import Callable

from transport.handle import Handle
from transport.regions import Desc


def split(descs: list[Desc], parts: int, stripe_min: int) -> list[list[Desc]]:
    """Cut ``descs`` into at most ``parts`` lists of about equal bytes (ranges may be cut).

    Batches under ``2 * stripe_min`` bytes stay whole: one stream is faster for them.
    """
    total = sum(d.length for d in descs)
    n = min(parts, max(1, total // max(1, stripe_min)))
    if n <= 1:
        return [descs]
    target = -(-total // n)
    out: list[list[Desc]] = [[]]
    room = target
    for d in descs:
        pos = 0
        while pos < d.length:
            if room == 0:
                out.append([])
                room = target
            take = min(room, d.length - pos)
            out[-1].append(
                Desc(d.local, d.local_offset + pos, d.remote, d.remote_offset + pos, take)
            )
            pos += take
            room -= take
    return out


def compose(
    h: Handle,
    n_parts: int,
    then: Callable[[], None] | None,
) -> Handle:
    """A sub-handle for ``n_parts`` data parts of ``h``.

    When every data part ended: on error ``h`` fails with it; otherwise
    ``then()`` runs (e.g. posts the notification, which must end ``h``'s single
    part) or, without ``then``, ``h`` succeeds. Aborting ``h`` aborts the data.
    """
    data = Handle(h.what, h.nbytes, None)
    data._set_parts(n_parts)

    def on_data(d: Handle) -> None:
        err = d.exception()
        if err is not None or then is None or h.aborted:
            h._part_done(err)
        else:
            then()

    data.add_done_callback(on_data)
    return data
