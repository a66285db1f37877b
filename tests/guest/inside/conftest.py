"""Inside the qemu guest (collected only there, DABCTL_GUEST=1): a kernel with IPVS, the host's root read-only, the
guest's own /tmp. Backends are TCP and UDP servers bound inside network namespaces, each answering with its own
name; clients connect from another namespace (a host elsewhere), from the node itself, and from a backend's own
namespace (a hairpin). Servers and clients are threads of this process that entered a namespace with setns(2), so
no interpreter is started per request. FORWARD drops by default and has a DOCKER-USER chain, as on a Docker host.

    10.99.1.1 v1 -- p1 10.99.1.2        (namespace n1: backend1)
    10.99.2.1 v2 -- p2 10.99.2.2 .3     (namespace n2: backend2, backend3)
    10.99.3.1 v3 -- p3 10.99.3.2        (namespace n3: a client elsewhere)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from agent.drivers.ipvs import Dest, IpvsNetlink, IpvsRuleset, Service
from agent.drivers.nftables import Nft
from reconcilers.loadbalancer import Backend

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

OWNER = "guest-test"
NODE = "10.99.3.1"  # the node's address as a client elsewhere sees it
BACKENDS = {"n1": ["10.99.1.2"], "n2": ["10.99.2.2", "10.99.2.3"]}
NAMES = {"10.99.1.2": "backend1", "10.99.2.2": "backend2", "10.99.2.3": "backend3"}
PORT = 8080
B1, B2, B3 = (Backend(a, PORT) for a in ("10.99.1.2", "10.99.2.2", "10.99.2.3"))


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def sh_input(text: str, *argv: str) -> None:
    done = subprocess.run(argv, input=text + "\n", capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n{text}")


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """fn() on a thread that entered network namespace `name` (None: the node's own)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            if name is not None:
                fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {name}")
                finally:
                    os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def ask(netns: str | None, address: str, port: int, protocol: str = "tcp", timeout: float = 3) -> str:
    """One request to address:port from namespace `netns`: the name of the backend that answered."""

    def request() -> str:
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(timeout)
            s.connect((address, port))
            s.send(b"who?\n")
            return s.recv(100).decode().strip()

    return in_netns(netns, request)


@dataclass
class Servers:
    """TCP and UDP listeners on every backend address; they answer with the backend's name until closed."""

    sockets: list[socket.socket] = field(default_factory=list)

    def start(self, netns: str, address: str) -> None:
        def bind() -> tuple[socket.socket, socket.socket]:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((address, PORT))
            tcp.listen(16)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((address, PORT))
            return tcp, udp

        tcp, udp = in_netns(netns, bind)
        self.sockets += [tcp, udp]
        name = NAMES[address].encode()
        threading.Thread(target=self._tcp, args=(tcp, name), daemon=True).start()
        threading.Thread(target=self._udp, args=(udp, name), daemon=True).start()

    @staticmethod
    def _tcp(listener: socket.socket, name: bytes) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(name + b"\n")

    @staticmethod
    def _udp(udp: socket.socket, name: bytes) -> None:
        with contextlib.suppress(OSError):
            while True:
                _, peer = udp.recvfrom(100)
                if peer is None:  # shut down
                    return
                udp.sendto(name + b"\n", peer)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture(scope="session")
def network() -> Iterator[None]:
    """The namespaces above, their servers, forwarding on and Docker's FORWARD policy."""
    # One `ip -batch` per namespace and one iptables-restore: every process started costs here.
    node = []
    for i in (1, 2, 3):
        ns = f"n{i}"
        node += [
            f"netns add {ns}",
            f"link add v{i} type veth peer name p{i} netns {ns}",
            f"addr add 10.99.{i}.1/24 dev v{i}",
            f"link set v{i} up",
        ]
    sh_input("\n".join(node), "ip", "-batch", "-")
    for i in (1, 2, 3):
        ns = f"n{i}"
        inside = [f"addr add {a}/24 dev p{i}" for a in BACKENDS.get(ns, [f"10.99.{i}.2"])]
        inside += [f"link set p{i} up", "link set lo up", f"route add default via 10.99.{i}.1"]
        sh_input("\n".join(inside), "ip", "-n", ns, "-batch", "-")
    # What Docker leaves on a node: forwarding on, FORWARD dropping, DOCKER-USER for rules like dabctl's accept.
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")
    docker = ["*filter", ":FORWARD DROP [0:0]", ":DOCKER-USER - [0:0]", "-A DOCKER-USER -j RETURN"]
    sh_input("\n".join([*docker, "-I FORWARD -j DOCKER-USER", "COMMIT"]), "iptables-restore", "--noflush")
    servers = Servers()
    for ns, addresses in BACKENDS.items():
        for address in addresses:
            servers.start(ns, address)
    yield
    servers.close()
    for i in (1, 2, 3):
        sh("ip", "netns", "del", f"n{i}", check=False)


class RecordingNetlink(IpvsNetlink):
    """The real netlink layer, counting the calls that change the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[Any, ...]] = []

    def add_service(self, mark: int, scheduler: str) -> None:
        self.writes.append(("add_service", mark))
        super().add_service(mark, scheduler)

    def set_service(self, mark: int, scheduler: str) -> None:
        self.writes.append(("set_service", mark))
        super().set_service(mark, scheduler)

    def del_service(self, mark: int) -> None:
        self.writes.append(("del_service", mark))
        super().del_service(mark)

    def add_dest(self, mark: int, dest: Dest) -> None:
        self.writes.append(("add_dest", mark, dest))
        super().add_dest(mark, dest)

    def set_dest(self, mark: int, dest: Dest) -> None:
        self.writes.append(("set_dest", mark, dest))
        super().set_dest(mark, dest)

    def del_dest(self, mark: int, dest: Dest) -> None:
        self.writes.append(("del_dest", mark, dest))
        super().del_dest(mark, dest)


class RecordingNft(Nft):
    """The real nft, counting the scripts written."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []

    def nft(self, *args: str, script: str | None = None) -> str:
        if script is not None:
            self.scripts.append(script)
        return super().nft(*args, script=script)


@dataclass
class Rig:
    """The backend under test and the recorders of what it sent."""

    ruleset: IpvsRuleset
    netlink: RecordingNetlink
    nft: RecordingNft


@pytest.fixture()
def ipvs(network: None) -> Iterator[Rig]:
    """The backend on the real kernel; whatever it published is unpublished afterwards."""
    netlink, nft = RecordingNetlink(), RecordingNft()
    backend = Rig(IpvsRuleset(OWNER, netlink=netlink, runner=nft), netlink, nft)
    yield backend
    backend.ruleset.write({}, [])
    netlink.close()


def services() -> dict[int, Service]:
    """Every fwmark service, through a netlink socket of its own."""
    netlink = IpvsNetlink()
    try:
        return {s.mark: s for s in netlink.services()}
    finally:
        netlink.close()


_PROC_SERVICE = re.compile(r"^FWM\s+([0-9A-F]+)\s+(\S+)")
_PROC_DEST = re.compile(r"^\s+->\s+([0-9A-F]{8}):([0-9A-F]{4})\s+(\S+)\s+(\d+)")


def proc_ip_vs() -> dict[int, tuple[str, list[tuple[str, int, str, int]]]]:
    """/proc/net/ip_vs: fwmark -> (scheduler, [(address, port, forwarding, weight)]), addresses in hex decoded."""
    out: dict[int, tuple[str, list[tuple[str, int, str, int]]]] = {}
    mark = None
    with open("/proc/net/ip_vs") as f:
        for line in f:
            if m := _PROC_SERVICE.match(line):
                mark = int(m.group(1), 16)
                out[mark] = (m.group(2), [])
            elif (m := _PROC_DEST.match(line)) and mark is not None:
                address = socket.inet_ntoa(bytes.fromhex(m.group(1)))
                out[mark][1].append((address, int(m.group(2), 16), m.group(3), int(m.group(4))))
            elif line.strip() and not line.startswith((" ", "IP Virtual", "Prot")):
                mark = None  # a service with a virtual address
    return out
