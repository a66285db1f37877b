"""The IPVS balancer: published ports as IPVS fwmark services, changed over netlink (pyroute2) one difference at a
time, with the marks set in dabctl's nftables table, and `localhost` DNATed by that table to the same backends.

The kernel balances (round robin, masquerade/NAT forwarding); nftables only says which packets are whose:

    map frontends      protocol . port -> jump fe_<proto>_<port>   (from prerouting and output, to local addresses
                                                                   other than 127.0.0.0/8)
    chain fe_<p>_<n>   meta mark set <the frontend's mark>, ct mark |= CT_MARK   (every packet, mangle priority)
    map local          protocol . port -> jump lo_<proto>_<port>   (from output, to 127.0.0.0/8; nat priority)
    chain lo_<p>_<n>   ct mark |= CT_MARK, then dnat to numgen inc mod N map { i : address . port }
    chain postrouting  masquerades marked connections (loopback sources, hairpins, other hosts)
    chain guard        drops 127.0.0.0/8 arriving on other interfaces while route_localnet is on (CVE-2020-8558);
                       its comment names the owner

Why two ways: IPVS drops a connection from a loopback source to a backend elsewhere whatever route_localnet says
(seen in the qemu guest on Debian's 6.1 kernel; kube-proxy's IPVS mode has the same limit), so 127.0.0.0/8 is
left unmarked and balanced the nftables backend's way instead (`nftables.dnat_rule`), over the backends its IPVS
service takes new connections on.

A frontend's mark is a function of its protocol and port, `0x0DA<proto><port:04x>` (`mark_of`), so the marks need
no allocation and the range 0x0DA00000-0x0DAFFFFF is dabctl's: IPVS services with other marks, or with virtual
addresses, are never read, changed or removed. The table is the one the nftables backend owns (`ip dabctl`),
written whole the same way (one `nft -f`), so either backend replaces the other's layout; stack, service and
target port live in the mark rules' comments. The table is rewritten when its frontends or their localhost
backends change: a change of backends is a few netlink messages and one `nft -f`, and a write that changes
nothing sends neither. read() reports a frontend only where its IPVS service and its localhost chain agree.

Node settings, exactly while a port is published, as in the nftables backend: net.ipv4.conf.all.route_localnet=1
(the value found before dabctl, recorded in the guard's comment, comes back with the last port) and the
DOCKER-USER accept. Besides, net.ipv4.vs.conntrack=1, so that IPVS keeps conntrack entries and the postrouting
masquerade applies to the connections it forwards (kube-proxy's IPVS mode does the same; left on, as other IPVS
users need it too). Clients on other hosts and in containers need ip_forward=1, which Docker sets.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.drivers.nftables import (
    CT_MARK,
    ROUTE_LOCALNET,
    TABLE,
    Nft,
    NftRuleset,
    Programmed,
    dnat_backends,
    dnat_rule,
    frontend_chain,
    guard_chain,
    parse,
)
from reconcilers.loadbalancer import Backend, Balance, BalancerAction, BalancerUnavailable, Frontend
from schemas.errors import DabctlError

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


class IpvsError(DabctlError):
    """The kernel refused an IPVS change; the message says which."""


# --- the nft table: marks, and DNAT for localhost ---------------------------------------------------------------


@dataclass(frozen=True)
class MarkTable:
    """dabctl's table as read back for the IPVS backend: the frontends whose chain sets their mark, each with the
    backends its localhost chain balances to; the owner and route_localnet value recorded; whether the guard is
    there; whether there is a table at all."""

    programmed: Programmed
    guarded: bool
    exists: bool


NO_TABLE = MarkTable(Programmed({}, None, 0, exists=False), guarded=False, exists=False)


def render_marks(balance: Balance, owner: str, route_localnet_was: int, exists: bool = True) -> str:
    """dabctl's table for the IPVS backend as an `nft -f` script that replaces the table (when it `exists`) in one
    transaction."""
    lines = [f"delete table ip {TABLE}"] if exists else []
    chosen = sorted(balance)
    if not chosen:
        return "\n".join(lines) + "\n"
    # IPVS looks marks up at local-in (clients elsewhere) and at local-out priority -99 (this node's own clients):
    # they are set before both, at mangle priority, on every packet.
    select = "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @frontends"
    lines += [
        f"table ip {TABLE} {{",
        *_verdict_map("frontends", chosen, frontend_chain),
        *_verdict_map("local", chosen, _local_chain),
        "    chain prerouting {",
        "        type filter hook prerouting priority -150; policy accept;",
        f"        {select}",
        "    }",
        "    chain output {",
        "        type route hook output priority -150; policy accept;",
        f"        {select}",
        "    }",
        # IPVS cannot forward a loopback source: localhost is DNATed, as the nftables backend does it.
        "    chain localhost {",
        "        type nat hook output priority -100; policy accept;",
        "        ip daddr 127.0.0.0/8 meta l4proto . th dport vmap @local",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority 100; policy accept;",
        f"        ct mark and {CT_MARK:#x} == {CT_MARK:#x} masquerade",
        "    }",
        *guard_chain(owner, route_localnet_was),
    ]
    for f in chosen:
        lines += [
            f"    chain {frontend_chain(f)} {{",
            f"        meta mark set {mark_of(f.protocol, f.port):#010x} ct mark set ct mark or {CT_MARK:#x} "
            f'comment "dabctl stack={f.stack} service={f.service} target={f.target}"',
            "    }",
            f"    chain {_local_chain(f)} {{",
            f"        ct mark set ct mark or {CT_MARK:#x}",
        ]
        if balance[f]:
            lines.append(f"        {dnat_rule(f.protocol, balance[f])}")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _verdict_map(name: str, frontends: Sequence[Frontend], chain: Callable[[Frontend], str]) -> list[str]:
    elements = ", ".join(f"{f.protocol} . {f.port} : jump {chain(f)}" for f in frontends)
    return [
        f"    map {name} {{",
        "        type inet_proto . inet_service : verdict",
        f"        elements = {{ {elements} }}",
        "    }",
    ]


def _local_chain(f: Frontend) -> str:
    return f"lo_{f.protocol}_{f.port}"


def marked(listing: Mapping[str, Any]) -> MarkTable:
    """dabctl's table in `nft -j list table ip dabctl` output, read for the IPVS backend: a table in the nftables
    backend's layout (DNAT, no marks) has no frontends here."""
    marks: dict[str, int] = {}
    local: dict[str, tuple[Backend, ...]] = {}
    guarded = False
    for item in listing.get("nftables", []):
        if item.get("chain", {}).get("name") == "guard":
            guarded = True
        rule = item.get("rule")
        if not rule:
            continue
        for expr in rule.get("expr", []):
            mangle = expr.get("mangle") if isinstance(expr, dict) else None
            if mangle and mangle.get("key") == {"meta": {"key": "mark"}} and isinstance(mangle.get("value"), int):
                marks[rule["chain"]] = mangle["value"]
        backends = dnat_backends(rule)
        if backends is not None:
            local[rule["chain"]] = backends
    table = parse(listing)
    frontends = {
        f: local.get(_local_chain(f), ())
        for f in table.balance
        if f.protocol in PROTOCOLS and marks.get(frontend_chain(f)) == mark_of(f.protocol, f.port)
    }
    return MarkTable(Programmed(frontends, table.owner, table.route_localnet_was), guarded, exists=True)


# --- the Ruleset ------------------------------------------------------------------------------------------------


class IpvsRuleset(NftRuleset):
    """The Ruleset protocol on IPVS (over netlink), with the marks and the localhost DNAT in dabctl's nft table.

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
        self._table: MarkTable | None = None  # the table as last read or written: a write needs no second read

    def table(self) -> MarkTable:
        """dabctl's nft table as this backend reads it."""
        listing = self.listing()
        return NO_TABLE if listing is None else marked(listing)

    def owned(self) -> dict[int, Service]:
        """dabctl's IPVS services (marks in its range), by mark."""
        try:
            return {s.mark: s for s in self.netlink.services() if address_of(s.mark) is not None}
        except BalancerUnavailable:
            raise
        except Exception as exc:
            raise BalancerUnavailable(f"cannot read IPVS services: {exc}") from None

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        """Frontends marked in the table whose IPVS service takes new connections on the backends their localhost
        chain balances to: those backends. A frontend where the two disagree (a crash between the steps of a
        write) is left out, so the plan publishes it again and the write makes them agree."""
        table = self.table()
        self._check_owner(table.programmed)
        self._table = table
        services = self.owned()
        balance: dict[Frontend, tuple[Backend, ...]] = {}
        for f, local in table.programmed.balance.items():
            service = services.get(mark_of(f.protocol, f.port))
            if service is not None and _taking(service) == local:
                balance[f] = local
        return balance

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        """Services first, then the table that leads to them; on the way out, the table first, then services.
        Only differences are sent: IPVS gets the changed services and dests, and the table is rewritten when its
        frontends or their localhost backends change. A write that changes nothing sends nothing."""
        table = self._table or self.table()
        current = table.programmed
        self._check_owner(current)
        self._table = None  # until this write is through
        live = self.owned()
        wanted = {mark_of(f.protocol, f.port): backends for f, backends in desired.items()}
        was = current.route_localnet_was if current.owner else self._route_localnet()
        want = {f: tuple(sorted(backends)) for f, backends in desired.items()}
        stale = current.balance != want or current.owner != self.owner or not table.guarded
        try:
            if desired:
                self._set_vs_conntrack()
            for mark, backends in sorted(wanted.items()):
                self._converge_service(mark, backends, live.get(mark))
            if desired:
                if stale:
                    # The guard is in the table before route_localnet is turned on.
                    self._nft_script(render_marks(want, self.owner, was, table.exists))
                self._set_route_localnet(1)
            elif current.owner:
                self._set_route_localnet(was)
                self._nft_script(render_marks({}, self.owner, was))
            for mark in sorted(set(live) - set(wanted)):
                self.netlink.del_service(mark)
        except BalancerUnavailable:
            raise
        except Exception as exc:
            raise BalancerUnavailable(f"IPVS refused a change: {exc}") from None
        self._forward_accept(add=bool(desired))
        if desired:
            self._table = MarkTable(Programmed(want, self.owner, was), guarded=True, exists=True)
        elif current.owner or not table.exists:
            self._table = NO_TABLE

    # Not called by a pass yet: weight 0 is how a VIP's backends will drain on IPVS.
    def drain(self, frontend: Frontend, backends: Iterable[Backend]) -> None:
        """Give `backends` of `frontend` weight 0 and take them out of its localhost chain: no new connections,
        established ones go on until the backend goes. read() leaves drained backends out, so the plan puts them
        back if they are still wanted."""
        table = self._table or self.table()
        self._check_owner(table.programmed)
        mark = mark_of(frontend.protocol, frontend.port)
        service = self.owned().get(mark)
        if service is None:
            return
        doomed = {(b.address, b.port) for b in backends}
        for d in service.dests:
            if (d.address, d.port) in doomed and d.weight != 0:
                self.netlink.set_dest(mark, Dest(d.address, d.port, 0))
        local = table.programmed.balance.get(frontend)
        if local is None or not doomed & {(b.address, b.port) for b in local}:
            return
        balance = dict(table.programmed.balance)
        balance[frontend] = tuple(b for b in local if (b.address, b.port) not in doomed)
        was = table.programmed.route_localnet_was
        self._table = None
        self._nft_script(render_marks(balance, self.owner, was, table.exists))
        self._table = MarkTable(Programmed(balance, self.owner, was), guarded=True, exists=True)

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


def _taking(service: Service) -> tuple[Backend, ...]:
    """The dests of `service` that take new connections, as backends (sorted)."""
    return tuple(sorted(Backend(d.address, d.port) for d in service.dests if d.weight > 0))
