"""The agent's web page in a real browser (Debian's chromium) against a real agent on the real engine."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import docker
import pytest
import requests
from selenium.webdriver.common.by import By

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import Workspace, service
from tests.support import browser

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not browser.available(), reason="needs chromium and chromium-driver (.ci/setup)"),
]

SECRET = "zebra-17-quartz-0b5e"  # an Env value: it must appear on no page, asset or event stream


@pytest.fixture
def agent(ws: Workspace) -> Iterator[AgentProcess]:
    ws.write(
        "shop",
        {
            "Version": "0.1",
            "Services": {
                "web": service(2, Env=[f"SHOP_TOKEN={SECRET}", "MODE=demo"]),
                "worker": service(1, Env=[f"WORKER_KEY={SECRET}"]),
            },
        },
    )
    proc = AgentProcess(
        ws.state,
        "--source",
        str(ws.source),
        "--resync-interval",
        "0",
        "--poll-interval",
        "0.5",
        env={"DABCTL_LOADBALANCER": "none"},
    )
    try:
        yield proc.start()
    finally:
        proc.terminate()


def _ids(driver: browser.webdriver.Chrome) -> dict[str, tuple[str, str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-slot]")
    return {r.get_attribute("data-container") or "": (r.get_attribute("data-slot") or "", r.text) for r in rows}


def test_page_counts_and_heal_live(agent: AgentProcess, ws: Workspace, docker_api: docker.APIClient) -> None:
    stack = ws.stack("shop")
    eventually(lambda: len(ws.running("shop")) == 3 and agent.stack(stack)["sync"]["status"] == "Synced", agent)
    with browser.chromium() as driver:
        driver.get(agent.url + "/")
        assert driver.find_element(By.CSS_SELECTOR, "#count-stacks .n").text == "1"
        assert driver.find_element(By.CSS_SELECTOR, "#count-services .n").text == "2"
        assert driver.find_element(By.CSS_SELECTOR, "#count-replicas .n").text == "3/3"
        assert driver.find_element(By.CSS_SELECTOR, f'[data-service="{stack}/web"]').text == "2/2"
        # The nodes panel: a node alone is one row, a manager, up, its own leader, running the 3 replicas.
        (node,) = driver.find_elements(By.CSS_SELECTOR, "tr[data-node]")
        name = node.get_attribute("data-node") or ""
        cells = [c.text for c in node.find_elements(By.TAG_NAME, "td")]
        assert cells[:5] == [name, "manager", "up", "active", "leader"], cells
        assert driver.find_element(By.CSS_SELECTOR, f'[data-replicas="{name}"]').text == "3"
        eventually(lambda: driver.find_element(By.ID, "live").text == "live", agent, timeout=10)

        driver.get(f"{agent.url}/stacks/{stack}")
        eventually(lambda: driver.find_element(By.ID, "live").text == "live", agent, timeout=10)
        before = _ids(driver)
        assert len(before) == 3 and all("running" in text for _, text in before.values()), before
        assert all(name in text for _, text in before.values()), "each slot shows its node"
        victim = next(c for c in ws.running("shop", "web"))
        generation = int(driver.find_element(By.ID, "main").get_attribute("data-generation") or "0")
        docker_api.kill(victim["Id"])
        t0 = time.monotonic()
        killed_at = docker_api.inspect_container(victim["Id"])["State"]["FinishedAt"]

        def healed() -> bool:
            # The page (never reloaded) has a newer generation than at the kill, every slot running, and the engine
            # says the killed slot started again after it died: what the page shows is the heal, not the old state.
            shown = int(driver.find_element(By.ID, "main").get_attribute("data-generation") or "0")
            now = _ids(driver)
            state = docker_api.inspect_container(victim["Id"])["State"]
            restarted = state["Running"] and state["StartedAt"] > killed_at
            replaced = victim["Id"][:12] not in now
            return (
                shown > generation
                and (restarted or replaced)
                and len(now) == 3
                and all("running" in text for _, text in now.values())
            )

        eventually(healed, agent, timeout=5)
        print(f"heal shown after {time.monotonic() - t0:.2f}s")
        assert browser.console_errors(driver) == []
        assert SECRET not in driver.page_source


def _stream(agent: AgentProcess, seconds: float) -> bytes:
    """What /events sends in `seconds` (the stream does not end by itself)."""
    host, port = "127.0.0.1", agent.port
    with socket.create_connection((host, port), timeout=seconds) as sock:
        sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        data = b""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if b"event: changed" in data:
                break
        return data


def test_no_env_value_on_any_page_asset_or_stream(agent: AgentProcess, ws: Workspace) -> None:
    stack = ws.stack("shop")
    eventually(lambda: agent.stack(stack) is not None and agent.stack(stack)["sync"]["status"] == "Synced", agent)
    seen: dict[str, bytes] = {}
    queue = ["/", f"/stacks/{stack}", "/?fragment=1", f"/stacks/{stack}?fragment=1", "/status", "/metrics"]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        response = requests.get(agent.url + path, timeout=10)
        assert response.status_code == 200, (path, response.status_code)
        seen[path] = response.content
        if "html" in response.headers.get("Content-Type", ""):
            # every link and asset the page names
            queue += [p for p in re.findall(r'(?:href|src)="(/[^"]*)"', response.text) if p not in seen]
    seen["/events"] = _stream(agent, 3.0)
    assert b"event: changed" in seen["/events"]
    assert {"/ui/page.css", "/ui/page.js"} <= set(seen)
    leaks = [path for path, body in seen.items() if SECRET.encode() in body]
    assert leaks == []
