"""A second host for routing-mesh tests: a network namespace joined to a node's namespace by a veth pair.

    with Peer(node_netns="dabctl-1234") as peer:
        peer.node_address      # the node's address on the link, e.g. "10.203.17.1"
        peer.fetch(url)        # HTTP GET from the peer: the body, or None when nothing answered
    # closed: the peer's namespace and the veth pair are gone

`fetch_in(netns, url)` makes the same request from any namespace (the node's own, for localhost), with this
Python, so nothing is installed in the namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import Self

_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run this thread (and the processes it starts) in `netns` for the block, then return to its own.

    For code under test that talks to the kernel itself (sysctls under /proc/sys/net, subprocesses): a
    namespace is per thread, and /proc/sys/net shows the opener's."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's own namespace")
    finally:
        os.close(target)
        os.close(home)


def run_in(netns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command in a named network namespace (nsenter: `ip netns exec` remounts /sys)."""
    return subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{netns}", *argv], capture_output=True, text=True, timeout=timeout
    )


_GET = (
    "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())"
)


def fetch_in(netns: str, url: str, timeout: float = 3) -> str | None:
    """GET `url` from inside `netns`; the body stripped, or None when the request failed."""
    # Python, not busybox: Debian's static busybox wget crashes here (SIGSEGV) even on a loopback address.
    proc = run_in(netns, sys.executable, "-c", _GET, url, str(timeout), timeout=timeout + 10)
    return proc.stdout.strip() if proc.returncode == 0 else None


class Peer:
    """Another host on a point-to-point link to the node (a /30 out of 10.203.0.0/16)."""

    def __init__(self, node_netns: str) -> None:
        self.node_netns = node_netns
        token = secrets.token_hex(3)
        self.netns = f"dabctl-peer-{token}"
        self._node_if, self._peer_if = f"dn{token}", f"dp{token}"
        subnet = secrets.randbelow(16000) * 4
        base = f"10.203.{subnet // 256}.{subnet % 256}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.node_address = f"{prefix}.{last + 1}"
        self.address = f"{prefix}.{last + 2}"
        self._created = False

    def __enter__(self) -> Self:
        try:
            self._ip("netns", "add", self.netns)
            self._created = True
            self._ip("link", "add", self._peer_if, "netns", self.netns, "type", "veth", "peer", "name", self._node_if,
                     "netns", self.node_netns)  # fmt: skip
            self._ip("-n", self.netns, "addr", "add", f"{self.address}/30", "dev", self._peer_if)
            self._ip("-n", self.netns, "link", "set", self._peer_if, "up")
            self._ip("-n", self.netns, "link", "set", "lo", "up")
            self._ip("-n", self.node_netns, "addr", "add", f"{self.node_address}/30", "dev", self._node_if)
            self._ip("-n", self.node_netns, "link", "set", self._node_if, "up")
        except BaseException:
            self.close()
            raise
        return self

    def fetch(self, url: str, timeout: float = 3) -> str | None:
        return fetch_in(self.netns, url, timeout)

    def close(self) -> None:
        """Remove the namespace; its end of the veth pair takes the node's end with it."""
        if self._created:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, check=False)
            self._created = False
        subprocess.run(["ip", "-n", self.node_netns, "link", "delete", self._node_if], capture_output=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _ip(*args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
