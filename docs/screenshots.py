"""Screenshots of the agent's web page at 1280 px and 390 px into docs/screenshots/ (run as root on a machine
with Docker, chromium and chromium-driver: `.venv/bin/python docs/screenshots.py`).

It runs a real `dabctl agent` on the samples' stacks in a temporary state directory, photographs the fleet and the
web-shop stack, then stops the agent and removes what it deployed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.browser import chromium  # noqa: E402

DABCTL = str(Path(sys.executable).parent / "dabctl")
OUT = ROOT / "docs" / "screenshots"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(ok: object, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if ok():  # type: ignore[operator]
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("the agent did not converge the samples in time")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="dabctl-shots-"))
    source, state, empty = work / "stacks", work / "state", work / "empty"
    shutil.copytree(ROOT / "samples" / "stacks", source)
    empty.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}, "DABCTL_LOADBALANCER": "none"}
    port = _port()
    url = f"http://127.0.0.1:{port}"
    common = ["--state-dir", str(state), "--resync-interval", "0"]
    agent = subprocess.Popen(
        [DABCTL, "agent", "--source", str(source), "--listen", f"127.0.0.1:{port}", *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def converged() -> bool:
            stacks = requests.get(url + "/status", timeout=5).json()["stacks"]
            return len(stacks) == 2 and all(s["health"]["status"] == "Healthy" for s in stacks)

        _wait(converged, 120)
        OUT.mkdir(parents=True, exist_ok=True)
        for width, height in ((1280, 900), (390, 844)):
            with chromium(width, height) as driver:
                for name, path in (("fleet", "/"), ("stack", "/stacks/web-shop")):
                    driver.get(url + path)
                    _wait(lambda: driver.find_element("id", "live").text == "live", 10)
                    total = driver.execute_script("return document.documentElement.scrollHeight")
                    driver.set_window_size(width, max(height, min(int(total) + 120, 2400)))
                    target = OUT / f"{name}-{width}.png"
                    driver.save_screenshot(str(target))
                    print(target.relative_to(ROOT))
    finally:
        agent.terminate()
        agent.wait(30)
        reconcile = [DABCTL, "reconcile", "--once", "--source", str(empty), "--allow-empty", *common[:2]]
        subprocess.run(reconcile, env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
