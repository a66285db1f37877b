"""Which etcd members a cluster that runs its own etcd should have, pure: one member per manager, added as a
learner and promoted once it has caught up, removed when its node stops being a manager — never at the cost of
quorum.

    plan_members(wanted, members) -> [AddLearner | Promote | Remove]
    removal_refusal(members, member_id, up) -> the reason removing it would lose quorum, or None

etcd 3.4 admits one learner at a time, so the plan adds a new member only when no learner is waiting, and it
removes a member only when the members left still have a quorum of voters that answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


def voters(members: Iterable[Member]) -> list[Member]:
    return [m for m in members if not m.learner]


def quorum(n_voters: int) -> int:
    return n_voters // 2 + 1


def _node_of(member: Member, wanted: Mapping[str, str]) -> str:
    """The node a member belongs to: by name once it started, else by its peer URL (a learner not yet started)."""
    if member.name:
        return member.name
    return next((node for node, url in wanted.items() if url in member.peer_urls), "")


def plan_members(wanted: Mapping[str, str], members: Sequence[Member]) -> list[MemberAction]:
    """Actions taking `members` towards one voting member per node of `wanted` (node id -> peer URL).

    Removals come first (only of voters other than the last one), then promotions of learners, then one addition
    when no learner is waiting. A removal that would lose quorum is still planned: the caller checks it with
    `removal_refusal` against the members it sees answering, and reports the refusal."""
    actions: list[MemberAction] = []
    held = {_node_of(m, wanted): m for m in members}
    for node, m in sorted(held.items()):
        if node not in wanted and (m.learner or len(voters(members)) > 1):
            actions.append(Remove(m.id, node))
    for node, m in sorted(held.items()):
        if node in wanted and m.learner:
            actions.append(Promote(m.id, node))
    if not any(m.learner for m in members):
        missing = sorted(node for node in wanted if node not in held)
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
