"""Fixtures for tests against the real Docker engine: a workspace per test whose every object is removed."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

DABCTL = str(Path(sys.executable).parent / "dabctl")
IMAGE = "dabctl/sample:1"
# A command that runs until SIGTERM and then exits at once (the sample image's sh handles it).
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]


@pytest.fixture(scope="session")
def docker_api() -> Iterator[docker.APIClient]:
    api = docker.APIClient(base_url="unix:///var/run/docker.sock", version="1.41", timeout=120)
    try:
        api.ping()
    except Exception as exc:
        pytest.fail(f"integration tests need a running Docker engine (bash .ci/setup starts one): {exc}")
    api.inspect_image(IMAGE)
    yield api
    api.close()


@dataclass
class Workspace:
    """A source directory, a state directory and names prefixed so that teardown finds everything."""

    api: docker.APIClient
    root: Path
    prefix: str
    _: KW_ONLY
    wrapper: tuple[str, ...] = ()  # runs dabctl through it, e.g. ("nsenter", "--net=...") for a node namespace
    # Tests on the host engine publish no ports: the mesh is tested in node namespaces (test_mesh.py), whose
    # rules go with the namespace; on the host they would outlive the test, or meet the machine's own table.
    loadbalancer: str = "none"
    source: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.source = self.root / "stacks"
        self.state = self.root / "state"
        self.source.mkdir()

    def stack(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def write(self, name: str, doc: dict[str, Any] | str, suffix: str = ".dab") -> Path:
        """Write a bundle for stack `<prefix>-<name>`."""
        path = self.source / f"{self.stack(name)}{suffix}"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
        return path

    def remove(self, name: str) -> None:
        for p in self.source.glob(f"{self.stack(name)}.*"):
            p.unlink()

    def run(
        self, *args: str, docker_host: str | None = None, check: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the dabctl CLI with this workspace's state directory (and `env` added)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
        env = {**base, **(env or {}), "DABCTL_STATE_DIR": str(self.state), "DABCTL_LOADBALANCER": self.loadbalancer}
        if docker_host:
            env["DOCKER_HOST"] = docker_host
        proc = subprocess.run([*self.wrapper, DABCTL, *args], env=env, capture_output=True, text=True, timeout=240)
        if check and proc.returncode != 0:
            raise AssertionError(f"dabctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def reconcile(self, *extra: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("reconcile", "--once", "--source", str(self.source), *extra, **kw)

    def plan(self, *extra: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("plan", "--source", str(self.source), *extra, **kw)

    def containers(self, stack: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Managed containers of one of this workspace's stacks (or all of them)."""
        rows = self.api.containers(all=True, filters={"label": "dabctl.stack", **filters})
        return [
            r
            for r in rows
            if r["Labels"]["dabctl.stack"].startswith(self.prefix)
            and (stack is None or r["Labels"]["dabctl.stack"] == self.stack(stack))
        ]

    def running(self, stack: str, service: str | None = None) -> list[dict[str, Any]]:
        return [
            c
            for c in self.containers(stack)
            if c["State"] == "running" and (service is None or c["Labels"]["dabctl.service"] == service)
        ]

    def networks(self) -> dict[str, dict[str, Any]]:
        return {n["Name"]: n for n in self.api.networks() if n["Name"].startswith(self.prefix)}

    def cleanup(self) -> None:
        for c in self.api.containers(all=True):
            if any(n.lstrip("/").startswith(self.prefix) for n in c["Names"]):
                self.api.remove_container(c["Id"], force=True, v=True)
        for n in self.networks().values():
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_network(n["Id"])
        for v in (self.api.volumes() or {}).get("Volumes") or []:
            if v["Name"].startswith(self.prefix):
                self.api.remove_volume(v["Name"], force=True)


@pytest.fixture
def ws(docker_api: docker.APIClient, tmp_path: Path) -> Iterator[Workspace]:
    workspace = Workspace(docker_api, tmp_path, "t" + secrets.token_hex(4))
    try:
        yield workspace
    finally:
        workspace.cleanup()


def service(replicas: int = 1, **fields: Any) -> dict[str, Any]:
    """A bundle service on the sample image that stops at once on SIGTERM."""
    doc: dict[str, Any] = {"Image": IMAGE, "Command": SLEEPER[:2], "Args": SLEEPER[2:], "StopGracePeriod": "2s"}
    if replicas != 1:
        doc["Deploy"] = {"Replicas": replicas}
    doc.update(fields)
    return doc
