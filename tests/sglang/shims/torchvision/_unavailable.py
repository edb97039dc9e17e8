"""Module ``__getattr__`` whose every name is a callable that raises."""

from typing import Any, NoReturn


def missing(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError(f"torchvision is a test shim here: {name} is unavailable")

    return unavailable
