"""The embedded SQLite log under kill -9 and between processes: acknowledged writes survive, one writer at a time."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from agent.state.log import ReadOnly, StateLocked
from agent.state.sqlite import SqliteStateLog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]

# Each txn writes /crash/<i> and /crash-last = i together; a line is printed only after txn() returned.
WRITER = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from agent.state.log import Put
from agent.state.sqlite import SqliteStateLog

log = SqliteStateLog(Path(sys.argv[1]))
durable = sys.argv[2] == "durable"
print("ready", os.getpid(), flush=True)
i = 0
while True:
    key = f"/crash/{{i:06d}}"
    log.txn([], [Put(key, key.encode() * 8), Put("/crash-last", str(i).encode())], durable=durable or i % 3 == 0)
    print(key, flush=True)
    i += 1
"""


class Child:
    """The writer script in its own process; stdout is read line by line, stderr goes to a file."""

    def __init__(self, db: Path, stderr_path: Path, mode: str = "durable") -> None:
        self.stderr_path = stderr_path
        self._stderr: IO[bytes] = open(stderr_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), mode],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=str(ROOT),
        )
        first = self.readline()
        assert first.split()[:1] == ["ready"], f"writer did not start: {first!r}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"writer exited with {self.proc.returncode}:\n{self.stderr_path.read_text(errors='replace')}"
            )
        return line.strip()

    def acknowledged(self, n: int) -> list[str]:
        return [self.readline() for _ in range(n)]

    def kill(self) -> None:
        """SIGKILL and reap; idempotent."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start writer children that are killed after the test, whatever happens."""
    children: list[Child] = []

    def _spawn(db: Path, mode: str = "durable") -> Child:
        child = Child(db, tmp_path / f"writer-{len(children)}.err", mode)
        children.append(child)
        return child

    yield _spawn
    for child in children:
        child.kill()


def integrity(db: Path) -> str:
    conn = sqlite3.connect(str(db))
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# "mixed": two of three commits durable=False (synchronous=NORMAL, as a pass's outcome is committed): kill -9 loses
# none of them either, the WAL has them in the page cache; only a power cut can (the commits after the last durable).
@pytest.mark.parametrize("mode", ["durable", "mixed"])
def test_every_acknowledged_write_survives_kill9(tmp_path: Path, spawn: Callable[..., Child], mode: str) -> None:
    rng = random.Random()
    for trial in range(5):
        db = tmp_path / f"trial{trial}" / "state.db"
        child = spawn(db, mode)
        acked = child.acknowledged(rng.randint(1, 150))
        time.sleep(rng.random() * 0.05)  # the kill lands somewhere inside a later txn
        child.kill()

        log = SqliteStateLog(db)  # the lock died with the child; the database opens
        try:
            for key in acked:
                kv = log.get(key)
                assert kv is not None, f"trial {trial}: acknowledged {key} lost ({len(acked)} acknowledged)"
                assert kv.value == key.encode() * 8
            last_kv = log.get("/crash-last")
            assert last_kv is not None
            last = int(last_kv.value)
            assert last >= len(acked) - 1
            # Each txn was atomic and one revision: exactly the keys 0..last exist, at revisions 1..last+1.
            keys = log.range("/crash/")
            assert [k.key for k in keys] == [f"/crash/{i:06d}" for i in range(last + 1)]
            assert [k.mod_revision for k in keys] == list(range(1, last + 2))
            assert log.revision() == last + 1
            # ... and it takes writes again.
            assert log.put("/after", b"x") == last + 2
        finally:
            log.close()
        assert integrity(db) == "ok"


def test_one_writer_at_a_time_readers_never_block(tmp_path: Path, spawn: Callable[[Path], Child]) -> None:
    db = tmp_path / "state" / "state.db"
    child = spawn(db)
    child.acknowledged(20)  # the child keeps writing while we try

    began = time.monotonic()
    with pytest.raises(StateLocked) as info:
        SqliteStateLog(db)
    assert time.monotonic() - began < 2, "a second writer waited instead of failing"
    assert str(child.pid) in str(info.value), f"the message does not name the holder: {info.value}"

    began = time.monotonic()
    reader = SqliteStateLog(db, writer=False)
    try:
        kv = reader.get("/crash/000000")
        assert kv is not None
        assert kv.value == b"/crash/000000" * 8
        assert len(reader.range("/crash/")) >= 20
        # Readers see the writer's progress, not a snapshot from when they opened.
        # (Compared with keys acknowledged after the reader opened: the child may be ahead of what we have read.)
        last = child.acknowledged(5)[-1]
        assert reader.get(last) is not None
        assert reader.revision() >= int(last.rsplit("/", 1)[1]) + 1
        assert time.monotonic() - began < 5, "the reader was blocked by the writer"
        with pytest.raises(ReadOnly):
            reader.put("/x", b"")
        with pytest.raises(ReadOnly):
            reader.delete("/crash/", prefix=True)
        assert reader.get("/crash/000000") is not None
    finally:
        reader.close()

    child.kill()
    writer = SqliteStateLog(db)  # the lock is free once the holder is dead
    try:
        assert writer.get("/crash/000000") is not None
        before = writer.revision()
        assert writer.put("/new-writer", b"1") == before + 1
    finally:
        writer.close()
    # Closing released the lock too.
    again = SqliteStateLog(db)
    again.close()
