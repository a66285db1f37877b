"""The one policy check between a desired container and the engine: `admit`, called right before every create
and start (a restart in place included), whatever revision the container comes from — the source's, a pin's or
an automatic rollback's.

It runs the bundle policy's rules for the service (bundles.policy.service_refusals), then resolves each bind
source on this node (agent.node.hostpaths) and holds the resolved path to the same rules, with the config's
entries and the deny set resolved too: `/var/run/docker.sock` and `/run/docker.sock` are one file, and a
symlink a container planted is refused before Docker would follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.node.hostpaths import UntrustedPath, realpath, resolve
from bundles.desired import ServiceTarget
from bundles.policy import BindAllow, Denied, Policy, refuse_bind, service_refusals
from schemas.errors import DabctlError


class PolicyRefused(DabctlError):
    """A container the policy refuses was about to be created or started; nothing was."""

    def __init__(self, target: ServiceTarget, field: str, rule: str, message: str) -> None:
        super().__init__(f"{target.full_name}: {field}: {message}")
        self.rule = rule


@dataclass(frozen=True)
class Resolved:
    """The policy's entries as this node resolves them now (both as written and where they lead)."""

    allows: tuple[BindAllow, ...]
    deny: tuple[Denied, ...]


def resolved(policy: Policy) -> Resolved:
    allows = {a for e in policy.allows for a in (e, BindAllow(realpath(e.path), e.read_only))}
    deny = {d for e in policy.deny for d in (e, Denied(realpath(e.path), e.rule, e.gives, e.prefix))}
    return Resolved(tuple(sorted(allows, key=lambda a: a.path)), tuple(sorted(deny, key=lambda d: d.path)))


def admit(target: ServiceTarget, policy: Policy) -> None:
    """Return when the policy lets `target`'s container be created or started on this node; PolicyRefused
    (naming the service, the field and the rule) otherwise."""
    refusals = service_refusals(target.service, policy)
    if refusals:
        where, refusal = refusals[0]
        raise PolicyRefused(target, where, refusal.rule, str(refusal))
    if "host" in target.networks and not policy.allow_host_network:
        raise PolicyRefused(
            target,
            "Networks",
            "no-host-network",
            "joining the host's network is refused by policy rule "
            "'no-host-network'; allow it in the agent config: allow_host_network: true",
        )
    mounts = [(i, m) for i, m in enumerate(target.service.mounts or []) if m.type == "bind" and m.source]
    if not mounts:
        return
    entries = resolved(policy)
    for i, m in mounts:
        assert m.source is not None
        field = f"Mounts[{i}].Source"
        try:
            source = resolve(m.source)
        except UntrustedPath as exc:
            raise PolicyRefused(target, field, exc.rule, str(exc)) from None
        found = refuse_bind(source, m.read_only, entries.allows, entries.deny, written=m.source)
        if found:
            raise PolicyRefused(target, field, found.rule, str(found))
