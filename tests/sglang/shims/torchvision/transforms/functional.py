from typing import Any

from torchvision._unavailable import missing


def __getattr__(name: str) -> Any:
    return missing(name)
