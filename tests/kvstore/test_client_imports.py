"""The client SDK stays light: importing it loads no storage engine."""

import subprocess
import sys


def test_client_import_loads_no_storage_engine():
    code = ("import sys, kvstore.client; "
            "bad = [m for m in sys.modules if m == 'rocksdict' or m.startswith(('kvstore.tiers', 'kvstore.store'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
