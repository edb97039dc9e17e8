import enum
from typing import Any

from torchvision._unavailable import missing


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name: str) -> Any:
    return missing(name)


from torchvision.transforms import functional, v2  # noqa: E402

__all__ = ["InterpolationMode", "functional", "v2"]
