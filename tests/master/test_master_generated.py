"""The committed kvstore/v1 master code matches proto/kvstore/v1/master.proto."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ("master_pb2.py", "master_pb2.pyi", "master_pb2_grpc.py")
# Tool-version stamps: a newer grpcio-tools/protoc must not make the check fail.
_STAMP = re.compile(r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,|\s+'',)$",
                    re.M)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"),
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         str(ROOT / "proto/kvstore/v1/master.proto")],
        check=True, capture_output=True, timeout=60)
    for name in FILES:
        fresh = _STAMP.sub("", (tmp_path / "kvstore/v1" / name).read_text())
        committed = _STAMP.sub("", (ROOT / "kvstore/v1" / name).read_text())
        assert fresh == committed, (
            f"kvstore/v1/{name} is stale; regenerate from the repo root with: python -m "
            "grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. "
            "proto/kvstore/v1/master.proto")
