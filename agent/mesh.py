"""Choosing and opening the routing mesh's backend, and what the node already listens on.

`loadbalancer` in the agent config: `auto` (IPVS where the kernel has it, else nftables), `nftables`, `ipvs` or
`none` (ports are not published).
"""

from __future__ import annotations

from pathlib import Path

from agent.nftables import NftRuleset
from reconcilers.loadbalancer import LoadBalancerReconciler, Ruleset

# /proc/net/<file>: the socket state that means "bound and waiting" (TCP LISTEN, UDP unconnected)
_LISTENING = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}


def open_balancer(kind: str, owner: str) -> LoadBalancerReconciler | None:
    """The balancer for `kind`, or None when ports are not to be published."""
    if kind == "none":
        return None
    ruleset: Ruleset = NftRuleset(owner)
    return LoadBalancerReconciler(ruleset)


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
