"""Crash consistency: SIGKILL `dabctl reconcile --once` at many points of a pass, then a clean pass converges.

The killed run talks to the host engine through the recording proxy (tests/support/dockerproxy.py), which runs
the kill right before it forwards the k-th mutating call; the call still reaches the engine, like a request a
dying client had already sent, and the trial waits for the engine's answers before it looks. Then a clean
`reconcile --once` without the proxy, and the checks: exit 0, `plan --detailed-exitcode` 0, exactly one running
container of the current spec per slot and none outside the slots, exactly the stack's networks (every container
on the current ones), and a state log that opens read-only and agrees with the engine and the source (revision,
bundle hash, specs, slot assignments, history, no rollout left unfinished; nothing of a pruned stack).

Trials: k = 1..N for every mutating call of a first converge, of an update (Env changed; one service stop-first,
one start-first) and of a prune (--allow-empty), each N counted first by an unkilled pass through the proxy; a
kill right after the last mutating call has its answer (while the pass records its outcome); and kills at random
times — a random 0-100 ms after a random call of the pass, so that they land between calls too (planning, thread
hand-offs, the state write) whatever the machine's load (the seed is printed; CRASH_SEED replays it). Trials run in a few lanes at once, each lane a workspace of
its own (name prefix, source, state directory): a trial starts from the checked state the previous trial of its
lane left — an update from a converged revision, a first converge from a pruned stack — which saves rebuilding
that state for every trial; a failed trial gives its lane a fresh workspace.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from agent.state.backends import STATE_FILE
from agent.state.records import Records
from agent.state.sqlite import SqliteStateLog
from bundles import desired_networks, load_directory, service_targets
from bundles.desired import ServiceTarget
from tests.integration.conftest import DABCTL, Workspace, service
from tests.support.dockerproxy import DockerProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODES = ("converge", "update", "prune")
MIN_TRIALS = 50
RANDOM_TRIALS = 9
MAX_ENGINE_FAULTS = 2  # Docker 20.10 sometimes leaves a phantom endpoint on a network (TrialRunner.phantom)
WORKERS = 4  # two CPUs here: more only queues the dabctl processes behind each other
SEED = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30))
EXPECTED = {"web": 3, "worker": 2}


def bundle(version: int) -> dict[str, Any]:
    """Two services (3 + 2 replicas) on two networks; each version changes Env. The rollout settings make an
    update finish within a pass or two (all slots at once, healthy when running); worker updates start-first."""

    def svc(replicas: int, networks: list[str], order: str) -> dict[str, Any]:
        doc = service(replicas, Networks=networks, Env=[f"VERSION={version}"])
        doc["Deploy"] = {
            "Replicas": replicas,
            "UpdateConfig": {"Parallelism": 0, "Monitor": "0s", "Order": order},
        }
        return doc

    return {
        "Services": {"web": svc(3, ["front", "back"], "stop-first"), "worker": svc(2, ["back"], "start-first")},
        "Networks": {"front": {}, "back": {}},
    }


@dataclass
class Kill:
    """When to kill: before the k-th mutating call; as soon as the `after_last`-th has its answer; or `delay`
    seconds after the proxy saw the `after_call`-th call of any kind — a random time anchored to the pass's own
    progress, so that a loaded machine does not move it past the end."""

    k: int | None = None
    after_last: int | None = None
    after_call: int | None = None
    delay: float = 0.0

    def __str__(self) -> str:
        if self.k is not None:
            return f"k={self.k}"
        if self.after_last is not None:
            return f"after call {self.after_last} answered"
        if self.after_call is not None:
            return f"call {self.after_call} + {self.delay * 1000:.0f}ms"
        return "no kill"

    @property
    def none(self) -> bool:
        return self.k is None and self.after_last is None and self.after_call is None


@dataclass
class Trial:
    mode: str
    kill: Kill
    _: KW_ONLY
    killed: bool = False
    calls_seen: int = 0  # every call the proxy had seen when the kill fired
    mutating_seen: int = 0
    last_endpoint: str = ""
    killed_rc: int | None = None
    mutating_total: int = 0  # mutating calls the killed (or unkilled) pass made
    calls_total: int = 0  # calls of any kind
    pass_seconds: float = 0.0
    unanswered: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    engine_fault: str = ""  # the engine, not dabctl, kept the trial from converging (see TrialRunner.phantom)

    @property
    def converged(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.killed:
            when = f"killed after {self.calls_seen} calls ({self.mutating_seen} mutating, last {self.last_endpoint})"
        elif self.kill.none:
            when = f"unkilled pass: {self.mutating_total} mutating calls in {self.pass_seconds:.1f}s"
        else:
            when = f"not killed: the pass ended first (exit {self.killed_rc})"
        extra = f"; never answered: {', '.join(self.unanswered)}" if self.unanswered else ""
        outcome = "converged" if self.converged else "NOT CONVERGED: " + " | ".join(self.problems)
        if self.engine_fault:
            outcome = f"ENGINE FAULT: {self.engine_fault} (then: {' | '.join(self.problems)})"
        return f"{self.mode:8} {self.kill!s:24} {when}{extra} -> {outcome} [{self.seconds:.1f}s]"


class Lane:
    """One workspace that runs trials one after another: each trial starts from the state the previous one's
    clean pass left (checked), so an update starts from a converged revision and a first converge from an
    emptied (pruned) stack, without the cost of building that state again. A failed trial resets the lane to a
    fresh workspace."""

    def __init__(self, runner: TrialRunner) -> None:
        self.runner = runner
        self.ws = runner.new_workspace()
        self.version = 0
        self.deployed = False

    def reset(self) -> None:
        self.runner.remove_all(self.ws)
        self.ws = self.runner.new_workspace()
        self.version = 0
        self.deployed = False

    def ready(self, mode: str) -> None:
        """Bring the workspace to where a `mode` trial starts and write the source the trial's pass reads."""
        ws = self.ws
        if mode == "converge" and self.deployed:
            ws.remove("app")
            ws.reconcile("--allow-empty", check=True)
            self.deployed = False
        if mode in ("update", "prune") and not self.deployed:
            self.version += 1
            ws.write("app", bundle(self.version))
            ws.reconcile(check=True)
            self.deployed = True
        if mode == "prune":
            ws.remove("app")
        else:
            self.version += 1
            ws.write("app", bundle(self.version))


class TrialRunner:
    """Runs lanes of trials on the host engine and checks what each clean pass leaves."""

    def __init__(self, api: docker.APIClient, root: Path) -> None:
        self.api = api
        self.root = root
        self._lock = threading.Lock()
        self._workspaces: list[Workspace] = []
        self.leaks: list[str] = []

    def new_workspace(self) -> Workspace:
        with self._lock:
            root = self.root / f"ws-{len(self._workspaces):03d}"
            root.mkdir()
            ws = Workspace(self.api, root, "c" + secrets.token_hex(4))
            self._workspaces.append(ws)
        return ws

    def cleanup(self) -> None:
        for ws in self._workspaces:
            self.remove_all(ws)

    def remove_all(self, ws: Workspace) -> None:
        """Stop the workspace's containers one at a time, then remove everything of its prefix.

        A network the engine refuses to remove is reported in `leaks` rather than raised, so that the trials'
        report survives: seen here four times on the shared 20.10 engine under heavy load, a `<prefix>-app_back`
        whose endpoint count stayed above zero with no endpoint listed ("has active endpoints"), which only an
        engine restart clears."""
        for c in self.api.containers(filters={"name": ws.prefix}):
            with contextlib.suppress(docker.errors.APIError):
                self.api.stop(c["Id"], timeout=5)
        try:
            ws.cleanup()
        except docker.errors.APIError as exc:
            self.leaks.append(f"{ws.prefix}: {exc.explanation or exc}")

    def run_lane(self, trials: list[Trial]) -> list[Trial]:
        lane = Lane(self)
        try:
            for trial in trials:
                self.run(lane, trial)
                if trial.converged:
                    lane.deployed = trial.mode != "prune"
                else:
                    lane.reset()
        finally:
            self.remove_all(lane.ws)
        return trials

    def run(self, lane: Lane, trial: Trial) -> Trial:
        t0 = time.monotonic()
        try:
            lane.ready(trial.mode)
            self._killed_pass(lane.ws, trial)
            trial.problems += self.check(lane.ws, trial.mode)
            if trial.problems:
                trial.engine_fault = self.phantom(lane.ws)
        except Exception as exc:  # a broken trial is an outcome to report, not a reason to stop the others
            trial.problems.append(f"{type(exc).__name__}: {exc}")
        trial.seconds = time.monotonic() - t0
        return trial

    def phantom(self, ws: Workspace) -> str:
        """The Docker 20.10 fault that `remove_all` describes, if it is what stopped the clean pass: a network of
        the workspace that lists no container yet is refused removal for "active endpoints". No API call clears
        it (a forced disconnect finds no endpoint); only an engine restart does."""
        for name, n in ws.networks().items():
            if self.api.inspect_network(n["Id"]).get("Containers"):
                continue
            try:
                self.api.remove_network(n["Id"])
            except docker.errors.APIError as exc:
                if "active endpoints" in str(exc.explanation or exc):
                    return f"network {name} lists no container but the engine refuses it 'active endpoints'"
        return ""

    @staticmethod
    def _flags(mode: str) -> list[str]:
        return ["--allow-empty"] if mode == "prune" else []

    def _killed_pass(self, ws: Workspace, trial: Trial) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
        env["DABCTL_STATE_DIR"] = str(ws.state)
        cmd = [DABCTL, "reconcile", "--once", "--source", str(ws.source), *self._flags(trial.mode)]
        with DockerProxy() as proxy:
            env["DOCKER_HOST"] = proxy.url
            started = threading.Event()
            pid: list[int] = []

            def kill() -> None:
                started.wait(5)
                calls = proxy.calls
                trial.killed = True
                trial.calls_seen = len(calls)
                mutating = [c for c in calls if c.mutating]
                trial.mutating_seen = len(mutating)
                trial.last_endpoint = mutating[-1].endpoint if mutating else "-"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid[0], signal.SIGKILL)
                _wait_dead(pid[0])  # dead before the proxy forwards the call it holds

            if trial.kill.k is not None:
                proxy.on_mutating_call(trial.kill.k, kill)
            log = (ws.root / "killed-pass.log").open("ab")
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            pid.append(proc.pid)
            started.set()
            stop_watch = threading.Event()
            watcher: threading.Thread | None = None
            if trial.kill.after_call is not None:
                when = _after_call(proxy, trial.kill.after_call, trial.kill.delay, stop_watch, kill)
                watcher = threading.Thread(target=when, daemon=True)
            elif trial.kill.after_last is not None:
                n = trial.kill.after_last
                watcher = threading.Thread(target=_when_answered(proxy, n, stop_watch, kill), daemon=True)
            if watcher is not None:
                watcher.start()
            try:
                trial.killed_rc = proc.wait(timeout=120)
            finally:
                stop_watch.set()
                if watcher is not None:
                    watcher.join(5)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            trial.pass_seconds = time.monotonic() - t0
            if trial.killed and trial.killed_rc != -signal.SIGKILL:
                trial.killed = False  # the kill came after the process had exited on its own
            trial.unanswered = _wait_quiet(proxy, timeout=20)
            trial.mutating_total = len(proxy.mutating())
            trial.calls_total = len(proxy.calls)
            assert proxy.errors == [], proxy.errors
        if trial.kill.none and trial.killed_rc != 0:
            trial.problems.append(f"the unkilled pass exited {trial.killed_rc}")
        clean = ws.reconcile(*self._flags(trial.mode))
        if clean.returncode != 0:
            trial.problems.append(f"clean pass exited {clean.returncode}: {_tail(clean.stdout + clean.stderr)}")

    # --- the checks ---------------------------------------------------------------------------------------------

    def check(self, ws: Workspace, mode: str) -> list[str]:
        """Everything that is wrong after the clean pass (empty: converged)."""
        problems: list[str] = []
        plan = ws.plan("--detailed-exitcode", *self._flags(mode))
        if plan.returncode != 0:
            problems.append(f"plan --detailed-exitcode exited {plan.returncode}: {_tail(plan.stdout + plan.stderr)}")
        stack = ws.stack("app")
        desired = load_directory(ws.source).stacks.get(stack)
        containers = [
            c
            for c in self.api.containers(all=True)
            if any(n.lstrip("/").startswith(ws.prefix) for n in c["Names"])
            or (c.get("Labels") or {}).get("dabctl.stack", "").startswith(ws.prefix)
        ]
        networks = {n["Name"]: n for n in self.api.networks() if n["Name"].startswith(ws.prefix)}
        try:
            log = SqliteStateLog(ws.state / STATE_FILE, writer=False)
        except Exception as exc:
            return [*problems, f"the state log does not open: {exc}"]
        try:
            records = Records(log)
            owner = records.owner(create=False)
            stacks = records.stacks()
            assignments = records.assignments()
            rollouts = records.rollouts()
            history = records.history(stack)
        finally:
            log.close()

        if desired is None:  # pruned
            problems += [f"container {c['Names'][0]} left after the prune" for c in containers]
            problems += [f"network {name} left after the prune" for name in networks]
            if stack in stacks:
                problems.append("the state log still has a record of the pruned stack")
            problems += [f"assignment {k} left" for k in assignments if k[0] == stack]
            problems += [f"rollout {k} left" for k in rollouts if k[0] == stack]
            return problems

        targets = {t.name: t for t in service_targets(desired)}
        wanted_networks = {t.full_name for t in desired_networks(desired)}
        if set(networks) != wanted_networks:
            problems.append(f"networks {sorted(networks)}, want {sorted(wanted_networks)}")
        for name, n in networks.items():
            if (n.get("Labels") or {}).get("dabctl.owner") != owner:
                problems.append(f"network {name} is not labelled with the state's owner {owner}")
        problems += _container_problems(containers, networks, targets, stack, owner)

        record = stacks.get(stack)
        if record is None:
            problems.append(f"the state log has no record of {stack}")
        else:
            if record.revision != desired.revision or record.bundle_hash != desired.bundle_hash:
                problems.append(f"recorded revision {record.revision}, the source's {desired.revision}")
            recorded = {k: v.spec_hash for k, v in record.services.items()}
            if recorded != {k: t.spec_hash for k, t in targets.items()}:
                problems.append(f"recorded specs {recorded} differ from the bundle's")
        if not history or history[0].revision != desired.revision:
            problems.append("the newest history entry is not the applied revision")
        for svc, replicas in EXPECTED.items():
            nodes = assignments.get((stack, svc), {})
            slots = sorted((s for v in nodes.values() for s in v), key=int)
            if slots != [str(i) for i in range(1, replicas + 1)]:
                problems.append(f"assignment of {svc}: {nodes}")
        problems += [
            f"rollout {k} is {r.state}" for k, r in rollouts.items() if k[0] == stack and r.state != "completed"
        ]
        return problems


def _container_problems(
    containers: list[dict[str, Any]],
    networks: dict[str, dict[str, Any]],
    targets: dict[str, ServiceTarget],
    stack: str,
    owner: str,
) -> list[str]:
    """What is wrong with the stack's containers: one per slot, running, of the current spec, owner and networks."""
    problems: list[str] = []
    by_slot: dict[tuple[str, str], list[str]] = {}
    for c in containers:
        labels = c.get("Labels") or {}
        name = c["Names"][0].lstrip("/")
        svc, slot = labels.get("dabctl.service", ""), labels.get("dabctl.slot")
        target = targets.get(svc)
        if slot is None or target is None or labels.get("dabctl.stack") != stack:
            problems.append(f"container {name} is outside the slots (labels {labels})")
            continue
        if slot not in [str(i) for i in range(1, EXPECTED[svc] + 1)]:
            problems.append(f"container {name} is in slot {slot}, beyond the {EXPECTED[svc]} replicas")
        by_slot.setdefault((svc, slot), []).append(name)
        if c["State"] != "running":
            problems.append(f"container {name} is {c['State']}")
        if labels.get("dabctl.spec") != target.spec_hash:
            problems.append(f"container {name} has spec {labels.get('dabctl.spec')}, want {target.spec_hash}")
        if labels.get("dabctl.owner") != owner:
            problems.append(f"container {name} has owner {labels.get('dabctl.owner')}, the state {owner}")
        attached = {k: v.get("NetworkID") for k, v in (c["NetworkSettings"].get("Networks") or {}).items()}
        current = {k: networks[k]["Id"] for k in target.networks if k in networks}
        if attached != current:
            problems.append(f"container {name} is on {sorted(attached)}, want {sorted(target.networks)} (current)")
    for svc, replicas in EXPECTED.items():
        for slot in range(1, replicas + 1):
            names = by_slot.get((svc, str(slot)), [])
            if len(names) != 1:
                problems.append(f"{svc} slot {slot} has {len(names)} containers: {names}")
    return problems


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Until `pid` is a zombie or gone (our child: reaped by Popen.wait in the trial's thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.001)


def _after_call(
    proxy: DockerProxy, n: int, delay: float, stop: threading.Event, kill: Callable[[], None]
) -> Callable[[], None]:
    def run() -> None:
        while not stop.is_set():
            if len(proxy.calls) >= n:
                if not stop.wait(delay):
                    kill()
                return
            time.sleep(0.002)

    return run


def _when_answered(proxy: DockerProxy, n: int, stop: threading.Event, kill: Callable[[], None]) -> Callable[[], None]:
    """Kill as soon as `n` mutating calls have their answers: the pass is then recording its outcome."""

    def run() -> None:
        while not stop.is_set():
            if sum(1 for c in proxy.calls if c.mutating and c.status is not None) >= n:
                kill()
                return
            time.sleep(0.002)

    return run


def _wait_quiet(proxy: DockerProxy, timeout: float) -> list[str]:
    """Wait until every call that reached the proxy has the engine's answer, or the proxy has no connection left
    (a request the client died in the middle of sending never reaches the engine); the calls without an answer."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [c.endpoint for c in proxy.calls if c.status is None]
        # Private, but exact: a connection is forgotten once both of its sides are done.
        if not pending or not proxy._connections or time.monotonic() > deadline:
            return pending
        time.sleep(0.01)


def _tail(text: str, lines: int = 6) -> str:
    return " / ".join(text.strip().splitlines()[-lines:])


# --- fixtures and tests ---------------------------------------------------------------------------------------------


@pytest.fixture
def runner(docker_api: docker.APIClient, tmp_path: Path) -> Iterator[TrialRunner]:
    r = TrialRunner(docker_api, tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


def schedule(trials: list[Trial], lanes: int, cost: dict[str, float]) -> list[list[Trial]]:
    """Cycles of converge -> updates -> prune (each trial starts where the previous left), spread over lanes
    by estimated cost."""
    pools = {m: [t for t in trials if t.mode == m] for m in MODES}
    n_cycles = max(len(pools["converge"]), len(pools["prune"]), 1)
    per_cycle = -(-len(pools["update"]) // n_cycles)
    cycles: list[list[Trial]] = []
    while any(pools.values()):
        cycle = pools["converge"][:1] + pools["update"][:per_cycle] + pools["prune"][:1]
        del pools["converge"][:1], pools["update"][:per_cycle], pools["prune"][:1]
        cycles.append(cycle)
    out: list[list[Trial]] = [[] for _ in range(lanes)]
    load = [0.0] * lanes
    for cycle in sorted(cycles, key=lambda c: -sum(cost[t.mode] for t in c)):
        i = load.index(min(load))
        out[i] += cycle
        load[i] += sum(cost[t.mode] for t in cycle)
    return [lane for lane in out if lane]


def run_lanes(runner: TrialRunner, lanes: list[list[Trial]]) -> list[Trial]:
    with ThreadPoolExecutor(len(lanes)) as pool:
        return [t for done in pool.map(runner.run_lane, lanes) for t in done]


def test_sigkill_anywhere_in_a_pass_then_a_clean_pass_converges(runner: TrialRunner) -> None:
    t0 = time.monotonic()
    # Calibrate: an unkilled pass of each kind through the proxy counts its mutating calls and times it.
    controls = run_lanes(runner, [[Trial(m, Kill())] for m in MODES])
    bad = [t.line() for t in controls if not t.converged]
    assert not bad, "\n".join(bad)
    calls = {t.mode: t.mutating_total for t in controls}
    every_call = {t.mode: t.calls_total for t in controls}
    seconds = {t.mode: t.pass_seconds for t in controls}
    print(
        f"\ncrash consistency, seed {SEED}: unkilled passes "
        + ", ".join(f"{m}: {every_call[m]} calls, {calls[m]} mutating, in {seconds[m]:.1f}s" for m in MODES)
    )
    for mode, least in {"converge": 12, "update": 15, "prune": 12}.items():
        assert calls[mode] >= least, f"{mode} made only {calls[mode]} mutating calls"

    trials = [Trial(m, Kill(k=k)) for m in MODES for k in range(1, calls[m] + 1)]
    trials += [Trial(m, Kill(after_last=calls[m])) for m in MODES]
    rng = random.Random(SEED)
    n_random = max(RANDOM_TRIALS, MIN_TRIALS - len(trials))
    for i in range(n_random):
        mode = MODES[i % len(MODES)]
        # Anywhere from the first engine call (the state is open, planning starts) to the recording after the last.
        call = rng.randint(1, every_call[mode])
        trials.append(Trial(mode, Kill(after_call=call, delay=rng.uniform(0.0, 0.1))))
    done = run_lanes(runner, schedule(trials, WORKERS, {m: seconds[m] * 2 + 2 for m in MODES}))

    order = {m: i for i, m in enumerate(MODES)}
    done.sort(key=lambda t: (order[t.mode], t.kill.after_call is not None, t.kill.k or 99, t.kill.after_call or 0))
    print()
    for t in done:
        print("  " + t.line())
    for m in MODES:
        of_mode = [t for t in done if t.mode == m]
        print(
            f"  {m}: {len(of_mode)} trials, {sum(t.converged for t in of_mode)} converged, "
            f"{sum(t.killed for t in of_mode)} killed mid-pass"
        )
    converged = sum(t.converged for t in done)
    faults = sum(bool(t.engine_fault) for t in done)
    print(
        f"crash consistency: {len(done)} trials, {converged} converged, {faults} stopped by the engine's phantom "
        f"endpoint fault ({time.monotonic() - t0:.0f}s)"
    )
    for leak in runner.leaks:
        print(f"  cleanup could not remove: {leak}")

    assert len(done) >= MIN_TRIALS
    failed = [t.line() for t in done if not t.converged and not t.engine_fault]
    assert not failed, f"{len(failed)} of {len(done)} trials did not converge:\n" + "\n".join(failed)
    # Seen about once in 60 trials on the shared engine: the engine's phantom endpoint, reported, not hidden.
    faults = [t.line() for t in done if t.engine_fault]
    assert len(faults) <= MAX_ENGINE_FAULTS, "the engine's phantom-endpoint fault, too often:\n" + "\n".join(faults)
    missed = [t.line() for t in done if t.kill.k is not None and not t.killed]
    assert not missed, "a kill before the k-th mutating call must hit the running pass:\n" + "\n".join(missed)


def test_the_checks_catch_a_duplicate_an_orphan_and_a_stale_record(runner: TrialRunner) -> None:
    """The checks have teeth: on a converged stack, a second container in a slot, a stray network of the stack's
    prefix and a source the engine and state log have not caught up with are each reported."""
    lane = Lane(runner)
    lane.ready("update")  # converged at version 1, source at version 2 (not applied)
    ws = lane.ws
    ws.write("app", bundle(1))
    assert runner.check(ws, "converge") == []

    slot1 = ws.running("app", "web")[0]
    dup = runner.api.create_container("dabctl/sample:1", name=f"{ws.stack('app')}_web.1.dup", labels=slot1["Labels"])
    runner.api.create_network(f"{ws.stack('app')}_stray")
    ws.write("app", bundle(2))
    problems = "\n".join(runner.check(ws, "converge"))
    assert "plan --detailed-exitcode exited 2" in problems, problems
    assert f"web slot {slot1['Labels']['dabctl.slot']} has 2 containers" in problems and dup["Id"], problems
    assert "_stray" in problems, problems
    assert "recorded revision" in problems, problems
