from typing import Any

from torchvision._unavailable import missing
from torchvision.transforms.v2 import functional


def __getattr__(name: str) -> Any:
    return missing(name)


__all__ = ["functional"]
