"""Helpers shared by the benchmarks: timing, percentiles, tables, JSON output."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summarize(samples: list[float], nbytes: int) -> dict[str, float]:
    arr = np.asarray(samples)
    return {
        "gbps": nbytes * len(arr) / arr.sum() / 1e9,
        "p50_us": float(np.percentile(arr, 50) * 1e6),
        "p99_us": float(np.percentile(arr, 99) * 1e6),
        "n": len(arr),
    }


def print_table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)))


def print_ratios(ratios: dict[str, Any]) -> None:
    """The ``ratios`` of a benchmark's JSON, one per line, names aligned."""
    print("\nratios")
    width = max((len(k) for k in ratios), default=0)
    for k, v in ratios.items():
        print(f"  {k:<{width}}  {v:,.2f}" if isinstance(v, (int, float)) else f"  {k:<{width}}  {v}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    payload.setdefault("machine", {"cpu_count": __import__("os").cpu_count(),
                                   "platform": platform.platform()})
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {path}")


def plot_lines(png: str | Path | None, title: str, xlabel: str, ylabel: str, xs: list[str],
               series: dict[str, list[float | None]], *, log_y: bool = False) -> None:
    """One line per system against ``xs`` (sizes, token counts) into ``png`` (skipped
    without a path; a note without matplotlib)."""
    if png is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (make bench installs it): no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if max((len(x) for x in xs), default=0) > 6:  # long labels (layouts): slanted
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {png}")


def png_for(json_path: str | Path | None) -> Path | None:
    """``bench-results/x.json`` -> ``bench-results/x.png`` (None without a JSON path)."""
    return None if json_path is None else Path(json_path).with_suffix(".png")
