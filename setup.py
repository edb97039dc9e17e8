"""Build hook for native extensions (csrc/); all metadata lives in pyproject.toml.

``kvstore._native`` (csrc/*.cpp, pybind11) is built with the machine's C++
compiler. It is optional: when it cannot be built the install still succeeds
and :mod:`kvstore.kernels` falls back to NumPy, loudly (a logged warning and
``kernels.stats()["fallback_calls"]``). The CUDA sources in csrc/cuda/ are not
compiled here: they ship as package data and are compiled at run time by NVRTC.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildPyWithCuda(build_py):
    """Copy csrc/cuda/*.cu into kvstore/kernels/cuda_src/ of built wheels."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs read csrc/cuda/ in place
        dst = Path(self.build_lib) / "kvstore" / "kernels" / "cuda_src"
        dst.mkdir(parents=True, exist_ok=True)
        for src in sorted((HERE / "csrc" / "cuda").glob("*.cu")):
            shutil.copy2(src, dst / src.name)


def _have_xxhash() -> bool:
    """The xxHash library with its run-time SIMD dispatch (Debian: libxxhash-dev)."""
    import sysconfig

    inc = [Path(p) for p in ("/usr/include", "/usr/local/include", sysconfig.get_config_var("INCLUDEDIR") or "")]
    libs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/local/lib")
    return any((d / "xxh_x86dispatch.h").exists() for d in inc) and any(
        any(Path(d).glob("libxxhash.so*")) for d in libs)


# Block checksums in C++ (csrc/checksum.cpp) where the xxHash library is installed;
# kvstore.checksum uses the `xxhash` Python package otherwise (same values, slower).
XXHASH = _have_xxhash()

native = Pybind11Extension(
    "kvstore._native",
    sources=["csrc/module.cpp", "csrc/paged_copy.cpp"] + (["csrc/checksum.cpp", "csrc/xxh3_avx2.cpp"]
                                                          if XXHASH else []),
    include_dirs=["csrc"],
    depends=["csrc/paged_copy.h", "csrc/checksum.h"],
    define_macros=[("KVS_HAVE_XXHASH", "1")] if XXHASH else [],
    libraries=["xxhash"] if XXHASH else [],
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-strict-aliasing"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native], cmdclass={"build_py": BuildPyWithCuda})
