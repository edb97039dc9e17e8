"""SGLang backend tests: run in ``.venv-sglang`` (``make test`` does), skipped as a folder elsewhere.

SGLang cannot share the vLLM venv (tests/sglang/README.md). Outside its venv this
folder is not collected; with ``KVSTORE_REQUIRE_SGLANG=1`` (how ``make test`` runs
it) a missing SGLang is an error, so a broken venv cannot pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parent / "shims"



def _have_sglang() -> bool:
    # not find_spec("sglang"): this folder itself looks like a namespace package of that name
    try:
        return importlib.util.find_spec("sglang.srt") is not None
    except ImportError:
        return False


if not _have_sglang():
    if os.environ.get("KVSTORE_REQUIRE_SGLANG"):
        raise RuntimeError("KVSTORE_REQUIRE_SGLANG is set but sglang is not importable: run `make install-sglang`")
    collect_ignore_glob = ["*"]
else:
    # PyPI's torchvision cannot load beside CPU torch; SGLang's pool modules only import it.
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, str(SHIMS))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SHIMS), os.environ.get("PYTHONPATH", "")])
