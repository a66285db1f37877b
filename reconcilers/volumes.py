"""Named volumes: what a stack's replicas may be started on, and the explicit move of a stack that predates
stack-scoped names (`<name>` -> `<stack>_<name>`).

Docker creates a named volume when a container that mounts it is created, empty. So a stack whose volumes were
named as written and are now `<stack>_<name>` would silently start on new, empty volumes while its data sits in the
old ones. `refusals` finds that case (pure); `migrations` plans the explicit move (pure): the stack's replicas stop,
each old volume's contents are copied into the new one, then replicas start on the new ones. dabctl never removes
a volume: the old one stays until its owner removes it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

from reconcilers.outcome import ActionKind, Outcome, Result, one_line


@dataclass(frozen=True)
class MigrateVolume:
    """Copy the contents of the volume a stack used before scoped names into its scoped one."""

    stack: str
    old: str
    new: str
    image: str  # an image present on the node that the copy's helper container is created from (never started)
    kind: ClassVar[ActionKind] = ActionKind.UPDATE

    def __str__(self) -> str:
        return f"{self.kind.sign} {self.stack} volume {self.old} → {self.new} (contents copied; {self.old} is kept)"


class VolumeRuntime(Protocol):
    """The narrow engine interface this reconciler needs."""

    def list_volumes(self) -> set[str]:
        """The names of every volume on the engine (one list call)."""
        ...

    def copy_volume(self, old: str, new: str, image: str) -> None:
        """Create volume `new` and copy `old`'s contents into it (owners and modes kept)."""
        ...


def refusals(stacks: Mapping[str, Mapping[str, str]], existing: Collection[str]) -> dict[str, str]:
    """Stacks that would start replicas on a new, empty scoped volume while a volume of the old name exists, with
    one line saying why and how to go on (pure). `stacks`: stack -> its volumes (the bundle's name -> the engine's)
    for which replicas are about to be created."""
    out: dict[str, str] = {}
    for stack, volumes in sorted(stacks.items()):
        stranded = sorted(old for old, new in volumes.items() if new != old and new not in existing and old in existing)
        if stranded:
            names = ", ".join(stranded)
            out[stack] = (
                f"volume {names} exists but this stack's volumes are now named {stack}_<name>: refusing to start "
                f"replicas on a new, empty {stack}_{stranded[0]}; copy the data with "
                f"`dabctl reconcile --once --migrate-volumes {stack}`, or keep using the old volume with "
                f"Volumes: {{{stranded[0]}: {{External: true}}}} and allow_external_volumes: [{stranded[0]}]"
            )
    return out


def migrations(
    stack: str, volumes: Mapping[str, str], existing: Collection[str], image: str
) -> tuple[list[MigrateVolume], str | None]:
    """The copies that move `stack` to scoped names (pure), or why it cannot move. A volume whose old name does
    not exist has nothing to copy; one whose new name exists already is refused (copying would merge the two)."""
    actions = []
    for old, new in sorted(volumes.items()):
        if new == old or old not in existing:
            continue
        if new in existing:
            return [], (
                f"cannot move volume {old} to {new}: both exist; remove the one whose data you do not want "
                "(docker volume rm), then migrate again"
            )
        actions.append(MigrateVolume(stack, old, new, image))
    return actions, None


def apply(runtime: VolumeRuntime, action: MigrateVolume) -> Result[MigrateVolume]:
    """Copy one volume and report what it did; never raises for an engine error."""
    try:
        runtime.copy_volume(action.old, action.new, action.image)
    except Exception as exc:
        return Result(action, Outcome.FAILED, one_line(exc))
    return Result(action, Outcome.UPDATED)
