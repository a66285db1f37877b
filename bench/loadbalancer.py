"""Routing-mesh programming benchmark: dabctl's nftables table against kube-proxy's classic iptables-restore.

For N backends (10, 100, 1,000), split over one frontend and over N/10 frontends (10 backends each), this times
three operations per contender, interleaved run by run (the contender that goes first alternates):

- program: from nothing to the whole balance, in one transaction;
- change one backend: one backend of the first frontend replaced by another address;
- read: the observe step.

Contenders:

- dabctl: `NftRuleset(owner).write(desired, plan(desired, actual))` and `NftRuleset.read()` -- the product's
  own path: it reads the table first (owner check), renders, runs one `nft -f` (the table deleted and re-created
  in one transaction, whatever changed), sets net.ipv4.conf.all.route_localnet and checks/inserts its accept in
  iptables' DOCKER-USER (absent in a fresh namespace: `-C` and `-I` both fail with "No chain", which the code
  accepts, so every write runs two iptables processes). A breakdown of each write by command is printed.
- nft -f (bare): the script `render()` produced (rendered before the clock starts) piped to `nft -f -`: the floor
  of dabctl's approach, comparable command for command with the peer.
- kube-proxy classic (the peer): the nat table as kube-proxy's iptables proxier writes it on every full sync --
  KUBE-SERVICES -> KUBE-NODEPORTS -> KUBE-SVC-<hash> with `-m statistic --mode random --probability 1/(n-i)`
  jumps -> KUBE-SEP-<hash> (masquerade mark + DNAT) -- loaded with `iptables-restore --noflush`; on a change the
  whole set of service chains is declared (flushed) and written again, and the stale endpoint chain is deleted
  (`-X`), as kube-proxy does without its newer partial syncs (MinimizeIPTablesRestore, 1.26+). The jumps from the
  built-in chains, which kube-proxy ensures with separate `iptables -C`/`-I` calls on every sync, are written
  once in the program step and are not timed on a change (in the peer's favour). Its read is
  `iptables-save -t nat`, not parsed.

Timing: wall clock per operation, from before the call (or the process launch) to its return; median of the runs,
min-max in brackets. Correctness is checked after every timed write, untimed: `NftRuleset.read()` must equal the
balance written; `iptables-save -t nat` must hold exactly the number of rules written.

Everything runs inside a throw-away network namespace (`ip netns add`; this process enters it with setns(2), so
its `nft`/`iptables` children and the route_localnet sysctl are the namespace's), deleted at the end, also on
failure, Ctrl-C or SIGTERM. The host's ruleset is never touched; the script checks that it is in the namespace
before the first write. No Docker engine is needed: backends are just addresses (10.250.x.y:8080).

    sudo .venv/bin/python bench/loadbalancer.py [--sizes 10,100,1000] [--runs 9] [--per-frontend 10]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, machine, median, print_table  # also puts the repo root on sys.path

from agent.drivers.nftables import TABLE, Nft, NftRuleset, parse, render
from reconcilers.loadbalancer import Backend, Balance, Frontend, plan

CLONE_NEWNET = 0x40000000
OWNER = "bench"
PORT = 8080
CHANGED = Backend("10.251.0.1", PORT)  # replaces the first backend of the first frontend on a change


# --- the namespace --------------------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    # os.setns is Python 3.12+; this is 3.11.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside_netns() -> Iterator[str]:
    """Create a network namespace, move this (single-threaded) process into it; back out and delete it at the end."""
    name = f"dabctl-bench-lb-{secrets.token_hex(3)}"
    path = f"/var/run/netns/{name}"
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    created = False
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
        created = True
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        if os.stat("/proc/self/ns/net").st_ino != os.stat(path).st_ino:
            raise RuntimeError(f"setns did not move this process into {name}; refusing to touch any ruleset")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, text=True)
        left = subprocess.run(["nft", "list", "ruleset"], check=True, capture_output=True, text=True).stdout
        if left.strip():
            raise RuntimeError(f"the fresh namespace {name} already holds a ruleset; refusing to go on")
        yield name
    finally:
        try:
            _setns(host)
        finally:
            os.close(host)
            if created:
                done = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
                if done.returncode != 0:
                    log(f"could not delete netns {name}: {done.stderr.strip()} (remove it: ip netns delete {name})")


# --- the workload ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    backends: int
    frontends: int


def balance(shape: Shape, changed: bool = False) -> dict[Frontend, tuple[Backend, ...]]:
    """`shape.backends` distinct addresses spread evenly over `shape.frontends` published ports."""
    per = shape.backends // shape.frontends
    out: dict[Frontend, tuple[Backend, ...]] = {}
    for j in range(shape.frontends):
        backends = [Backend(f"10.250.{i // 250}.{i % 250 + 1}", PORT) for i in range(j * per, (j + 1) * per)]
        if changed and j == 0:
            backends[0] = CHANGED
        out[Frontend(protocol="tcp", port=30000 + j, stack="bench", service=f"svc{j:03d}", target=PORT)] = tuple(
            sorted(backends)
        )
    return out


def _kube_chain(prefix: str, *parts: str) -> str:
    # kube-proxy's naming: a prefix and 16 base32 characters of a SHA-256 of the service (and endpoint).
    return prefix + base64.b32encode(hashlib.sha256("/".join(parts).encode()).digest()).decode()[:16]


def _sep(f: Frontend, b: Backend) -> str:
    return _kube_chain("KUBE-SEP-", f.stack, f.service, f.protocol, str(f.target), str(b))


def kube_restore(bal: Balance, jumps: bool, stale: Balance | None = None) -> tuple[str, int]:
    """The nat table as kube-proxy's classic proxier restores it, and how many rules it holds after the restore.

    `jumps`: also append the built-in chains' jumps (only from an empty table: --noflush appends them again).
    `stale`: the balance programmed before; endpoint chains it has and `bal` lacks are flushed and deleted."""
    chains = [
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    rules = []
    for f, backends in sorted(bal.items()):
        p = f.protocol
        svc = _kube_chain("KUBE-SVC-", f.stack, f.service, p, str(f.target))
        comment = f'-m comment --comment "{f.stack}/{f.service}:{f.target}"'
        chains.append(f":{svc} - [0:0]")
        rules.append(f"-A KUBE-NODEPORTS -p {p} {comment} -m {p} --dport {f.port} -j KUBE-MARK-MASQ")
        rules.append(f"-A KUBE-NODEPORTS -p {p} {comment} -m {p} --dport {f.port} -j {svc}")
        n = len(backends)
        for i, b in enumerate(backends):
            sep = _sep(f, b)
            chains.append(f":{sep} - [0:0]")
            chance = "" if i == n - 1 else f" -m statistic --mode random --probability {1 / (n - i):.10f}"
            rules.append(f"-A {svc} {comment}{chance} -j {sep}")
            rules.append(f"-A {sep} {comment} -s {b.address}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} {comment} -p {p} -m {p} -j DNAT --to-destination {b}")
    rules += [
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL '
        "-j KUBE-NODEPORTS",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
    ]
    count = len(rules) + 3  # the three jumps from the built-in chains, written with the first restore
    if jumps:
        rules += ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES", "-A POSTROUTING -j KUBE-POSTROUTING"]
    gone = sorted(
        {_sep(f, b) for f, bs in (stale or {}).items() for b in bs} - {_sep(f, b) for f, bs in bal.items() for b in bs}
    )
    chains += [f":{c} - [0:0]" for c in gone]
    deletes = [f"-X {c}" for c in gone]
    return "\n".join(["*nat", *chains, *rules, *deletes, "COMMIT", ""]), count


# --- commands -------------------------------------------------------------------------------------------------


class TimedNft(Nft):
    """dabctl's own command runner, recording the wall time of every command it runs (by command and verb)."""

    def __init__(self) -> None:
        super().__init__()
        self.spent: dict[str, float] = {}

    def _add(self, what: str, t0: float) -> None:
        self.spent[what] = self.spent.get(what, 0.0) + time.perf_counter() - t0

    def nft(self, *args: str, script: str | None = None) -> str:
        t0 = time.perf_counter()
        try:
            return super().nft(*args, script=script)
        finally:
            self._add("nft -f" if "-f" in args else "nft -j list", t0)

    def iptables(self, *args: str) -> tuple[int, str]:
        t0 = time.perf_counter()
        try:
            return super().iptables(*args)
        finally:
            self._add("iptables (DOCKER-USER)", t0)


def run(argv: Sequence[str], stdin: str | None = None) -> str:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[:500]}")
    return done.stdout


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def reset() -> None:
    """Neither dabctl's table nor a nat table; route_localnet off (the namespace's, not the host's)."""
    for table in (TABLE, "nat"):
        run(["nft", "add", "table", "ip", table])
        run(["nft", "delete", "table", "ip", table])
    Path("/proc/sys/net/ipv4/conf/all/route_localnet").write_text("0\n")


def check_nft(ruleset: NftRuleset, want: Balance, what: str) -> None:
    got = ruleset.read()
    if got != dict(want):
        raise RuntimeError(
            f"{what}: read back {len(got)} frontends / {sum(map(len, got.values()))} backends, "
            f"not the {len(want)} / {sum(map(len, want.values()))} written"
        )


def check_iptables(want_rules: int, what: str) -> None:
    got = sum(1 for line in run(["iptables-save", "-t", "nat"]).splitlines() if line.startswith("-A "))
    if got != want_rules:
        raise RuntimeError(f"{what}: iptables-save -t nat shows {got} rules, not the {want_rules} written")


Samples = dict[tuple[Shape, str, str], list[float]]  # (shape, operation, contender) -> seconds per run


def run_dabctl(shape: Shape, samples: Samples, breakdown: Samples) -> None:
    before, after = balance(shape), balance(shape, changed=True)
    runner = TimedNft()
    ruleset = NftRuleset(OWNER, runner=runner)

    def record(op: str, contender: str, seconds: float) -> None:
        samples.setdefault((shape, op, contender), []).append(seconds)

    def write(op: str, desired: Balance, actual: Balance) -> None:
        actions = plan(desired, actual)
        runner.spent.clear()
        total = timed(lambda: ruleset.write(desired, actions))
        record(op, "dabctl write()", total)
        for what, seconds in runner.spent.items():
            breakdown.setdefault((shape, op, what), []).append(seconds)
        rest = total - sum(runner.spent.values())
        breakdown.setdefault((shape, op, "rest: Python (render, parse), sysctl"), []).append(rest)
        check_nft(ruleset, desired, f"dabctl {op} {shape}")

    reset()
    write("program", before, {})
    write("change one backend", after, before)
    record("read", "dabctl read()", timed(ruleset.read))
    out = runner.nft("-j", "list", "table", "ip", TABLE)
    breakdown.setdefault((shape, "read", "json + parse()"), []).append(timed(lambda: parse(json.loads(out))))
    breakdown.setdefault((shape, "change one backend", "render()"), []).append(timed(lambda: render(after, OWNER, 0)))

    # The bare floor: the same scripts, rendered beforehand, straight into nft.
    reset()
    first, second = render(before, OWNER, 0, exists=False), render(after, OWNER, 0)
    record("program", "nft -f (bare)", timed(lambda: run(["nft", "-f", "-"], first)))
    check_nft(ruleset, before, f"nft -f program {shape}")
    record("change one backend", "nft -f (bare)", timed(lambda: run(["nft", "-f", "-"], second)))
    check_nft(ruleset, after, f"nft -f change {shape}")
    reset()


def run_iptables(shape: Shape, samples: Samples) -> None:
    before, after = balance(shape), balance(shape, changed=True)
    first, count = kube_restore(before, jumps=True)
    second, count2 = kube_restore(after, jumps=False, stale=before)

    def record(op: str, seconds: float) -> None:
        samples.setdefault((shape, op, "iptables-restore"), []).append(seconds)

    reset()
    record("program", timed(lambda: run(["iptables-restore", "--noflush"], first)))
    check_iptables(count, f"iptables program {shape}")
    record("change one backend", timed(lambda: run(["iptables-restore", "--noflush"], second)))
    check_iptables(count2, f"iptables change {shape}")
    record("read", timed(lambda: run(["iptables-save", "-t", "nat"])))
    reset()


# --- output ---------------------------------------------------------------------------------------------------


def ms(xs: Sequence[float]) -> str:
    return f"{median(xs) * 1000:.1f} ({min(xs) * 1000:.1f}-{max(xs) * 1000:.1f})"


def load() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"load average {one}, {five}, {fifteen} ({os.cpu_count()} CPUs)"


def tool_versions() -> str:
    return f"{run(['nft', '--version']).strip()}, {run(['iptables', '--version']).strip()}"


OPERATIONS = {
    "program": ("dabctl write()", "nft -f (bare)"),
    "change one backend": ("dabctl write()", "nft -f (bare)"),
    "read": ("dabctl read()",),
}


def report(shapes: Sequence[Shape], samples: Samples, breakdown: Samples, runs: int) -> None:
    print(f"\nmedian of {runs} interleaved runs, ms (min-max)\n")
    rows = []
    for shape in shapes:
        for op, contenders in OPERATIONS.items():
            peer = samples[(shape, op, "iptables-restore")]
            for contender in contenders:
                mine = samples[(shape, op, contender)]
                ratio = f"{median(mine) / median(peer):.2f}x"
                rows.append([str(shape.backends), str(shape.frontends), op, contender, ms(mine), ms(peer), ratio])
    header = ["backends", "frontends", "operation", "dabctl", "ms", "kube-proxy iptables ms (restore / save)", "ratio"]
    print_table(header, rows)
    print("\nwhere dabctl's time goes: median ms per run, by command NftRuleset ran; Python parts timed alone\n")
    rows = []
    for shape in shapes:
        for op in OPERATIONS:
            for (s, o, what), xs in breakdown.items():
                if (s, o) == (shape, op):
                    rows.append([str(shape.backends), str(shape.frontends), op, what, f"{median(xs) * 1000:.1f}"])
    print_table(["backends", "frontends", "operation", "part", "ms"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="backend counts (comma-separated)")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--per-frontend", type=int, default=10, help="backends per frontend in the spread shape")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/loadbalancer.py needs root (network namespaces, nft): sudo .venv/bin/python ...", file=sys.stderr)
        return 2
    shapes = []
    for n in (int(s) for s in args.sizes.split(",")):
        shapes.append(Shape(n, 1))
        if n // args.per_frontend > 1:
            shapes.append(Shape(n, n // args.per_frontend))
    host_localnet = Path("/proc/sys/net/ipv4/conf/all/route_localnet").read_text()

    print(f"machine: {machine()}")
    print(f"tools:   {tool_versions()}")
    print(f"load at start: {load()}")
    samples: Samples = {}
    breakdown: Samples = {}
    with inside_netns() as name:
        log(f"in network namespace {name}")
        for r in range(args.runs):
            for shape in shapes:
                # The contender that goes first alternates run by run.
                if r % 2 == 0:
                    run_dabctl(shape, samples, breakdown)
                    run_iptables(shape, samples)
                else:
                    run_iptables(shape, samples)
                    run_dabctl(shape, samples, breakdown)
            log(f"run {r + 1}/{args.runs} done")
    if Path("/proc/sys/net/ipv4/conf/all/route_localnet").read_text() != host_localnet:
        log("the host's route_localnet changed during the run (not by this script: it ran in its own namespace)")
    print(f"load at end:   {load()}")
    report(shapes, samples, breakdown, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
