"""The managed etcd's member planner (reconcilers/etcdmembers.py) as tables, and the member's command line and
adoption from its pid file (agent/node/etcdmember.py) against real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.etcdmember import LocalMember, MemberSpec, etcd_argv
from agent.node.etcdroles import LearnerClock, converge_members
from agent.state.etcd import EtcdRefused, Refusal, refusal
from agent.state.etcdcluster import RETRY_MAX, EtcdMembership, MemberChangeRefused, _retry
from reconcilers.etcdmembers import (
    LEARNER_GRACE,
    AddLearner,
    Member,
    MemberAction,
    Promote,
    Remove,
    plan_members,
    removal_refusal,
)

P = {n: f"https://10.0.0.{i}:2380" for i, n in enumerate(("a", "b", "c", "d"), start=1)}


def voter(name: str, learner: bool = False, started: bool = True) -> Member:
    return Member(id=f"id-{name}", name=name if started else "", peer_urls=(P[name],), learner=learner)


@pytest.mark.parametrize(
    ("wanted", "members", "actions"),
    [
        pytest.param("a", [voter("a")], [], id="converged: one"),
        pytest.param("abc", [voter("a"), voter("b"), voter("c")], [], id="converged: three"),
        pytest.param("ab", [voter("a")], [AddLearner("b", P["b"])], id="a new manager: learner"),
        pytest.param("abc", [voter("a")], [AddLearner("b", P["b"])], id="one learner at a time"),
        pytest.param("abc", [voter("a"), voter("b", learner=True)], [Promote("id-b", "b")], id="promote, then add"),
        pytest.param(
            "ab", [voter("a"), voter("b", learner=True, started=False)], [Promote("id-b", "b")], id="unstarted learner"
        ),
        pytest.param("ab", [voter("a"), voter("b"), voter("c")], [Remove("id-c", "c")], id="demoted manager"),
        pytest.param("b", [voter("a")], [AddLearner("b", P["b"])], id="the last voter stays: add first"),
        pytest.param("a", [voter("a"), voter("d", learner=True)], [Remove("id-d", "d")], id="a learner not wanted"),
    ],
)
def test_plan_members(wanted: str, members: list[Member], actions: list[MemberAction]) -> None:
    assert plan_members({n: P[n] for n in wanted}, members) == actions


OLD = LEARNER_GRACE + 1  # a learner's age past the grace period


@pytest.mark.parametrize(
    ("wanted", "live", "members", "ages", "actions"),
    [
        pytest.param("ab", "ab", [voter("a"), voter("b", learner=True)], {"id-b": OLD}, [Promote("id-b", "b")],
                     id="a live manager's learner is promoted, however long it waited"),
        pytest.param("ab", "a", [voter("a"), voter("b", learner=True)], {"id-b": 10}, [Promote("id-b", "b")],
                     id="a joining manager (not up yet) within the grace period"),
        pytest.param("ab", "a", [voter("a"), voter("b", learner=True)], {"id-b": OLD}, [Remove("id-b", "b")],
                     id="its joiner died: removed after the grace period"),
        pytest.param("ab", "a", [voter("a"), voter("b", learner=True, started=False)], {"id-b": OLD},
                     [Remove("id-b", "b")], id="never started, its joiner died"),
        pytest.param("a", "a", [voter("a"), voter("d", learner=True, started=False)], {"id-d": 10}, [],
                     id="a learner of no known node: a join in flight"),
        pytest.param("a", "a", [voter("a"), voter("d", learner=True, started=False)], {"id-d": OLD},
                     [Remove("id-d", "")], id="a learner of no known node, after the grace period"),
        pytest.param("a", "a", [voter("a"), voter("d", learner=True)], {}, [Remove("id-d", "d")],
                     id="a learner of a node no longer a manager: at once"),
        pytest.param("abc", "ab", [voter("a")], {}, [AddLearner("b", P["b"])], id="add only a live manager"),
        pytest.param("ac", "a", [voter("a")], {}, [], id="a manager that is down gets no member"),
        pytest.param("ab", "a", [voter("a"), voter("b")], {}, [], id="a voter of a manager that is down stays"),
        pytest.param("a", "a", [voter("a"), voter("b"), voter("c", learner=True)], {"id-c": OLD},
                     [Remove("id-b", "b"), Remove("id-c", "c")], id="removals first, in node order"),
        pytest.param("abc", "abc", [voter("a"), voter("b", learner=True), voter("c", learner=True)], {},
                     [Promote("id-b", "b"), Promote("id-c", "c")], id="promotions, no addition while learners wait"),
        pytest.param("", "", [voter("a")], {}, [], id="the last voter stays even when no manager wants it"),
    ],
)  # fmt: skip
def test_plan_members_with_liveness_and_learner_age(
    wanted: str, live: str, members: list[Member], ages: dict[str, float], actions: list[MemberAction]
) -> None:
    planned = plan_members({n: P[n] for n in wanted}, members, live=set(live), learner_age=ages)
    assert planned == actions


def test_without_liveness_no_learner_is_ever_stale() -> None:
    members = [voter("a"), voter("b", learner=True)]
    assert plan_members({"a": P["a"], "b": P["b"]}, members, learner_age={"id-b": OLD * 100}) == [Promote("id-b", "b")]


def test_the_learner_clock_counts_from_first_sight_and_forgets_promoted_learners() -> None:
    now = [100.0]
    clock = LearnerClock(lambda: now[0])
    assert clock.ages([voter("a"), voter("b", learner=True)]) == {"id-b": 0.0}
    now[0] = 250.0
    assert clock.ages([voter("a"), voter("b", learner=True), voter("c", learner=True)]) == {"id-b": 150.0, "id-c": 0.0}
    now[0] = 300.0
    assert clock.ages([voter("a"), voter("b"), voter("c", learner=True)]) == {"id-c": 50.0}
    assert clock.ages([voter("a"), voter("b", learner=True)]) == {"id-b": 0.0}  # a new learner with that id


THREE = [voter("a"), voter("b"), voter("c")]


@pytest.mark.parametrize(
    ("members", "target", "up", "safe"),
    [
        pytest.param(THREE, "id-c", ["id-a", "id-b", "id-c"], True, id="all up"),
        pytest.param(THREE, "id-c", ["id-a", "id-b"], True, id="the one that is down"),
        pytest.param(THREE, "id-a", ["id-a", "id-b"], False, id="a live one while another is down"),
        pytest.param([voter("a"), voter("b")], "id-a", ["id-a"], False, id="leaves one voter, down"),
        pytest.param([voter("a"), voter("b")], "id-a", ["id-a", "id-b"], True, id="leaves one voter, up"),
        pytest.param([voter("a")], "id-a", ["id-a"], False, id="the last voter"),
        pytest.param([voter("a"), voter("b", learner=True)], "id-b", [], True, id="a learner always"),
        pytest.param(THREE, "id-x", [], True, id="no such member"),
    ],
)
def test_removal_refusal(members: list[Member], target: str, up: list[str], safe: bool) -> None:
    reason = removal_refusal(members, target, up)
    assert (reason is None) == safe, reason


def _spec(new: bool = True) -> MemberSpec:
    return MemberSpec(
        name="n1", address="10.0.0.1", ca_file="/p/ca.crt", cert_file="/p/n1.crt", key_file="/p/n1.key",
        cluster_token="c1", initial_cluster={"n1": "https://10.0.0.1:2380", "n0": "https://10.0.0.9:2380"},
        new_cluster=new,
    )  # fmt: skip


def test_the_member_speaks_tls_with_client_certificates_on_both_ports() -> None:
    argv = etcd_argv(_spec(new=False), Path("/s/etcd/data"))
    assert argv[0] == "/usr/bin/etcd"
    for flag in (
        "--client-cert-auth",
        "--peer-client-cert-auth",
        "--listen-client-urls=https://10.0.0.1:2379,https://127.0.0.1:2379",
        "--listen-peer-urls=https://10.0.0.1:2380",
        "--initial-cluster=n0=https://10.0.0.9:2380,n1=https://10.0.0.1:2380",
        "--initial-cluster-state=existing",
        "--data-dir=/s/etcd/data",
        "--trusted-ca-file=/p/ca.crt",
        "--peer-trusted-ca-file=/p/ca.crt",
    ):
        assert flag in argv
    assert not any(a.startswith("http://") or "=http://" in a for a in argv)
    assert "--initial-cluster-state=new" in etcd_argv(_spec(), Path("/d"))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def _fake(procs: list[subprocess.Popen[bytes]], argv0: str, *args: str) -> int:
    """A sleeping process whose command line reads `argv0 -c ... args` (argv[0] set by `exec -a`)."""
    code = "import time; time.sleep(60)"
    p = subprocess.Popen(["bash", "-c", f'exec -a "$0" "{sys.executable}" -c "{code}" "$@"', argv0, *args])
    procs.append(p)
    return p.pid


def _wait_cmdline(pid: int, argv0: str) -> None:
    import time

    deadline = time.monotonic() + 5
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(argv0.encode()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_member_is_adopted_only_when_its_pid_is_etcd_on_this_data_directory(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    local = LocalMember(tmp_path)
    assert local.pid() is None  # no pid file
    local.dir.mkdir()
    ours = _fake(procs, "/usr/bin/etcd", "--name=n1", f"--data-dir={local.data_dir}")
    other_dir = _fake(procs, "/usr/bin/etcd", f"--data-dir={tmp_path / 'elsewhere'}")
    not_etcd = _fake(procs, "/usr/bin/sleepy", f"--data-dir={local.data_dir}")
    for pid, argv0 in ((ours, "/usr/bin/etcd"), (other_dir, "/usr/bin/etcd"), (not_etcd, "/usr/bin/sleepy")):
        _wait_cmdline(pid, argv0)
    for pid, adopted in ((ours, ours), (other_dir, None), (not_etcd, None), (999_999_999, None)):
        local.pid_file.write_text(f"{pid}\n")
        assert local.pid() == adopted
    local.pid_file.write_text("garbage")
    assert local.pid() is None
    local.pid_file.write_text(f"{ours}\n")
    local.stop(timeout=5)  # SIGTERM; the fake exits
    procs[0].wait(timeout=5)
    assert local.pid() is None and not local.pid_file.exists()


def refused_by_etcd(message: str) -> EtcdRefused:
    """What EtcdStateLog raises when etcd answers `message`."""
    return EtcdRefused(f"etcd refused the request: {message}", refusal(message))


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("etcdserver: can only promote a learner member which is in sync with leader", Refusal.LEARNER_NOT_IN_SYNC),
        ("etcdserver: can only promote a learner member", Refusal.NOT_A_LEARNER),
        ("etcdserver: too many learner members in cluster", Refusal.TOO_MANY_LEARNERS),
        ("etcdserver: unhealthy cluster", Refusal.UNHEALTHY_CLUSTER),
        ("etcdserver: request timed out", Refusal.TIMED_OUT),
        ("etcdserver: leader changed", Refusal.LEADER_CHANGED),
        ("etcdserver: mvcc: required revision is a future revision", Refusal.FUTURE_REVISION),
        ("etcdserver: revision of auth store is old", Refusal.STALE_TOKEN),
        ("etcdserver: user name is empty", Refusal.STALE_TOKEN),
        ("etcdserver: permission denied", Refusal.PERMISSION),
        ("etcdserver: re-configuration failed due to not enough started members", Refusal.OTHER),
    ],
)
def test_etcds_refusals_are_read_once_into_a_kind(message: str, kind: Refusal) -> None:
    assert refusal(message) is kind


class FakeMembers:
    """etcd's membership as a list; records the changes asked for; `not_caught_up` learners refuse promotion."""

    def __init__(self, members: list[Member], not_caught_up: tuple[str, ...] = ()) -> None:
        self.list = list(members)
        self.not_caught_up = not_caught_up
        self.calls: list[str] = []

    def members(self) -> list[Member]:
        return list(self.list)

    def promote(self, member_id: str, timeout: float = 60) -> None:
        self.calls.append(f"promote {member_id}")
        if member_id in self.not_caught_up:
            raise MemberChangeRefused("can only promote a learner member which is in sync with leader")

    def remove(self, member_id: str) -> None:
        self.calls.append(f"remove {member_id}")


@pytest.mark.parametrize(
    ("members", "managers", "up", "calls", "refused"),
    [
        pytest.param(THREE, "abc", "abc", [], 0, id="converged"),
        pytest.param(THREE, "ab", "abc", ["remove id-c"], 0, id="c demoted or removed"),
        pytest.param(THREE, "ab", "ac", [], 1, id="removing c would lose quorum (b down)"),
        pytest.param([voter("a"), voter("b", learner=True)], "ab", "ab", ["promote id-b"], 0, id="promote"),
        pytest.param([voter("a"), voter("d", learner=True, started=False)], "a", "a", [], 0, id="a join in flight"),
        pytest.param([voter("a")], "ab", "a", [], 0, id="additions are the joining node's"),
    ],
)
def test_converge_members(members: list[Member], managers: str, up: str, calls: list[str], refused: int) -> None:
    api = FakeMembers(members)
    done = converge_members(api, {n: P[n] for n in managers}, lambda found: [f"id-{n}" for n in up])
    assert api.calls == calls
    assert sum("refused" in line for line in done) == refused


def test_a_learner_not_caught_up_is_promoted_on_a_later_step() -> None:
    api = FakeMembers([voter("a"), voter("b", learner=True)], not_caught_up=("id-b",))
    assert converge_members(api, {"a": P["a"], "b": P["b"]}, lambda found: ["id-a", "id-b"]) == [
        "promote learner b to a voting member: not yet (can only promote a learner member which is in sync with leader)"
    ]


def test_a_stale_learner_is_removed_once_the_clock_says_so() -> None:
    now = [0.0]
    clock = LearnerClock(lambda: now[0])
    api = FakeMembers([voter("a"), voter("b", learner=True, started=False)], not_caught_up=("id-b",))
    wanted = {"a": P["a"], "b": P["b"]}
    converge_members(api, wanted, lambda found: ["id-a"], live={"a"}, clock=clock)
    assert api.calls == ["promote id-b"]
    now[0] = LEARNER_GRACE
    assert converge_members(api, wanted, lambda found: ["id-a"], live={"a"}, clock=clock) == ["remove member b"]
    assert api.calls[-1] == "remove id-b"


def test_a_refused_membership_change_is_tried_again_soon_after_etcd_would_take_it() -> None:
    """A joining manager's promotion (or addition) succeeds at a moment etcd decides; the retry must not overshoot
    it by a long back-off (it was 2 s: up to 1.9 s lost per manager join, bench/init.py). Simulated clock."""
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    for takes in (0.3, 1.0, 3.7):

        def promote(takes: float = takes) -> dict[str, object]:
            if clock[0] < takes:
                raise refused_by_etcd("etcdserver: can only promote a learner member which is in sync with leader")
            return {}

        clock[0] = 0.0
        not_in_sync = {Refusal.LEARNER_NOT_IN_SYNC}
        assert _retry(promote, not_in_sync, timeout=60, clock=lambda: clock[0], sleep=sleep) == {}
        assert clock[0] - takes <= RETRY_MAX

    def refused() -> dict[str, object]:
        raise refused_by_etcd("etcdserver: unhealthy cluster")

    clock[0] = 0.0
    with pytest.raises(MemberChangeRefused, match="unhealthy"):
        _retry(refused, {Refusal.UNHEALTHY_CLUSTER}, timeout=5, clock=lambda: clock[0], sleep=sleep)
    assert 4.5 <= clock[0] <= 5


class _Gateway:
    """etcd's cluster calls: a member list, and removals refused `refusals` times with etcd's 5 s health rule."""

    def __init__(self, refusals: int, refusal: str = "etcdserver: unhealthy cluster") -> None:
        self.members = [{"ID": "1", "name": "a"}, {"ID": "2", "name": "b"}]
        self.refusals = refusals
        self.refusal = refusal
        self.removes = 0

    def _call(self, path: str, body: dict[str, object], retry_reads: bool = True) -> dict[str, object]:
        if path == "/cluster/member/list":
            return {"members": list(self.members)}
        assert path == "/cluster/member/remove"
        self.removes += 1
        if self.refusals:
            self.refusals -= 1
            raise refused_by_etcd(self.refusal)
        self.members = [m for m in self.members if m["ID"] != body["ID"]]
        return {}


def test_a_removal_right_after_another_change_waits_for_etcd_to_take_it() -> None:
    """A demotion right after a promotion: etcd refuses a member change until every voter has been connected 5 s
    ("unhealthy cluster"); the removal is tried again, and a removed member is not removed twice."""
    gateway = _Gateway(refusals=3)
    EtcdMembership(gateway).remove("2", timeout=10)  # type: ignore[arg-type]
    assert gateway.removes == 4 and [m["ID"] for m in gateway.members] == ["1"]
    EtcdMembership(gateway).remove("2", timeout=10)  # type: ignore[arg-type]
    assert gateway.removes == 4
    other = _Gateway(refusals=1, refusal="etcdserver: re-configuration failed due to not enough started members")
    with pytest.raises(MemberChangeRefused, match="refused to remove member 2"):
        EtcdMembership(other).remove("2", timeout=10)  # type: ignore[arg-type]
