"""docs/configuration.md and docs/master.md stay true to the code."""

from __future__ import annotations

from pathlib import Path

from kvstore.cli.master import master
from kvstore.config import MasterConfig, describe

ROOT = Path(__file__).resolve().parents[2]


def test_every_master_config_key_documented_with_its_default() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for key, default, doc in describe(MasterConfig, "master"):
        assert f"| `{key}` | `{default}` | {doc} |" in text, f"{key} missing or stale"


def test_every_master_option_documented() -> None:
    text = (ROOT / "docs" / "master.md").read_text()
    assert "kvstore master" in text
    for p in master.params:
        for opt in p.opts:
            if opt.startswith("--"):
                assert f"`{opt}" in text, f"kvstore master {opt} undocumented in docs/master.md"


def test_every_rpc_and_metric_documented() -> None:
    from kvstore.v1 import master_pb2 as pb

    text = (ROOT / "docs" / "master.md").read_text()
    for rpc in pb.DESCRIPTOR.services_by_name["Master"].methods_by_name:
        assert f"`{rpc}`" in text, f"RPC {rpc} undocumented"
    for metric in ("kvstore_master_objects", "kvstore_master_rpc_seconds",
                   "kvstore_master_node_assigned_bytes"):
        assert metric in text
