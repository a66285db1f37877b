"""Shared pieces of the bench scripts: the engine in its own network namespace, a Swarm on it, polling, tables.

Every script runs its contenders against one throw-away dockerd in its own network namespace (a second dockerd in
the host's namespace fights the first over docker0, the DOCKER chains and the address pools), started
with DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 so that Swarm tasks never try a registry; Swarm services are created
with `--no-resolve-image`. The clock rule is the same for every contender: it starts before the command is
launched (or the kill is sent) and stops when the engine, polled from outside every 20 ms, reports the end state.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
import docker.errors  # noqa: E402

from agent.api.client import request  # noqa: E402
from tests.support.dockerd import NetnsDockerd  # noqa: E402

IMAGE = "dabctl/sample:1"
IMAGE2 = "dabctl/sample:bench2"  # the same image under another reference: a spec change for every contender
DABCTL = str(ROOT / ".venv" / "bin" / "dabctl")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
POLL = 0.02
TIMEOUT = 300.0

# SIGTERM (e.g. `kill PID`) unwinds through the finally blocks, so engines, agents and namespaces are removed.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def dabctl_cmd(tree: Path | None = None) -> list[str]:
    """The dabctl command of this tree, or of another commit's tree (`--baseline DIR`, made with
    `git archive <commit> | tar -x -C DIR`): this venv's interpreter with DIR first on sys.path, so that both run
    on the same interpreter and libraries and differ only in dabctl's own code."""
    if tree is None:
        return [DABCTL]
    boot = f"import sys; sys.path.insert(0, {str(tree.resolve())!r}); from agent.cli import main; sys.exit(main())"
    return [PYTHON, "-c", boot]


def tree_of(cmd: Sequence[str]) -> str:
    """Which tree a dabctl command runs (for log lines)."""
    return "this tree" if cmd[0] == DABCTL else "baseline"


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def host_engine_answers() -> bool:
    try:
        docker.APIClient(base_url="unix:///var/run/docker.sock", version="1.41", timeout=5).ping()
        return True
    except Exception:
        return False


def ensure_bench_image() -> None:
    """Tag dabctl/sample:1 as dabctl/sample:bench2 on the host engine (copied into the netns engine)."""
    subprocess.run(["docker", "tag", IMAGE, IMAGE2], check=True)


def build_bench_images(engine: NetnsDockerd) -> None:
    """Build dabctl/sample:1 in the netns engine itself (samples/image/build.sh) and tag it as bench2."""
    env = {**os.environ, "DOCKER_HOST": engine.url}
    subprocess.run(["bash", str(ROOT / "samples" / "image" / "build.sh"), "--force"], env=env, check=True)
    engine.client.tag(IMAGE, *IMAGE2.split(":"))


@contextlib.contextmanager
def netns_engine() -> Iterator[NetnsDockerd]:
    """A dockerd in its own network namespace, Swarm-ready; removed with everything in it.

    The images come from the host engine; when none answers there, they are built in the netns engine."""
    from_host = host_engine_answers()
    if from_host:
        ensure_bench_image()
    else:
        log("no host engine answers: building the sample image in the benchmark engine")
    engine = NetnsDockerd(
        images=(IMAGE, IMAGE2) if from_host else (),
        env={"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
        address_pool="base=10.202.0.0/16,size=20",  # /20 networks: 4094 addresses, room for S=300 (450)
    )
    try:
        engine.start()
        if not from_host:
            build_bench_images(engine)
        yield engine
    finally:
        engine.close()


@contextlib.contextmanager
def swarm(engine: NetnsDockerd) -> Iterator[None]:
    """`docker swarm init` on the engine (loopback advertise address: the namespace has only lo); leave --force."""
    api = engine.client
    api.init_swarm(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
    try:
        yield
    finally:
        with contextlib.suppress(docker.errors.APIError):
            for svc in api.services():
                api.remove_service(svc["ID"])
        with contextlib.suppress(docker.errors.APIError):
            api.leave_swarm(force=True)


def docker_cli(engine: NetnsDockerd, *args: str) -> list[str]:
    return ["docker", "-H", engine.url, *args]


def client(url: str, pool: int = 10) -> docker.APIClient:
    return docker.APIClient(base_url=url, version="1.41", timeout=120, max_pool_size=pool)


def running(api: docker.APIClient, label: str, image: str | None = None) -> list[dict[str, Any]]:
    cs = api.containers(filters={"label": label, "status": "running"})
    if image is not None:
        cs = [c for c in cs if c["Image"] == image]
    return cs


def wait_until(
    cond: Callable[[], bool], what: str, timeout: float = TIMEOUT, check: Callable[[], None] | None = None
) -> float:
    """Poll cond every 20 ms; return time.perf_counter() when it first holds."""
    deadline = time.perf_counter() + timeout
    while True:
        if cond():
            return time.perf_counter()
        if check is not None:
            check()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not reached within {timeout:.0f}s: {what}")
        time.sleep(POLL)


def remove_by_label(api: docker.APIClient, label: str) -> None:
    for c in api.containers(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            api.remove_container(c["Id"], force=True, v=True)
    for net in api.networks(filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            api.remove_network(net["Id"])


def remove_service(api: docker.APIClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        api.remove_service(name)
    label = f"com.docker.swarm.service.name={name}"
    with contextlib.suppress(RuntimeError):
        wait_until(lambda: not api.containers(all=True, filters={"label": label}), f"{name} gone", timeout=60)
    remove_by_label(api, label)


def dab(services: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"Version": "0.1", "Services": services}, indent=2)


def machine(engine: NetnsDockerd | None = None) -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    text = f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.platform()}, Python {platform.python_version()}"
    if engine is None:  # a bench without an engine (bench/loadbalancer.py)
        return text
    server = engine.client.version().get("Version")
    return f"{text}, Docker {server} (own network namespace, DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1)"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table (readable in a terminal and pasteable into BENCHMARKS.md)."""
    all_rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(fmt(all_rows[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in all_rows[1:]:
        print(fmt(r))
    sys.stdout.flush()


def stats(xs: Sequence[float]) -> str:
    return f"{median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def ratio(a: Sequence[float], b: Sequence[float]) -> str:
    return f"{median(a) / median(b):.2f}x" if b and median(b) > 0 else "-"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Answer:
    """A control call's answer, read like a requests.Response (status_code, json())."""

    def __init__(self, status_code: int, doc: dict[str, Any]) -> None:
        self.status_code = status_code
        self._doc = doc

    def json(self) -> dict[str, Any]:
        return self._doc


class Agent:
    """`dabctl agent` as a process on a free loopback port; log in the work directory; killed by `stop()`."""

    def __init__(self, work: Path, *args: str, env: dict[str, str] | None = None, tree: Path | None = None) -> None:
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"agent-{self.port}.log"
        state = work / f"state-{self.port}"
        self.socket = state / "agent.sock"  # the control socket: POST /api/* goes there, as the CLI's calls do
        self.cmd = [*dabctl_cmd(tree), "agent", "--state-dir", str(state), "--listen", f"127.0.0.1:{self.port}", *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
        self.env = {**base, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.trust_env = False

    def start(self, timeout: float = 120) -> Agent:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                return self.http.get(self.url + "/readyz", timeout=5).status_code == 200
            except Exception:
                return False

        wait_until(ready, "agent ready", timeout=timeout)
        return self

    def post(self, path: str, **kw: Any) -> Any:
        """POST to the agent: /api/* over its control socket (what `dabctl reconcile --once` does), else HTTP."""
        if path.startswith("/api/"):
            return _Answer(*request(self.socket, "POST", path, kw.get("json", {}), timeout=900))
        return self.http.post(self.url + path, timeout=900, **kw)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.http.get(self.url + "/status", timeout=30).json()
        return doc

    def metric(self, name: str) -> float:
        for line in self.http.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def mem_kb(self, key: str = "VmHWM") -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Kill the agent (its log goes with the script's work directory)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
