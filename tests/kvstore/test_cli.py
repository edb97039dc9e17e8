"""The CLI as a user runs it: a real subprocess."""

import subprocess
import sys

ENTRY = [sys.executable, "-c", "from kvstore.cli import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=120)


def test_local_demo_end_to_end(tmp_path):
    r = run("local-demo", "--dram", "8MiB", "--disk", "64MiB", "--prompt-tokens", "4096",
            "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "longest_prefix = 12 of" in out
    assert "12/12 byte-identical" in out
    assert "found again after restart" in out
    assert "get -> miss" in out and "DATA (wrong!)" not in out


def test_bad_option_is_a_clear_error(tmp_path):
    r = run("local-demo", "--dram", "lots", "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0
    assert "store.dram" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_option():
    r = run("local-demo", "--help")
    for opt in ("--dram", "--disk", "--data-dir", "--prompt-tokens", "--config"):
        assert opt in r.stdout


def test_proxy_engine_events_bad_input_is_a_clear_error():
    base = ("proxy", "--prefill", "http://127.0.0.1:8100", "--decode", "http://127.0.0.1:8200")
    for spec, want in (("http://127.0.0.1:8100", "URL=ENDPOINT"),
                       ("http://127.0.0.1:9999=ipc:///tmp/x.sock", "not one of the --prefill/--decode"),
                       ("http://127.0.0.1:8100=udp://x", "tcp:// or ipc://")):
        r = run(*base, "--engine-events", spec)
        assert r.returncode != 0 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
