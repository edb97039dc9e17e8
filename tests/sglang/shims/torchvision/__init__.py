"""Import shim: ``torchvision`` for SGLang's module-level imports in the CPU test venv.

PyPI's torchvision wheels link CUDA libraries and do not load beside CPU torch;
SGLang's memory-pool modules import torchvision only for multimodal
preprocessing, never on the storage path the tests exercise. Every use raises.
"""

from torchvision import io, transforms

__version__ = "0.0.0+kvstore-shim"
__all__ = ["io", "transforms"]
