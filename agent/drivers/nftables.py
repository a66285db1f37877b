"""The nftables balancer: published ports as DNAT rules in one table that dabctl owns, `ip dabctl`.

Every change rewrites the whole table in a single `nft -f` transaction (delete and re-create are atomic), so the
kernel never holds half a ruleset; reading it back (`nft -j list table`) is the observe step, and a converged
ruleset is never written. Layout:

    map frontends      protocol . port -> jump fe_<proto>_<port>   (from prerouting and output, local addresses only)
    chain fe_<p>_<n>   marks the connection, then dnat to numgen inc mod N map { i : address . port }
    chain postrouting  masquerades marked connections (localhost clients, hairpins, other hosts)
    chain guard        drops 127.0.0.0/8 arriving on other interfaces while route_localnet is on (CVE-2020-8558)

Node settings outside the table, present exactly while a port is published:
- net.ipv4.conf.all.route_localnet=1, so that `localhost:PORT` can be DNATed (restored when the last port goes);
- one accept in Docker's DOCKER-USER chain for connections carrying dabctl's conntrack mark: when dockerd set
  FORWARD's policy to DROP, an accept in another table cannot let forwarded traffic through (seen with 20.10).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconcilers.loadbalancer import Backend, Balance, BalancerAction, BalancerUnavailable, Frontend
from schemas.errors import DabctlError

TABLE = "dabctl"
CT_MARK = 0x00100000  # the conntrack mark bit of connections dabctl balanced
ROUTE_LOCALNET = Path("/proc/sys/net/ipv4/conf/all/route_localnet")
# The one rule outside dabctl's table (in Docker's DOCKER-USER chain): accept connections dabctl balanced.
FORWARD_ACCEPT = (
    *("-m", "connmark", "--mark", f"{CT_MARK:#x}/{CT_MARK:#x}"),
    *("-m", "comment", "--comment", "dabctl routing mesh", "-j", "ACCEPT"),
)
_IDENTITY = re.compile(r"^dabctl stack=(\S+) service=(\S+) target=(\d+)$")
_NODE = re.compile(r"^dabctl owner=(\S+) route_localnet_was=(\d)$")


@dataclass(frozen=True)
class Programmed:
    """The table as read back: the balance, its owner, and the route_localnet value found before dabctl."""

    balance: dict[Frontend, tuple[Backend, ...]]
    owner: str | None
    route_localnet_was: int
    exists: bool = True  # the table is there (with no owner recorded, it is not dabctl's)


class Nft:
    """Runs the `nft` and `iptables` commands; one place to fake in unit tests, one place for their errors."""

    def __init__(self, nft: str = "nft", iptables: str = "iptables") -> None:
        self.nft_path = nft
        self.iptables_path = iptables

    def nft(self, *args: str, script: str | None = None) -> str:
        return self._run([self.nft_path, *args], script, "install nftables (apt-get install nftables)")

    def iptables(self, *args: str) -> tuple[int, str]:
        exe = shutil.which(self.iptables_path)
        if exe is None:
            return 127, f"{self.iptables_path} not found"
        done = subprocess.run([exe, "-w", "5", *args], capture_output=True, text=True, timeout=30, check=False)
        return done.returncode, (done.stdout if done.returncode == 0 else done.stderr or done.stdout).strip()

    def _run(self, argv: list[str], script: str | None, fix: str) -> str:
        exe = shutil.which(argv[0])
        if exe is None:
            raise BalancerUnavailable(f"{argv[0]} not found; {fix}, or set loadbalancer: none")
        done = subprocess.run([exe, *argv[1:]], input=script, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            err = " ".join((done.stderr or done.stdout).split())
            if "Operation not permitted" in err:
                raise BalancerUnavailable(f"{argv[0]}: operation not permitted; run dabctl as root (CAP_NET_ADMIN)")
            raise NftError(err or f"{argv[0]} exited with {done.returncode}")
        return done.stdout


class NftError(DabctlError):
    """nft refused a command."""


def render(balance: Balance, owner: str, route_localnet_was: int, exists: bool = True) -> str:
    """The whole table as an `nft -f` script that replaces the table (when it `exists`) in one transaction."""
    # `add table` first would make the delete safe when the table is gone, but costs ~10 ms in the kernel.
    lines = [f"delete table ip {TABLE}"] if exists else []
    if not balance:
        return "\n".join(lines) + "\n"
    frontends = sorted(balance)
    elements = ", ".join(f"{f.protocol} . {f.port} : jump {frontend_chain(f)}" for f in frontends)
    lines += [
        f"table ip {TABLE} {{",
        "    map frontends {",
        "        type inet_proto . inet_service : verdict",
        f"        elements = {{ {elements} }}",
        "    }",
        "    chain prerouting {",
        "        type nat hook prerouting priority -100; policy accept;",
        "        fib daddr type local meta l4proto . th dport vmap @frontends",
        "    }",
        "    chain output {",
        # nft 1.0.6 refuses the `dstnat` priority keyword on the output hook: -100 is its value.
        "        type nat hook output priority -100; policy accept;",
        "        fib daddr type local meta l4proto . th dport vmap @frontends",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority 100; policy accept;",
        f"        ct mark and {CT_MARK:#x} == {CT_MARK:#x} masquerade",
        "    }",
        *guard_chain(owner, route_localnet_was),
    ]
    for f in frontends:
        backends = balance[f]
        lines += [
            f"    chain {frontend_chain(f)} {{",
            f'        ct mark set ct mark or {CT_MARK:#x} comment "dabctl stack={f.stack} service={f.service} '
            f'target={f.target}"',
        ]
        if backends:
            lines.append(f"        {dnat_rule(f.protocol, backends)}")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def guard_chain(owner: str, route_localnet_was: int) -> list[str]:
    """The chain that drops 127.0.0.0/8 arriving on other interfaces while route_localnet is on; its rule's
    comment names the table's owner and the route_localnet value found before dabctl."""
    return [
        "    chain guard {",
        "        type filter hook prerouting priority -300; policy accept;",
        f'        iifname != "lo" ip daddr 127.0.0.0/8 drop comment "dabctl owner={owner} '
        f'route_localnet_was={route_localnet_was}"',
        "    }",
    ]


def dnat_rule(protocol: str, backends: Sequence[Backend]) -> str:
    """The rule that balances a new connection round robin across `backends` (at least one)."""
    targets = ", ".join(f"{i} : {b.address} . {b.port}" for i, b in enumerate(backends))
    return f"meta l4proto {protocol} dnat ip addr . port to numgen inc mod {len(backends)} map {{ {targets} }}"


def frontend_chain(f: Frontend) -> str:
    """The chain of dabctl's table that handles one published port (both backends name it so)."""
    return f"fe_{f.protocol}_{f.port}"


def parse(listing: Mapping[str, Any]) -> Programmed:
    """The balance in `nft -j list table ip dabctl` output; rules that are not dabctl's shape are ignored."""
    identity: dict[str, tuple[str, str, int]] = {}
    backends: dict[str, tuple[Backend, ...]] = {}
    frontends: dict[str, tuple[str, int]] = {}
    owner: str | None = None
    was = 0
    for item in listing.get("nftables", []):
        if "map" in item and item["map"].get("name") == "frontends":
            for key, verdict in item["map"].get("elem", []):
                proto, port = key["concat"]
                frontends[verdict["jump"]["target"]] = (str(proto), int(port))
        rule = item.get("rule")
        if not rule:
            continue
        comment = rule.get("comment", "")
        if m := _NODE.match(comment):
            owner, was = m.group(1), int(m.group(2))
        elif m := _IDENTITY.match(comment):
            identity[rule["chain"]] = (m.group(1), m.group(2), int(m.group(3)))
        found = dnat_backends(rule)
        if found is not None:
            backends[rule["chain"]] = found
    balance: dict[Frontend, tuple[Backend, ...]] = {}
    for chain, (proto, port) in frontends.items():
        if chain in identity:
            stack, service, target = identity[chain]
            frontend = Frontend(protocol=proto, port=port, stack=stack, service=service, target=target)
            balance[frontend] = backends.get(chain, ())
    return Programmed(balance, owner, was)


def dnat_backends(rule: Mapping[str, Any]) -> tuple[Backend, ...] | None:
    """The backends (sorted) of a `dnat_rule` in `nft -j` output; None when the rule is no such DNAT."""
    for expr in rule.get("expr", []):
        dnat = expr.get("dnat") if isinstance(expr, dict) else None
        if dnat and isinstance(dnat.get("addr"), dict) and "map" in dnat["addr"]:
            pairs = dnat["addr"]["map"]["data"]["set"]
            return tuple(sorted(Backend(str(v["concat"][0]), int(v["concat"][1])) for _, v in pairs))
    return None


class NftRuleset:
    """The Ruleset protocol on nftables (and, for the forward accept, iptables)."""

    name = "nftables"

    def __init__(self, owner: str, runner: Nft | None = None, sysctl: Path = ROUTE_LOCALNET) -> None:
        self.owner = owner
        self.run = runner or Nft()
        self.sysctl = sysctl
        self._seen: Programmed | None = None  # the table as last read or written: a write needs no second read

    def listing(self) -> dict[str, Any] | None:
        """`nft -j list table ip dabctl`, or None when there is no such table."""
        try:
            out = self.run.nft("-j", "list", "table", "ip", TABLE)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise BalancerUnavailable(f"cannot read nftables table ip {TABLE}: {exc}") from None
        listing: dict[str, Any] = json.loads(out)
        return listing

    def programmed(self) -> Programmed:
        listing = self.listing()
        return Programmed({}, None, 0, exists=False) if listing is None else parse(listing)

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        current = self.programmed()
        self._check_owner(current)
        self._seen = current
        return current.balance

    def _check_owner(self, current: Programmed) -> None:
        if current.exists and current.owner is None:
            raise BalancerUnavailable(
                f"a table ip {TABLE} exists that dabctl did not write (it records no owner); remove it "
                f"(nft delete table ip {TABLE}) or set loadbalancer: none"
            )
        if current.owner is not None and current.owner != self.owner:
            raise BalancerUnavailable(
                f"nftables table ip {TABLE} belongs to another dabctl state (owner {current.owner}); "
                "one state log per node publishes ports — stop the other agent or set loadbalancer: none"
            )

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        current = self._seen or self.programmed()
        self._check_owner(current)
        self._seen = None  # until this write is through
        exists = current.exists
        if desired:
            was = current.route_localnet_was if exists else self._route_localnet()
            # The guard is in the table before route_localnet is turned on.
            self._nft_script(render(desired, self.owner, was, exists))
            self._set_route_localnet(1)
            self._forward_accept(add=True)
            self._seen = Programmed(dict(desired), self.owner, was)
        else:
            if exists:
                self._set_route_localnet(current.route_localnet_was)
            self._forward_accept(add=False)
            if exists:
                self._nft_script(render({}, self.owner, 0))
            self._seen = Programmed({}, None, 0, exists=False)

    def _nft_script(self, script: str) -> None:
        try:
            self.run.nft("-f", "-", script=script)
        except NftError as exc:
            raise BalancerUnavailable(f"nft refused dabctl's table: {exc}") from None

    def _route_localnet(self) -> int:
        try:
            return int(self.sysctl.read_text().strip() or 0)
        except OSError:
            return 0

    def _set_route_localnet(self, value: int) -> None:
        if self._route_localnet() != value:
            try:
                self.sysctl.write_text(f"{value}\n")
            except OSError as exc:
                raise BalancerUnavailable(f"cannot set {self.sysctl}: {exc.strerror}") from None

    def _forward_accept(self, add: bool) -> None:
        """The one rule outside dabctl's table: accept marked connections in DOCKER-USER, where Docker has it."""
        rule = ["DOCKER-USER", *FORWARD_ACCEPT]
        code, listing = self.run.iptables("-S", "DOCKER-USER")
        if code != 0:
            return  # no Docker chain (or no iptables): Docker filters nothing, there is nothing to open
        present = '--comment "dabctl routing mesh"' in listing
        if add and not present:
            code, err = self.run.iptables("-I", *rule)
            if code != 0:
                raise BalancerUnavailable(f"cannot add the DOCKER-USER accept for balanced traffic: {err}")
        elif not add and present:
            self.run.iptables("-D", *rule)
