"""The embedded state log: SQLite in WAL mode under the state directory, one node, zero setup."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from agent.statelog import Compare, Delete, KeyValue, Op, Put, TxnResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


class StateLogError(Exception):
    """The state log cannot be opened or used."""


class SqliteStateLog:
    """StateLog on one SQLite file; writes are serialised, each acknowledged write is on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateLogError(
                f"cannot open the state log {path}: {exc}; check --state-dir and its permissions"
            ) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def revision(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])

    def get(self, key: str) -> KeyValue | None:
        with self._lock:
            return self._get(key)

    def _get(self, key: str) -> KeyValue | None:
        row = self._db.execute(
            "SELECT key, value, create_revision, mod_revision, version FROM kv WHERE key=?", (key,)
        ).fetchone()
        return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None

    def range(self, prefix: str) -> list[KeyValue]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value, create_revision, mod_revision, version FROM kv "
                "WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return [KeyValue(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows]

    def put(self, key: str, value: bytes) -> int:
        return self.txn([], [Put(key, value)]).revision

    def delete(self, key: str, prefix: bool = False) -> int:
        return self.txn([], [Delete(key, prefix)]).revision

    def txn(self, compares: Sequence[Compare], then_ops: Sequence[Op], else_ops: Sequence[Op] = ()) -> TxnResult:
        """Check every compare and run then_ops (or else_ops) in one SQLite transaction."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                ok = all(self._holds(c) for c in compares)
                ops = then_ops if ok else else_ops
                rev = int(cur.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])
                if ops:
                    changed = [self._apply(cur, op, rev + 1) for op in ops]
                    if any(changed):  # as in etcd, a txn that changes nothing makes no revision
                        rev += 1
                        cur.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return TxnResult(ok, rev)

    def _holds(self, c: Compare) -> bool:
        kv = self._get(c.key)
        if c.target == "value":
            if kv is None:
                return c.op == "!="
            left: bytes | int = kv.value
        else:
            left = getattr(kv, c.target) if kv else 0
        right = c.operand
        if c.op == "==":
            return left == right
        if c.op == "!=":
            return left != right
        if c.op == "<":
            return left < right  # type: ignore[operator]
        return left > right  # type: ignore[operator]

    def _apply(self, cur: sqlite3.Cursor, op: Op, rev: int) -> bool:
        """Apply one operation; whether it changed anything."""
        if isinstance(op, Put):
            cur.execute(
                "INSERT INTO kv (key, value, create_revision, mod_revision, version) VALUES (?, ?, ?, ?, 1) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, mod_revision=excluded.mod_revision, "
                "version=kv.version+1",
                (op.key, op.value, rev, rev),
            )
            return True
        if op.prefix:
            cur.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (op.key, op.key + "\U0010ffff"))
        else:
            cur.execute("DELETE FROM kv WHERE key=?", (op.key,))
        return cur.rowcount > 0
