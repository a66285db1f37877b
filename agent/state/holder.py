"""An exclusive lock file that names its holder (pid, host, command and, for an agent, its API address).

The embedded state log takes one on `state.db.lock` so that one process writes it; the agent takes one on
`<state_dir>/agent.lock` whatever the state backend, which is how the CLI finds the agent it must send changing
commands to. The kernel drops an flock with its process, so a crashed holder never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from agent.private import open_private
from schemas.errors import DabctlError

AGENT_LOCK = "agent.lock"  # in the state directory: held by the running agent, names its API address


class Held(DabctlError):
    """The lock is held by another process; `holder` describes it."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class HolderLock:
    """flock(LOCK_EX) on `path`, with a JSON description of the holder written into the file (mode 0600)."""

    def __init__(self, path: Path, holder: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.holder = dict(holder or {})
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise Held naming the process that has it."""
        fd = open_private(self.path)  # never through a symbolic link: root would truncate what it points to
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Held(holder) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]), **self.holder}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def describe(self, **more: str) -> None:
        """Add to the holder's description (e.g. the API address once the port is bound)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held")
        self.holder.update(more)
        doc = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        doc.update(more)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(doc).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @staticmethod
    def holder_of(path: Path) -> dict[str, str] | None:
        """Who holds the lock at `path` (pid, command, api...), or None when nobody does."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    info = {}
                return {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {}
            return None
        finally:
            os.close(fd)
