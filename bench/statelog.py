"""State-log latency benchmark: dabctl's SQLite and etcd backends, with a bare-HTTP etcd peer and etcdctl.

What it measures, per backend, interleaved run by run (medians of the per-run figures are reported):

- put: `--ops` sequential `put()` calls of 200-byte values to distinct keys; p50/p99/mean latency per call and
  throughput (ops / wall time of the whole loop).
- txn: `--ops` sequential compare-and-swap transactions on one key (`mod_revision == seen` -> put), each using
  the revision the previous one returned; every one must succeed.
- watch: one watch on a prefix (opened and warmed by one event first); for each of `ops/5` puts, the time from
  just before `put()` until that put's event comes out of `watch.next(timeout)`; sequential.

Contenders:

- sqlite: `SqliteStateLog(path, writer=True)` (WAL, synchronous=FULL) in a temp dir.
- etcd (dabctl): `EtcdStateLog([url], prefix=...)` -- JSON over the etcd gRPC gateway, via `requests`.
- etcd raw HTTP: the peer for dabctl's client overhead. One `requests.Session` POSTing `/v3/kv/put` with base64
  key/value straight to the same gateway (dabctl's `put()` goes through `/v3/kv/txn`, so this is the floor of
  one gateway round trip, not an identical request). Only the put row exists for it.
- etcdctl check perf: `ETCDCTL_API=3 etcdctl --endpoints URL check perf --load s` (~60 s, run once after the
  timed runs) against the same etcd; its summary lines are printed verbatim. `--skip-check-perf` skips it.

The etcd here is a single member (Debian's /usr/bin/etcd via tests/support/etcd.py's EtcdServer) on loopback
ports, with its data directory in a fresh temp dir -- on this machine that is disk (ext4 under /tmp), not tmpfs;
the filesystem type of both temp dirs is printed at start so the numbers can be read against it. A single
member on loopback has no replication round trip, so these are lower bounds for a real cluster. All traffic is
to 127.0.0.1.

    .venv/bin/python bench/statelog.py [--ops 500] [--runs 3] [--skip-check-perf]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/statelog.py from the repo root

from agent.state.etcd import EtcdStateLog
from agent.state.log import Compare, Put, StateLog
from agent.state.sqlite import SqliteStateLog
from tests.support.etcd import ETCD, EtcdServer

ETCDCTL = "/usr/bin/etcdctl"
VALUE_SIZE = 200
WATCH_TIMEOUT = 5.0
PERF_LINE_MARKERS = ("PASS", "FAIL", "Throughput", "Slowest request", "Stddev")

Stats = dict[str, float]  # p50, p99, mean (ms) and ops (ops/s, 0 when not measured)


def value() -> bytes:
    return os.urandom(VALUE_SIZE // 2).hex().encode()


def summarize(latencies: list[float], wall: float = 0.0) -> Stats:
    ms = sorted(x * 1000 for x in latencies)
    p99_index = min(len(ms) - 1, max(0, round(0.99 * len(ms)) - 1))
    return {
        "p50": statistics.median(ms),
        "p99": ms[p99_index],
        "mean": statistics.fmean(ms),
        "ops": len(ms) / wall if wall else 0.0,
    }


def bench_put(put: Callable[[str, bytes], object], base: str, ops: int) -> Stats:
    payloads = [value() for _ in range(ops)]
    latencies = []
    start = time.perf_counter()
    for i in range(ops):
        t0 = time.perf_counter()
        put(f"{base}{i:06d}", payloads[i])
        latencies.append(time.perf_counter() - t0)
    return summarize(latencies, time.perf_counter() - start)


def bench_txn(log: StateLog, key: str, ops: int) -> Stats:
    seen = log.put(key, value())
    latencies = []
    for _ in range(ops):
        payload = value()
        t0 = time.perf_counter()
        result = log.txn([Compare(key, "mod_revision", "==", seen)], [Put(key, payload)])
        latencies.append(time.perf_counter() - t0)
        if not result.succeeded:
            raise RuntimeError(f"txn on {key} failed at mod_revision {seen}")
        seen = result.revision
    return summarize(latencies)


def bench_watch(log: StateLog, prefix: str, ops: int) -> Stats:
    w = log.watch(prefix)
    try:

        def put_and_wait(key: str) -> float:
            payload = value()
            t0 = time.perf_counter()
            log.put(key, payload)
            while True:
                event = w.next(timeout=WATCH_TIMEOUT)
                if event is None:
                    raise RuntimeError(f"no watch event for {key} within {WATCH_TIMEOUT}s")
                if event.key == key and event.value == payload:
                    return time.perf_counter() - t0

        put_and_wait(f"{prefix}warmup")  # the stream is open and delivering before timing starts
        return summarize([put_and_wait(f"{prefix}{i:06d}") for i in range(ops)])
    finally:
        w.cancel()


def raw_put(session: requests.Session, url: str) -> Callable[[str, bytes], object]:
    def put(key: str, data: bytes) -> object:
        body = {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(data).decode()}
        resp = session.post(f"{url}/v3/kv/put", data=json.dumps(body), timeout=5)
        resp.raise_for_status()
        return resp.json()

    return put


def filesystem(path: str) -> str:
    """The mount point and type holding `path` (longest matching mount in /proc/mounts)."""
    real = os.path.realpath(path)
    best = ("?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, fstype = parts[1], parts[2]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype)
    except OSError:
        pass
    st = os.statvfs(real)
    free_gb = st.f_bavail * st.f_frsize / 1e9
    return f"{best[1]} (mounted at {best[0]}, {free_gb:.0f} GB free)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (out.stdout or out.stderr).splitlines()
    return lines[0] if lines else "unknown"


def check_perf(url: str) -> str:
    """Run etcdctl check perf once; its summary lines verbatim (all output if none match)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("ETCDCTL")}
    env["ETCDCTL_API"] = "3"
    try:
        out = subprocess.run(
            [ETCDCTL, "--endpoints", url, "check", "perf", "--load", "s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"etcdctl check perf did not complete: {exc}"
    lines = [ln.strip() for ln in out.stdout.replace("\r", "\n").splitlines() if ln.strip()]
    summary = [ln for ln in lines if ln.startswith(PERF_LINE_MARKERS)]
    text = "\n".join(summary or lines[-20:])
    return f"{text}\n(etcdctl exit status {out.returncode})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=500, help="puts and txns per run (watch: ops/5)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-check-perf", action="store_true", help="skip the ~60 s etcdctl check perf peer")
    args = parser.parse_args()
    ops, watch_ops = args.ops, max(1, args.ops // 5)

    etcd_dir = Path(tempfile.mkdtemp(prefix="bench-statelog-etcd-"))
    sqlite_dir = Path(tempfile.mkdtemp(prefix="bench-statelog-sqlite-"))
    server = EtcdServer(etcd_dir, name="dabctl-bench")
    sqlite_log: SqliteStateLog | None = None
    etcd_log: EtcdStateLog | None = None
    session = requests.Session()
    session.trust_env = False
    results: dict[tuple[str, str], list[Stats]] = {}
    try:
        print("machine")
        print(f"  cpus:        {os.cpu_count()} x {cpu_model()}")
        print(f"  platform:    {platform.platform()}, Python {platform.python_version()}")
        print(f"  etcd:        {first_line([ETCD, '--version'])} (single member, loopback)")
        print(f"  etcd dir:    {etcd_dir} on {filesystem(str(etcd_dir))}")
        print(f"  sqlite dir:  {sqlite_dir} on {filesystem(str(sqlite_dir))}")
        print(f"  workload:    --ops {ops} (watch {watch_ops}), --runs {args.runs}, values {VALUE_SIZE} bytes")
        print()
        sys.stdout.flush()

        server.start()
        sqlite_log = SqliteStateLog(sqlite_dir / "state.db", writer=True)
        etcd_log = EtcdStateLog([server.url], prefix="/dabctl-bench")
        raw = raw_put(session, server.url)
        backends: list[tuple[str, StateLog]] = [("sqlite", sqlite_log), ("etcd (dabctl)", etcd_log)]

        # warm connections and caches, untimed
        for name, log in backends:
            bench_put(log.put, f"/warm/{name}/", 20)
        bench_put(raw, "/raw-bench/warm/", 20)

        for run in range(args.runs):
            for name, log in backends:
                results.setdefault((name, "put"), []).append(bench_put(log.put, f"/put/{run}/", ops))
                results.setdefault((name, "txn"), []).append(bench_txn(log, f"/txn/{run}", ops))
                results.setdefault((name, "watch"), []).append(bench_watch(log, f"/watch/{run}/", watch_ops))
            results.setdefault(("etcd raw HTTP", "put"), []).append(bench_put(raw, f"/raw-bench/put/{run}/", ops))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)

        header = f"{'backend':<15} {'operation':<10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'ops/s':>8}"
        print(f"medians across {args.runs} runs")
        print(header)
        print("-" * len(header))
        for (name, op), runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in ("p50", "p99", "mean", "ops")}
            ops_s = f"{med['ops']:8.0f}" if op == "put" else f"{'-':>8}"
            print(f"{name:<15} {op:<10} {med['p50']:8.3f} {med['p99']:8.3f} {med['mean']:8.3f} {ops_s}")
        print()

        if args.skip_check_perf:
            print("etcdctl check perf: skipped (--skip-check-perf)")
        else:
            print(f"etcdctl check perf --load s ({first_line([ETCDCTL, 'version'])}), same etcd:")
            sys.stdout.flush()
            print(check_perf(server.url))
        return 0
    finally:
        session.close()
        if etcd_log is not None:
            etcd_log.close()
        if sqlite_log is not None:
            sqlite_log.close()
        server.stop()
        shutil.rmtree(etcd_dir, ignore_errors=True)
        shutil.rmtree(sqlite_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
