"""Lease keepalives under CPU load: what the default lease TTL has to survive.

A real etcd (single member on loopback, tests/support/etcd.py) and, beside it, `--burners` processes that spin
the CPU (the machine has 2 cores). For each TTL in `--ttls`, one `Member` (agent/node/membership.py: the agent's
own code, keepalive every TTL/3) runs for `--seconds`, all at the same time. Each keepalive call is timed (latency)
and so is the gap between the starts of two consecutive keepalives (the interval plus scheduling delay). The
margin is the TTL minus the longest time between two successful renewals: how close the lease came to lapsing.
A lease loss (keepalive found the lease gone) is a flap: the node would have been `down` while alive.

    .venv/bin/python bench/lease.py [--seconds 120] [--burners 4] [--ttls 2,3,6]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/lease.py from the repo root

from agent.node.membership import Member
from agent.state.etcd import EtcdStateLog
from agent.state.records import Records
from schemas.state import NodeStatus
from tests.support.etcd import EtcdServer
from tests.support.nodes import add_node, make_cluster


def burn() -> None:
    x = 0
    while True:
        x = (x * 31 + 7) % 1_000_003


class Timed(EtcdStateLog):
    """The etcd log with every keepalive's start and duration recorded."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[float, float, bool]] = []

    def keepalive(self, lease: int) -> int:
        start = time.monotonic()
        ttl = super().keepalive(lease)
        self.calls.append((start, time.monotonic() - start, ttl > 0))
        return ttl


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--burners", type=int, default=4)
    parser.add_argument("--ttls", default="2,3,6")
    args = parser.parse_args()
    ttls = [int(t) for t in args.ttls.split(",")]
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}, {args.burners} burners, "
          f"{args.seconds:.0f} s", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, EtcdServer(Path(tmp)) as etcd:
        burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
        for p in burners:
            p.start()
        runs = []
        try:
            for ttl in ttls:
                log = Timed([etcd.url], prefix=f"/bench-{ttl}")
                make_cluster(log, lease_ttl=ttl)
                nid = add_node(log, f"n{ttl}", role="manager")
                m = Member(log, node_id=nid, name=f"n{ttl}", status=functools.partial(NodeStatus, node_id=nid),
                           records=Records(log))  # fmt: skip
                m.register()
                m.start()
                runs.append((ttl, log, m))
            time.sleep(args.seconds)
            load = os.getloadavg()[0]
        finally:
            for _, log, m in runs:
                m.close()
                log.close()
            for p in burners:
                p.kill()
    print(f"load average at end {load:.1f}\n")
    print("| TTL | keepalive every | calls | latency p50 / p99 / max | gap p50 / p99 / max | margin (TTL - longest "
          "renewal gap) | lease losses |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for ttl, log, m in runs:
        starts = [c[0] for c in log.calls]
        lat = [c[1] * 1000 for c in log.calls]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        ok = [c[0] + c[1] for c in log.calls if c[2]]
        renew_gaps = [b - a for a, b in itertools.pairwise(ok)]
        print(
            f"| {ttl} s | {ttl / 3:.2f} s | {len(lat)} | {statistics.median(lat):.1f} / {pct(lat, 0.99):.1f} / "
            f"{max(lat):.1f} ms | {statistics.median(gaps):.2f} / {pct(gaps, 0.99):.2f} / {max(gaps):.2f} s | "
            f"{ttl - max(renew_gaps):.2f} s | {m.lease_losses} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
