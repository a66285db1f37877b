"""The IPVS balancer: published ports as IPVS fwmark services, changed over netlink (pyroute2) one difference at a
time, with the marks set in dabctl's nftables table.

The kernel balances (round robin, masquerade/NAT forwarding); nftables only says which packets are whose:

    map frontends      protocol . port -> jump fe_<proto>_<port>   (from prerouting and output, to local addresses
                                                                   other than 127.0.0.0/8)
    chain fe_<p>_<n>   meta mark set <the frontend's mark>, ct mark |= CT_MARK   (every packet, mangle priority)
    chain postrouting  masquerades marked connections (hairpins, other hosts); its comment names the owner

A frontend's mark is a function of its protocol and port, `0x0DA<proto><port:04x>` (`mark_of`), so the marks need
no allocation and the range 0x0DA00000-0x0DAFFFFF is dabctl's: IPVS services with other marks, or with virtual
addresses, are never read, changed or removed. The table is the one the nftables backend owns (`ip dabctl`),
written whole the same way (one `nft -f`), so either backend replaces the other's layout; stack, service and
target port live in the mark rules' comments. The table is rewritten only when the set of frontends changes: a
change of backends is a few netlink messages, and a write that changes nothing sends none.

Node settings: the DOCKER-USER accept, as in the nftables backend, and net.ipv4.vs.conntrack=1, so that IPVS keeps
conntrack entries and the postrouting masquerade applies to the connections it forwards (kube-proxy's IPVS mode
does the same; left on, as other IPVS users need it too). Not route_localnet: IPVS drops a connection from a
loopback source to a backend elsewhere whatever that setting says (seen on Debian's 6.1 kernel; kube-proxy's IPVS
mode has the same limit), so `localhost:PORT` is not published, and 127.0.0.0/8 is left unmarked for the client
to get a prompt "connection refused" rather than a hang. A table in the nftables layout had turned it on: taking
the table over restores the value recorded before dabctl. Clients on other hosts and in containers need
ip_forward=1, which Docker sets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.nftables import CT_MARK, ROUTE_LOCALNET, TABLE, Nft, NftError, NftRuleset, Programmed, parse
from reconcilers.loadbalancer import Backend, Balance, BalancerAction, BalancerUnavailable, Frontend

MARK_BASE = 0x0DA00000
MARK_MASK = 0xFFF00000  # the top 12 bits say "dabctl"; the rest is protocol (4 bits) and port (16 bits)
PROTOCOLS = {"tcp": 1, "udp": 2, "sctp": 3}
SCHEDULER = "rr"
WEIGHT = 1  # every replica alike; weight 0 is a drained one (no new connections, established ones continue)
PROC_IPVS = Path("/proc/net/ip_vs")
VS_CONNTRACK = Path("/proc/sys/net/ipv4/vs/conntrack")
_NAMES = {v: k for k, v in PROTOCOLS.items()}


def mark_of(protocol: str, port: int) -> int:
    """The firewall mark of a published port: in dabctl's range, one per (protocol, port)."""
    return MARK_BASE | PROTOCOLS[protocol] << 16 | port


def address_of(mark: int) -> tuple[str, int] | None:
    """The (protocol, port) a mark of dabctl's range stands for; None for any other mark."""
    if mark & MARK_MASK != MARK_BASE or (mark >> 16) & 0xF not in _NAMES or not mark & 0xFFFF:
        return None
    return (_NAMES[(mark >> 16) & 0xF], mark & 0xFFFF)


def ipvs_available(proc: Path = PROC_IPVS) -> bool:
    """Whether this kernel has IPVS: its /proc file exists, or loading the ip_vs module makes it appear."""
    if proc.exists():
        return True
    try:
        subprocess.run(["modprobe", "-q", "ip_vs"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.exists()


# --- the netlink layer ----------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Dest:
    """A real server of an IPVS service, as IPVS holds it."""

    address: str
    port: int
    weight: int = WEIGHT


@dataclass(frozen=True)
class Service:
    """An IPVS fwmark service and its real servers."""

    mark: int
    scheduler: str
    dests: tuple[Dest, ...]


class Netlink(Protocol):
    """The IPVS operations this backend uses: the one place a unit test fakes."""

    def services(self) -> list[Service]:
        """Every IPVS fwmark service with its dests (services with a virtual address are left out)."""
        ...

    def add_service(self, mark: int, scheduler: str) -> None: ...

    def set_service(self, mark: int, scheduler: str) -> None: ...

    def del_service(self, mark: int) -> None: ...

    def add_dest(self, mark: int, dest: Dest) -> None: ...

    def set_dest(self, mark: int, dest: Dest) -> None: ...

    def del_dest(self, mark: int, dest: Dest) -> None: ...


class IpvsNetlink:
    """`Netlink` on the kernel's IPVS generic-netlink family, through pyroute2 (one socket, opened on first use)."""

    def __init__(self) -> None:
        self._socket: Any = None

    def _ipvs(self) -> Any:
        if self._socket is None:
            try:
                from pyroute2 import IPVS

                self._socket = IPVS()
            except ImportError:
                raise BalancerUnavailable("pyroute2 is not installed; pip install 'pyroute2>=0.9'") from None
            except Exception as exc:
                code = getattr(exc, "code", None)  # pyroute2's NetlinkError carries the errno
                found = os.strerror(code) if isinstance(code, int) else str(exc)
                why = f"IPVS is not available in this kernel (its netlink family: {found}); use loadbalancer: nftables"
                raise BalancerUnavailable(why) from None
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @staticmethod
    def _service(mark: int, scheduler: str | None = None) -> Any:
        from pyroute2 import IPVSService

        if scheduler is None:
            return IPVSService(fwmark=mark, af=socket.AF_INET)
        # The kernel wants a netmask for every new service; pyroute2 adds one only for a virtual address.
        return IPVSService(fwmark=mark, af=socket.AF_INET, sched_name=scheduler, netmask="255.255.255.255")

    @staticmethod
    def _dest(dest: Dest) -> Any:
        from pyroute2 import IPVSDest

        # fwd_method 0 is masquerade (NAT); pyroute2's default, 3, is direct routing.
        return IPVSDest(addr=dest.address, port=dest.port, weight=dest.weight, fwd_method=0)

    def services(self) -> list[Service]:
        found = []
        ipvs = self._ipvs()
        for msg in ipvs.service("dump"):
            attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            mark = attrs.get_attr("IPVS_SVC_ATTR_FWMARK") or 0
            if not mark or attrs.get_attr("IPVS_SVC_ATTR_AF") != socket.AF_INET:
                continue
            dests = []
            for d in ipvs.dest("dump", service=self._service(mark)):
                dattrs = d.get_attr("IPVS_CMD_ATTR_DEST")
                dests.append(
                    Dest(
                        str(dattrs.get_attr("IPVS_DEST_ATTR_ADDR")),
                        int(dattrs.get_attr("IPVS_DEST_ATTR_PORT")),
                        int(dattrs.get_attr("IPVS_DEST_ATTR_WEIGHT")),
                    )
                )
            found.append(Service(int(mark), str(attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME")), tuple(sorted(dests))))
        return found

    def add_service(self, mark: int, scheduler: str) -> None:
        self._send(f"add service fwmark {mark:#010x} ({scheduler})", "service", "add", self._service(mark, scheduler))

    def set_service(self, mark: int, scheduler: str) -> None:
        self._send(f"set service fwmark {mark:#010x} ({scheduler})", "service", "set", self._service(mark, scheduler))

    def del_service(self, mark: int) -> None:
        self._send(f"delete service fwmark {mark:#010x}", "service", "del", self._service(mark))

    def add_dest(self, mark: int, dest: Dest) -> None:
        self._send(f"add {dest.address}:{dest.port} to fwmark {mark:#010x}", "dest", "add", self._service(mark), dest)

    def set_dest(self, mark: int, dest: Dest) -> None:
        what = f"set weight {dest.weight} of {dest.address}:{dest.port} in fwmark {mark:#010x}"
        self._send(what, "dest", "set", self._service(mark), dest)

    def del_dest(self, mark: int, dest: Dest) -> None:
        self._send(
            f"remove {dest.address}:{dest.port} from fwmark {mark:#010x}", "dest", "del", self._service(mark), dest
        )

    def _send(self, what: str, kind: str, command: str, service: Any, dest: Dest | None = None) -> None:
        ipvs = self._ipvs()
        try:
            if kind == "service":
                ipvs.service(command, service=service)
            else:
                ipvs.dest(command, service=service, dest=self._dest(dest) if dest else None)
        except Exception as exc:
            code = getattr(exc, "code", None)  # pyroute2's NetlinkError carries the errno
            raise IpvsError(f"{what}: {os.strerror(code) if isinstance(code, int) else exc}") from None


class IpvsError(Exception):
    """The kernel refused an IPVS change; the message says which."""


# --- the nft table: marks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkTable:
    """dabctl's table as read back: frontends whose chain sets their mark (no backends: those are IPVS's), the
    owner and route_localnet value recorded, and whether the nftables layout's guard is there (route_localnet on)."""

    programmed: Programmed
    guarded: bool


def render_marks(frontends: Iterable[Frontend], owner: str, route_localnet_was: int) -> str:
    """dabctl's table for the IPVS backend as an `nft -f` script that replaces whatever table was there."""
    lines = [f"add table ip {TABLE}", f"delete table ip {TABLE}"]
    chosen = sorted(frontends)
    if not chosen:
        return "\n".join(lines) + "\n"
    elements = ", ".join(f"{f.protocol} . {f.port} : jump {_chain(f)}" for f in chosen)
    # IPVS looks marks up at local-in (clients elsewhere) and at local-out priority -99 (this node's own clients):
    # they are set before both, at mangle priority, on every packet.
    select = "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @frontends"
    lines += [
        f"table ip {TABLE} {{",
        "    map frontends {",
        "        type inet_proto . inet_service : verdict",
        f"        elements = {{ {elements} }}",
        "    }",
        "    chain prerouting {",
        "        type filter hook prerouting priority -150; policy accept;",
        f"        {select}",
        "    }",
        "    chain output {",
        "        type route hook output priority -150; policy accept;",
        f"        {select}",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority 100; policy accept;",
        f'        ct mark and {CT_MARK:#x} == {CT_MARK:#x} masquerade comment "dabctl owner={owner} '
        f'route_localnet_was={route_localnet_was}"',
        "    }",
    ]
    for f in chosen:
        lines += [
            f"    chain {_chain(f)} {{",
            f"        meta mark set {mark_of(f.protocol, f.port):#010x} ct mark set ct mark or {CT_MARK:#x} "
            f'comment "dabctl stack={f.stack} service={f.service} target={f.target}"',
            "    }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _chain(f: Frontend) -> str:
    return f"fe_{f.protocol}_{f.port}"


def marked(listing: Mapping[str, Any]) -> MarkTable:
    """dabctl's table in `nft -j list table ip dabctl` output, read for the IPVS backend: a table in the nftables
    backend's layout (DNAT, no marks) has no frontends here."""
    marks: dict[str, int] = {}
    guarded = False
    for item in listing.get("nftables", []):
        if item.get("chain", {}).get("name") == "guard":
            guarded = True
        rule = item.get("rule")
        for expr in rule.get("expr", []) if rule else []:
            mangle = expr.get("mangle") if isinstance(expr, dict) else None
            if mangle and mangle.get("key") == {"meta": {"key": "mark"}} and isinstance(mangle.get("value"), int):
                marks[rule["chain"]] = mangle["value"]
    table = parse(listing)
    frontends: dict[Frontend, tuple[Backend, ...]] = {
        f: () for f in table.balance if f.protocol in PROTOCOLS and marks.get(_chain(f)) == mark_of(f.protocol, f.port)
    }
    return MarkTable(Programmed(frontends, table.owner, table.route_localnet_was), guarded)


# --- the Ruleset ------------------------------------------------------------------------------------------------


class IpvsRuleset(NftRuleset):
    """The Ruleset protocol on IPVS (over netlink), with the marks in dabctl's nft table.

    It shares the nftables backend's table and its node settings (owner check, route_localnet, DOCKER-USER accept),
    hence the subclass; programmed() is that backend's reading, table() this one's."""

    name = "ipvs"

    def __init__(
        self,
        owner: str,
        netlink: Netlink | None = None,
        runner: Nft | None = None,
        sysctl: Path = ROUTE_LOCALNET,
        vs_conntrack: Path = VS_CONNTRACK,
    ) -> None:
        super().__init__(owner, runner, sysctl)
        self.netlink: Netlink = netlink or IpvsNetlink()
        self.vs_conntrack = vs_conntrack

    def table(self) -> MarkTable:
        """dabctl's nft table as this backend reads it."""
        try:
            out = self.run.nft("-j", "list", "table", "ip", TABLE)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return MarkTable(Programmed({}, None, 0), False)
            raise BalancerUnavailable(f"cannot read nftables table ip {TABLE}: {exc}") from None
        return marked(json.loads(out))

    def owned(self) -> dict[int, Service]:
        """dabctl's IPVS services (marks in its range), by mark."""
        try:
            return {s.mark: s for s in self.netlink.services() if address_of(s.mark) is not None}
        except BalancerUnavailable:
            raise
        except Exception as exc:
            raise BalancerUnavailable(f"cannot read IPVS services: {exc}") from None

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        """Frontends marked in the table that have an IPVS service, with the dests taking new connections."""
        current = self.table().programmed
        self._check_owner(current)
        services = self.owned()
        balance: dict[Frontend, tuple[Backend, ...]] = {}
        for f in current.balance:
            service = services.get(mark_of(f.protocol, f.port))
            if service is not None:
                balance[f] = tuple(sorted(Backend(d.address, d.port) for d in service.dests if d.weight > 0))
        return balance

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        """Services first, then the marks that lead to them; on the way out, marks first, then services. Only
        differences are sent: a write that changes nothing changes nothing."""
        table = self.table()
        current = table.programmed
        self._check_owner(current)
        live = self.owned()
        wanted = {mark_of(f.protocol, f.port): backends for f, backends in desired.items()}
        try:
            if desired:
                self._set_vs_conntrack()
            for mark, backends in sorted(wanted.items()):
                self._converge_service(mark, backends, live.get(mark))
            if set(current.balance) != set(desired) or current.owner != (self.owner if desired else None):
                was = current.route_localnet_was if current.owner else self._route_localnet()
                if table.guarded:
                    # The nftables layout turned route_localnet on; its guard goes with the table.
                    self._set_route_localnet(was)
                self._nft_script(render_marks(desired, self.owner, was))
            for mark in sorted(set(live) - set(wanted)):
                self.netlink.del_service(mark)
        except BalancerUnavailable:
            raise
        except Exception as exc:
            raise BalancerUnavailable(f"IPVS refused a change: {exc}") from None
        self._forward_accept(add=bool(desired))

    def drain(self, frontend: Frontend, backends: Iterable[Backend]) -> None:
        """Give `backends` of `frontend` weight 0: no new connections, established ones go on until the
        backend goes. read() leaves drained backends out, so the plan puts them back if they are still wanted."""
        mark = mark_of(frontend.protocol, frontend.port)
        service = self.owned().get(mark)
        if service is None:
            return
        doomed = {(b.address, b.port) for b in backends}
        for d in service.dests:
            if (d.address, d.port) in doomed and d.weight != 0:
                self.netlink.set_dest(mark, Dest(d.address, d.port, 0))

    def _converge_service(self, mark: int, backends: tuple[Backend, ...], service: Service | None) -> None:
        want = {(b.address, b.port) for b in backends}
        if service is None:
            self.netlink.add_service(mark, SCHEDULER)
            have: dict[tuple[str, int], Dest] = {}
        else:
            if service.scheduler != SCHEDULER:
                self.netlink.set_service(mark, SCHEDULER)
            have = {(d.address, d.port): d for d in service.dests}
        # New backends take traffic before old ones stop taking it.
        for address, port in sorted(want):
            d = have.get((address, port))
            if d is None:
                self.netlink.add_dest(mark, Dest(address, port))
            elif d.weight != WEIGHT:
                self.netlink.set_dest(mark, Dest(address, port))
        for key in sorted(set(have) - want):
            self.netlink.del_dest(mark, have[key])

    def _set_vs_conntrack(self) -> None:
        try:
            if self.vs_conntrack.read_text().strip() != "1":
                self.vs_conntrack.write_text("1\n")
        except OSError as exc:
            raise BalancerUnavailable(f"cannot set {self.vs_conntrack}: {exc.strerror}") from None
