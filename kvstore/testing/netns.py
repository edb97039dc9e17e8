"""Several "hosts" on one machine: Linux network namespaces joined by a bridge (needs root).

``with Hosts(4) as hosts:`` creates a switch namespace holding a bridge and four
host namespaces, each with one veth (``eth0``) on the bridge and its own address
in a private /24 (``hosts.ip(i)``). Nothing touches the caller's own namespace:
processes run inside a host with ``hosts.spawn(i, args, log)`` (``ip netns exec``),
so they talk over real interfaces, never loopback, and share no abstract Unix
sockets (``shm://`` cannot cross hosts, as on real machines). Everything is
removed on exit (processes ended by PID, namespaces deleted).

``hosts.partition(i)`` cuts host ``i`` off the bridge (its veth end in the switch
goes down: its processes keep running and see their peers time out) and
``hosts.heal(i)`` joins it again. ``hosts.describe()`` and :meth:`Hosts.attach`
hand the set to a process that runs inside one of the hosts (the chaos harness's
coordinator), which then uses it without owning it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


def available() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """``n`` host namespaces on one bridge; see the module docstring."""

    def __init__(self, n: int) -> None:
        pid = os.getpid()
        self.n = n
        self.tag = f"kvt{pid % 10**6}"
        self.switch = f"{self.tag}sw"
        self.names = [f"{self.tag}h{i}" for i in range(n)]
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.owner = True

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside host ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def partition(self, i: int) -> None:
        """Cut host ``i`` off every other host (see the module docstring)."""
        _ip("-n", self.switch, "link", "set", f"{self.tag}v{i}a", "down")

    def heal(self, i: int) -> None:
        """Undo :meth:`partition`."""
        _ip("-n", self.switch, "link", "set", f"{self.tag}v{i}a", "up")

    def describe(self) -> dict[str, object]:
        return {"n": self.n, "tag": self.tag, "subnet": self.subnet}

    @classmethod
    def attach(cls, desc: dict[str, object]) -> Hosts:
        """The hosts another process built (:meth:`describe`); :meth:`stop` then ends only
        the processes spawned through this handle and deletes no namespace."""
        h = cls(int(desc["n"]))  # type: ignore[call-overload]
        h.tag, h.subnet = str(desc["tag"]), str(desc["subnet"])
        h.switch, h.names = f"{h.tag}sw", [f"{h.tag}h{i}" for i in range(h.n)]
        h.owner = False
        return h

    def start(self) -> Hosts:
        why = available()
        if why is not None:
            raise RuntimeError(why)
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                _ip("netns", "add", name)
                a, b = f"{self.tag}v{i}a", f"{self.tag}v{i}b"
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", a, "netns", self.switch)
                _ip("link", "set", b, "netns", name)
                _ip("-n", self.switch, "link", "set", a, "master", "br0")
                _ip("-n", self.switch, "link", "set", a, "up")
                _ip("-n", name, "link", "set", b, "name", "eth0")
                _ip("-n", name, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"cannot build the namespaces: {' '.join(e.cmd)}: {e.stderr.strip()}") from e
        return self

    def spawn(self, i: int, args: list[str], log: Path, env: dict[str, str] | None = None,
              stdin: int | None = None, stdout: int | None = None) -> subprocess.Popen[bytes]:
        """Run ``args`` inside host ``i`` (stderr, and stdout unless given, to ``log``)."""
        with open(log, "ab") as out:
            p = subprocess.Popen([*self.prefix(i), *args], stdin=stdin,
                                 stdout=stdout if stdout is not None else out, stderr=out,
                                 env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def run(self, i: int, args: list[str], env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside host ``i`` to completion; its output is returned."""
        return subprocess.run([*self.prefix(i), *args], env=env, timeout=timeout,
                              capture_output=True, text=True)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        if not self.owner:
            return
        for name in [*self.names, self.switch]:  # deleting a namespace removes its veth ends
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def __enter__(self) -> Hosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
