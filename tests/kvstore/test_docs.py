"""Docs stay true to the code: every config key and CLI option is documented."""

from pathlib import Path

from click.testing import CliRunner

from kvstore.cli import cli
from kvstore.config import NodeConfig, StoreConfig, describe

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_key_documented_with_its_default():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for cls, section in ((StoreConfig, "store"), (NodeConfig, "node")):
        for key, default, doc in describe(cls, section):
            assert f"| `{key}` | `{default}` | {doc} |" in text, f"{key} missing or stale"


def test_every_cli_option_documented():
    text = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    for name, cmd in cli.commands.items():
        assert f"kvstore {name}" in text, f"command {name} undocumented"
        for p in cmd.params:
            for opt in p.opts:
                if opt.startswith("--"):
                    assert opt in text, f"option {name} {opt} undocumented"
    assert CliRunner().invoke(cli, ["--help"]).exit_code == 0


def test_cli_reference_is_current():
    from kvstore.cli.reference import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), (
        "docs/cli.md is stale: python -m kvstore.cli.reference > docs/cli.md")
