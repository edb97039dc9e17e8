"""Human units for sizes ("4GiB", "256KiB", "1.5GB") and durations ("30s", "250ms")."""

from __future__ import annotations

import re

from kvstore.errors import InvalidArgument

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUM_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"4GiB"``; raises :class:`InvalidArgument`."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"{name}: size must be >= 0, got {value}")
        return value
    m = _NUM_RE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise InvalidArgument(
            f"{name}: cannot parse size {value!r}; use bytes or units like '256KiB', '4GiB', '1GB'"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: float | int | str, *, name: str = "duration") -> float:
    """Seconds from a number or a string such as ``"30s"``, ``"250ms"``, ``"2min"``."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{name}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise InvalidArgument(f"{name}: duration must be >= 0, got {value}")
        return float(value)
    m = _NUM_RE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _TIME_UNITS:
        raise InvalidArgument(
            f"{name}: cannot parse duration {value!r}; use seconds or units like '30s', '250ms'"
        )
    return float(m.group(1)) * _TIME_UNITS[unit]


def format_size(n: int | float) -> str:
    """``4194304`` -> ``"4.0MiB"``; for tables and messages."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(x)}B" if unit == "B" else f"{x:.1f}{unit}"
        x /= 1024
    raise AssertionError("unreachable")
