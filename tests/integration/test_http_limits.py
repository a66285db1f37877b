"""The agent's HTTP server under a connection flood, measured on a real `dabctl agent` process: 500 idle
connections held (and re-opened as the server closes them) for 60 s; /healthz keeps answering within 1 s, the
agent's peak RSS grows by less than 30 MiB, and connections beyond the cap are closed within 10 s."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests

from agent.api.server import Limits
from tests.integration.agentproc import AgentProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HELD = 500
HOLD_SECONDS = 60.0


def _kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _open(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setblocking(False)
    return sock


def test_500_idle_connections_for_60_s(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    agent = AgentProcess(tmp_path / "state", "--source", str(source), "--poll-interval", "0").start(ready=False)
    assert agent.proc is not None
    pid = agent.proc.pid
    address = ("127.0.0.1", agent.port)
    cap = Limits().max_connections
    held: list[tuple[float, socket.socket]] = []
    try:
        for _ in range(20):  # warm: the first requests allocate what every later one reuses
            agent.get("/healthz")
        baseline = _kb(pid, "VmRSS")
        started = time.monotonic()
        held = [(time.monotonic(), _open(address)) for _ in range(HELD)]
        opened = time.monotonic() - started

        excess_closed_after: float | None = None
        lifetimes: list[float] = []
        probes: list[float] = []
        next_probe = time.monotonic()
        while time.monotonic() - started < HOLD_SECONDS:
            now = time.monotonic()
            still: list[tuple[float, socket.socket]] = []
            for at, sock in held:
                if _closed(sock):
                    lifetimes.append(now - at)
                    sock.close()
                    still.append((time.monotonic(), _open(address)))  # the flood goes on
                else:
                    still.append((at, sock))
            held = still
            if excess_closed_after is None and len(lifetimes) >= HELD - cap:
                excess_closed_after = now - started
            if now >= next_probe:
                t0 = time.monotonic()
                try:
                    code = requests.get(f"{agent.url}/healthz", timeout=5).status_code
                except requests.RequestException:
                    code = 0
                probes.append(time.monotonic() - t0 if code == 200 else float("inf"))
                next_probe = now + 0.5
            time.sleep(0.05)
        peak = _kb(pid, "VmHWM")
        growth_mib = (peak - baseline) / 1024
        first_wave = sorted(lifetimes)[: HELD - cap]
        print(
            f"\n500 idle connections for {HOLD_SECONDS:.0f} s (opened in {opened:.2f} s, cap {cap}): "
            f"/healthz max {max(probes) * 1000:.0f} ms over {len(probes)} probes; "
            f"RSS {baseline / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB (+{growth_mib:.1f} MiB); "
            f"the {HELD - cap} beyond the cap closed within {excess_closed_after or float('nan'):.2f} s "
            f"(slowest {max(first_wave):.2f} s); idle connections closed after at most {max(lifetimes):.1f} s; "
            f"{len(lifetimes)} closed by the server in all"
        )
        assert max(probes) < 1.0
        assert growth_mib < 30
        assert excess_closed_after is not None and excess_closed_after < 10
        assert max(lifetimes) < 10 + 1.5, "no idle connection outlives the request deadline"
    finally:
        for _, sock in held:
            sock.close()
        agent.terminate()
