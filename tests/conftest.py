"""Shared fixtures. Hardware-specific tests skip with a stated reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    """A directory on a real filesystem (ext4 here) for the disk tier."""
    d = tmp_path / "disk"
    d.mkdir()
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _cuda_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none on this machine)"))
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (mounts a tmpfs)"))


def _cuda_available() -> bool:
    try:
        import cupy  # noqa: PLC0415

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except ImportError:
        return False
    except Exception:  # noqa: BLE001 - any CUDA driver error means "no usable GPU"
        return False
