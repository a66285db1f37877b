"""Web page benchmark: the complete fleet page (last byte) with S services, and /healthz with the streams' cap open.

A `dabctl agent` (polling and resync off) converges S one-replica services in one stack on a Docker engine in its
own network namespace (bench/common.py); then each run GETs `/` and reads it to the last byte. Two cases: `warm`
(the view of the current pass is built: what every page and stream after the first gets) and `after a pass` (a
control reconcile first, so the page's request takes the one container list of the new generation). Then the
cap's worth of `/events` streams (32) are held open and /healthz is timed.

    sudo .venv/bin/python bench/page.py [--services 300] [--runs 20]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMAGE, Agent, dab, log, machine, median, netns_engine, print_table, running, stats, wait_until

STREAMS = 32  # Limits.event_streams


def fetch(agent: Agent, path: str = "/") -> tuple[float, int]:
    t0 = time.perf_counter()
    r = agent.http.get(agent.url + path, timeout=30)
    body = r.content  # the last byte
    assert r.status_code == 200, r.status_code
    return time.perf_counter() - t0, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=300)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    s = args.services
    with netns_engine() as engine:
        work = Path(tempfile.mkdtemp(prefix="bench-page-"))
        src = work / "stacks"
        src.mkdir()
        services = {f"s{i}": {"Image": IMAGE, "StopGracePeriod": "1s"} for i in range(s)}
        (src / "page.dab").write_text(dab(services))
        agent = Agent(
            work,
            "--source",
            str(src),
            "--docker-host",
            engine.url,
            "--poll-interval",
            "0",
            "--resync-interval",
            "0",
            env={"DABCTL_LOADBALANCER": "none"},
        )
        try:
            agent.start(timeout=900)
            wait_until(lambda: len(running(engine.client, "dabctl.stack=page")) >= s, f"{s} running", timeout=900)
            agent.post("/api/reconcile", json={})
            fetch(agent)
            warm = [fetch(agent)[0] for _ in range(args.runs)]
            size = fetch(agent)[1]
            after = []
            for _ in range(args.runs):
                agent.post("/api/reconcile", json={})
                after.append(fetch(agent)[0])
            socks = []
            for _ in range(STREAMS):
                sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
                sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\n\r\n".encode())
                sock.recv(4096)
                socks.append(sock)
            health = [fetch(agent, "/healthz")[0] for _ in range(args.runs)]
            for sock in socks:
                sock.close()
        finally:
            agent.stop()
            from common import remove_by_label

            remove_by_label(engine.client, "dabctl.stack=page")
        log(machine(engine))

    def ms(xs: list[float]) -> list[float]:
        return [x * 1000 for x in xs]

    print_table(
        ["S", "case", "median ms", "stats ms", "bytes"],
        [
            [str(s), "fleet page, warm", f"{median(ms(warm)):.1f}", stats(ms(warm)), str(size)],
            [str(s), "fleet page, after a pass", f"{median(ms(after)):.1f}", stats(ms(after)), str(size)],
            [str(s), f"/healthz, {STREAMS} streams open", f"{median(ms(health)):.1f}", stats(ms(health)), "-"],
        ],
    )


if __name__ == "__main__":
    main()
