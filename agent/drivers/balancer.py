"""Choosing and opening the routing mesh's backend, and what the node already listens on.

`loadbalancer` in the agent config: `auto` (IPVS where the kernel has it, else nftables), `nftables`, `ipvs` or
`none` (ports are not published).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.drivers.ipvs import IpvsRuleset, ipvs_available
from agent.drivers.nftables import NftRuleset
from reconcilers.loadbalancer import Backend, Balance, BalancerAction, Frontend, LoadBalancerReconciler, Ruleset

# /proc/net/<file>: the socket state that means "bound and waiting" (TCP LISTEN, UDP unconnected)
_LISTENING = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}


def open_balancer(kind: str, owner: str) -> LoadBalancerReconciler | None:
    """The balancer for `kind`, or None when ports are not to be published."""
    if kind == "none":
        return None
    ruleset: Ruleset = (
        IpvsRuleset(owner) if kind == "ipvs" else NftRuleset(owner) if kind == "nftables" else Auto(owner)
    )
    return LoadBalancerReconciler(ruleset)


class Auto:
    """IPVS where the kernel has it, else nftables — decided when a port is first read or written, so that a
    node that publishes nothing never probes (or loads) the ip_vs module."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._chosen: Ruleset | None = None

    @property
    def chosen(self) -> Ruleset:
        if self._chosen is None:
            self._chosen = IpvsRuleset(self.owner) if ipvs_available() else NftRuleset(self.owner)
        return self._chosen

    @property
    def name(self) -> str:
        return self.chosen.name

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        return self.chosen.read()

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        self.chosen.write(desired, actions)


def listening_ports(proc_net: Path = Path("/proc/net")) -> set[tuple[str, int]]:
    """(protocol, port) of every socket a process on this node listens on, on any address."""
    out: set[tuple[str, int]] = set()
    for name, state in _LISTENING.items():
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == state:
                out.add((name.rstrip("6"), int(fields[1].rsplit(":", 1)[1], 16)))
    return out
