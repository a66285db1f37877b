"""Which etcd members a cluster that runs its own etcd should have, pure: one member per manager, added as a
learner and promoted once it has caught up, removed when its node stops being a manager — never at the cost of
quorum.

    plan_members(wanted, members, live=, learner_age=) -> [AddLearner | Promote | Remove]
    removal_refusal(members, member_id, up) -> the reason removing it would lose quorum, or None

etcd 3.4 admits one learner at a time, so the plan adds a new member only when no learner is waiting, and it
removes a member only when the members left still have a quorum of voters that answer. A learner whose node is
not up after LEARNER_GRACE seconds (its joiner died before it caught up) is removed, so that it blocks no later
join.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Member:
    """An etcd member as `/v3/cluster/member/list` shows it; `name` is the node id ("" until it first started)."""

    id: str
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...] = ()
    learner: bool = False


@dataclass(frozen=True)
class AddLearner:
    node_id: str
    peer_url: str

    def __str__(self) -> str:
        return f"add member {self.node_id} ({self.peer_url}) as a learner"


@dataclass(frozen=True)
class Promote:
    member_id: str
    node_id: str

    def __str__(self) -> str:
        return f"promote learner {self.node_id} to a voting member"


@dataclass(frozen=True)
class Remove:
    member_id: str
    node_id: str

    def __str__(self) -> str:
        return f"remove member {self.node_id or self.member_id}"


MemberAction = AddLearner | Promote | Remove

# A learner waits this long for its node before it is taken for a dead join and removed: longer than a joining
# manager gives its learner to catch up and be promoted (agent/node/join.py waits up to 120 s), with a margin.
LEARNER_GRACE = 180.0


def voters(members: Iterable[Member]) -> list[Member]:
    return [m for m in members if not m.learner]


def quorum(n_voters: int) -> int:
    return n_voters // 2 + 1


def _node_of(member: Member, wanted: Mapping[str, str]) -> str:
    """The node a member belongs to: by name once it started, else by its peer URL (a learner not yet started)."""
    if member.name:
        return member.name
    return next((node for node, url in wanted.items() if url and url in member.peer_urls), "")


def _action(
    m: Member,
    node: str,
    wanted: Mapping[str, str],
    live: Collection[str] | None,
    *,
    age: float,
    grace: float,
    n_voters: int,
) -> MemberAction | None:
    """What one member needs: a manager's learner is promoted, unless it waited `grace` seconds while its node is
    not live (its joiner died); a member of no manager is removed (a voter only while another voter stays; a
    learner of no known node only after `grace`: a join may still be starting it)."""
    if m.learner:
        stale = age >= grace and (live is not None and node not in live)
        if node in wanted:
            return Remove(m.id, node) if stale else Promote(m.id, node)
        return Remove(m.id, node) if node or stale else None
    if node and node not in wanted and n_voters > 1:
        return Remove(m.id, node)
    return None


def plan_members(
    wanted: Mapping[str, str],
    members: Sequence[Member],
    *,
    live: Collection[str] | None = None,
    learner_age: Mapping[str, float] | None = None,
    grace: float = LEARNER_GRACE,
) -> list[MemberAction]:
    """Actions taking `members` towards one voting member per node of `wanted` (manager node id -> peer URL, ""
    when its address is not known).

    `live`: the managers that are up (None: liveness unknown, no learner is ever stale); `learner_age`: seconds
    each learner (by member id) has been seen waiting. Removals come first (only of voters other than the last
    one), then promotions of learners, then one addition, for a live manager without a member, when no learner is
    waiting. A removal that would lose quorum is still planned: the caller checks it with `removal_refusal`
    against the members it sees answering, and reports the refusal."""
    ages = learner_age or {}
    n_voters = len(voters(members))
    planned = [
        _action(m, _node_of(m, wanted), wanted, live, age=ages.get(m.id, 0.0), grace=grace, n_voters=n_voters)
        for m in sorted(members, key=lambda m: (_node_of(m, wanted), m.id))
    ]
    actions: list[MemberAction] = [a for a in planned if isinstance(a, Remove)]
    actions += [a for a in planned if isinstance(a, Promote)]
    if not any(m.learner for m in members):
        held = {_node_of(m, wanted) for m in members}
        missing = sorted(n for n, url in wanted.items() if url and n not in held and (live is None or n in live))
        if missing:
            actions.append(AddLearner(missing[0], wanted[missing[0]]))
    return actions


def removal_refusal(members: Sequence[Member], member_id: str, up: Iterable[str]) -> str | None:
    """Why removing `member_id` would cost the cluster its quorum (None when it is safe). `up`: ids of the members
    that answer now. A learner never counts towards quorum, so removing one is always safe."""
    target = next((m for m in members if m.id == member_id), None)
    if target is None or target.learner:
        return None
    left = [m for m in voters(members) if m.id != member_id]
    if not left:
        return "it is the cluster's last voting etcd member: the cluster's state would go with it"
    answering = len({m.id for m in left} & set(up))
    needed = quorum(len(left))
    if answering < needed:
        return (
            f"the {len(left)} voting members left need {needed} answering for quorum and only {answering} do: "
            "bring the others back first, or recover the cluster from this member (`--force-new-cluster`)"
        )
    return None
