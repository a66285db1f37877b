"""The agent's own cost of a pass — planning and state-log reads and writes, no engine time — for two versions of
the code, interleaved: `python bench/seam.py --baseline <dir>` where <dir> holds another commit's tree
(`git archive <commit> | tar -x -C <dir>`). Each measurement runs in a fresh interpreter with that tree first on
sys.path, on the fake engine (tests/fakes.py) and a real SQLite state log in a temporary directory.

Rows: cold converge of S services (one pass, all creates), the no-op pass over S services (median of 20), and a
rolling update of 40 replicas (Parallelism 5, every pass until the rollout completes, health reported at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
from agent.node.engine import Engine
from agent.state.records import Records
from agent.state.sqlite import SqliteStateLog
from tests.fakes import FakeRuntime
from tests.node.conftest import Clock, bundle, desired, service

kind, size = sys.argv[1], int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    log = SqliteStateLog(Path(tmp) / "state.db")
    clock = Clock()
    runtime = FakeRuntime(clock=clock)
    engine = Engine(runtime, Records(log), "node-1", clock=clock)
    def state(env):
        stacks = {f"s{i}": bundle({"web": service(Env=[env], Deploy={"Replicas": 1 + i % 2})}) for i in range(size)}
        return desired(**stacks)
    def once(d):
        return engine.apply(engine.plan(d))
    if kind == "converge":
        d = state("V=1")
        t = time.perf_counter(); once(d); out = [time.perf_counter() - t]
    elif kind == "noop":
        d = state("V=1"); once(d); out = []
        for _ in range(20):
            t = time.perf_counter(); once(d); out.append(time.perf_counter() - t)
    else:
        deploy = {"Replicas": size, "UpdateConfig": {"Parallelism": 5, "Monitor": "1s"}}
        once(desired(web=bundle({"front": service(Env=["V=1"], Deploy=deploy)})))
        d2 = desired(web=bundle({"front": service(Env=["V=2"], Deploy=deploy)}))
        t = time.perf_counter(); passes = 0
        while True:
            plan = engine.plan(d2); engine.apply(plan); passes += 1
            clock.advance(1.0)
            if not plan.rolling and plan.changes == 0:
                break
        out = [time.perf_counter() - t, passes]
    log.close()
print(json.dumps(out))
"""


def measure(tree: Path, kind: str, size: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(size)], env=env, cwd=tree, capture_output=True, text=True, check=True
    )
    result: list[float] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a directory holding the other commit's tree")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds; median reported (3)")
    parser.add_argument(
        "--cases", default="", help="only these cases, e.g. noop:300,rollout:40 (default: all six rows)"
    )
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = {"baseline": args.baseline.resolve(), "this": here}
    cases = [("converge", 100), ("converge", 300), ("noop", 10), ("noop", 100), ("noop", 300), ("rollout", 40)]
    if args.cases:
        cases = [(kind, int(size)) for kind, _, size in (c.partition(":") for c in args.cases.split(","))]
    results: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.runs):
        for kind, size in cases:
            for name, tree in trees.items():  # interleaved: baseline, this, baseline, this ...
                value = measure(tree, kind, size)
                results.setdefault((name, kind, size), []).append(
                    statistics.median(value[:1] if kind != "noop" else value)
                )
    print(f"load average {os.getloadavg()}")
    print("| case | S | baseline ms | this ms | this ÷ baseline |")
    print("|---|---|---|---|---|")
    for kind, size in cases:
        b = statistics.median(results[("baseline", kind, size)]) * 1000
        t = statistics.median(results[("this", kind, size)]) * 1000
        print(f"| {kind} | {size} | {b:.1f} | {t:.1f} | {t / b:.2f}x |")


if __name__ == "__main__":
    main()
