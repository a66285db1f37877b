"""Profile one cold converge of N replicas (`dabctl reconcile --once`) with py-spy, on a netns engine.

Prints the wall time and the functions holding the most samples (collapsed stacks), with and without idle
(waiting) samples: where the CLI spends its time, and how much of it is its own CPU rather than engine waits.

    sudo .venv/bin/python bench/profile.py [--replicas 40]      # needs py-spy: .venv/bin/pip install py-spy
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DABCTL, IMAGE, ROOT, dab, machine, netns_engine, remove_by_label


def top(collapsed: Path, n: int = 12) -> list[tuple[str, int]]:
    """Sample counts per leaf frame of a py-spy collapsed-stack file."""
    leaves: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaves[stack.split(";")[-1]] += int(count)
    return leaves.most_common(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=40)
    args = parser.parse_args()
    pyspy = str(ROOT / ".venv" / "bin" / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    with netns_engine() as engine:
        try:
            src = work / "stacks"
            src.mkdir()
            spec = {"Image": IMAGE, "StopGracePeriod": "1s", "Deploy": {"Replicas": args.replicas}}
            (src / "prof.dab").write_text(dab({"web": spec}))
            out = work / "idle.txt"
            argv = [pyspy, "record", "--idle", "--threads", "--format", "raw", "-r", "200", "-o", str(out), "--"]
            argv += [DABCTL, "reconcile", "--once", "--source", str(src), "--state-dir", str(work / "state")]
            argv += ["--docker-host", engine.url]
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            total = sum(c for _, c in top(out, 10**6))
            busy = [
                (f, c) for f, c in top(out, 10**6) if not any(w in f for w in ("wait", "recv", "select", "acquire"))
            ]
            print(f"machine: {machine(engine)}")
            print(f"N={args.replicas}: wall {wall:.2f}s (under py-spy), {total} samples at 200 Hz over all threads")
            print("\nleaf frames, all samples (idle included):")
            for frame, count in top(out):
                print(f"  {count:6d}  {frame}")
            print("\nleaf frames that are not waits (lock, socket read, select, idle pool worker):")
            for frame, count in busy[:12]:
                print(f"  {count:6d}  {frame}")
        finally:
            remove_by_label(engine.client, "dabctl.stack=prof")
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
