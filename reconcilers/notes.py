"""What a plan says beside its actions: a rollout that paused or rolls back, a slot given up on, an image that
could not be checked. A note's kind decides what it means (a failing stack or information); its text is what
the plan prints."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class NoteKind(StrEnum):
    """Why a service has a note."""

    ROLLOUT_PAUSED = "rollout-paused"  # past MaxFailureRatio (or a rollback failed): waits for a person
    ROLLING_BACK = "rolling-back"  # past MaxFailureRatio with FailureAction rollback: the rollback proceeds
    RESTART_GIVEN_UP = "restart-given-up"  # a slot exceeded its RestartPolicy's MaxAttempts: left down
    IMAGE_CHECK_FAILED = "image-check-failed"  # the registry could not say a tag's digest: replicas stay as they are

    @property
    def failing(self) -> bool:
        """The stack counts as failed: the command exits 1, the agent reports it and retries with backoff."""
        return self is not NoteKind.ROLLING_BACK


@dataclass(frozen=True)
class Note:
    """A note on one service of a plan; its text (`<service>: <what>`) is the plan's line."""

    service: str
    kind: NoteKind
    text: str

    @property
    def failing(self) -> bool:
        return self.kind.failing

    def __str__(self) -> str:
        return f"{self.service}: {self.text}"
