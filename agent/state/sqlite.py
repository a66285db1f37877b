"""The embedded state log: SQLite in WAL mode under the state directory — one node, zero setup.

One process holds the state for writing (an exclusive lock file naming the holder); readers open it without
the lock and are never blocked (WAL). Every acknowledged write survives `kill -9`; every durable one (the
default) is also on disk when acknowledged (synchronous=FULL); see `txn(durable=False)`. Watches are served
within the process from the event history table.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.private import PrivateFileRefused, create_private, private_dir, tighten_if_present
from agent.state.holder import Held, HolderLock
from agent.state.log import (
    Compacted,
    Compare,
    Delete,
    Event,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    ReadOnly,
    StateLocked,
    StateLogError,
    TxnResult,
    Watch,
    compare_holds,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (revision, seq)
);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
INSERT OR IGNORE INTO meta (name, value) VALUES ('compact_revision', 0);
"""
SCHEMA_VERSION = 1  # PRAGMA user_version: 0 was the first release's (no kv.lease)
_KV = "SELECT key, value, create_revision, mod_revision, version, lease FROM kv"
_PREFIX_END = "\U0010ffff"
REAPER_INTERVAL = 0.2


def _put_event(row: tuple[str, bytes, int, int, int, int]) -> Event:
    key, value, create, rev, version, _ = row
    return Event(type="put", key=key, value=value, revision=rev, create_revision=create, version=version)


def _kv(row: Sequence[Any]) -> KeyValue:
    return KeyValue(
        key=str(row[0]),
        value=bytes(row[1]),
        create_revision=int(row[2]),
        mod_revision=int(row[3]),
        version=int(row[4]),
        lease=int(row[5]),
    )


class SqliteStateLog:
    """StateLog on one SQLite file. `writer=True` takes the exclusive write lock; `writer=False` only reads."""

    def __init__(
        self, path: Path, writer: bool = True, retention: int = 10_000, holder: Mapping[str, str] | None = None
    ) -> None:
        self.path = path
        self.holder = dict(holder or {})
        self.writer = writer
        self.retention = retention
        self._lock: HolderLock | None = None
        self._closed = threading.Event()
        self._changed = threading.Condition()
        try:
            private_dir(path.parent)
            if writer:
                self._take_lock()
            # SQLite creates the database 0644 and gives its -wal and -shm files the database's mode.
            create_private(path)
            for extra in ("-wal", "-shm"):
                tighten_if_present(path.with_name(path.name + extra))
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._upgrade(writer)
        except (StateLogError, PrivateFileRefused):
            self._release_lock()
            raise
        except (OSError, sqlite3.Error) as exc:
            self._release_lock()
            raise StateLogError(
                f"cannot open the state log {path}: {exc}; check --state-dir and its permissions"
            ) from None
        self._mutex = threading.Lock()
        self._watches: list[Watch] = []
        if writer:
            threading.Thread(target=self._reap_leases, name="lease-reaper", daemon=True).start()

    # --- exclusivity ------------------------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _take_lock(self) -> None:
        lock = HolderLock(self.lock_path, self.holder)
        try:
            lock.acquire()
        except Held as held:
            raise StateLocked(
                f"the state {self.path.parent} is held for writing by {held.holder}; stop it, or send changes "
                "through the running agent"
            ) from None
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @staticmethod
    def holder_of(path: Path) -> dict[str, str] | None:
        """Who holds the state at `path` for writing (pid, command, api), or None when nobody does."""
        return HolderLock.holder_of(path.with_name(path.name + ".lock"))

    def _has_schema(self) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() is not None

    def _upgrade(self, writer: bool) -> None:
        """Create the schema, or bring a state written by an earlier dabctl up to this one (writers only)."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StateLogError(
                f"the state log {self.path} was written by a newer dabctl (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); upgrade dabctl"
            )
        existed = self._has_schema()
        if existed and version == SCHEMA_VERSION:
            return
        if not writer and existed:
            raise StateLogError(
                f"the state log {self.path} was written by an earlier dabctl; run a changing command "
                "(e.g. dabctl reconcile --once) once to upgrade it"
            )
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(kv)")}
        if "lease" not in columns:  # schema 0: before leases
            self._db.execute("ALTER TABLE kv ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for w in self._watches:
            w.cancel()
        with self._changed:
            self._changed.notify_all()
        with self._mutex:
            self._db.close()
        self._release_lock()

    # --- reads ------------------------------------------------------------------------------------------------

    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()[0])

    def revision(self) -> int:
        with self._mutex:
            return self._meta("revision")

    def get(self, key: str) -> KeyValue | None:
        with self._mutex:
            return self._get(key)

    def _get(self, key: str) -> KeyValue | None:
        row = self._db.execute(f"{_KV} WHERE key=?", (key,)).fetchone()
        return _kv(row) if row else None

    def range(self, prefix: str, revision: int = 0) -> list[KeyValue]:
        with self._mutex:
            rows = self._db.execute(
                f"{_KV} WHERE key >= ? AND key < ? ORDER BY key", (prefix, prefix + _PREFIX_END)
            ).fetchall()
            current = [_kv(r) for r in rows]
            if not revision or revision == self._meta("revision"):
                return current
            return self._range_at(prefix, revision, current)

    def _range_at(self, prefix: str, revision: int, current: list[KeyValue]) -> list[KeyValue]:
        """`prefix` at an earlier `revision`: today's keys with the changes made since undone from the events."""
        if revision > self._meta("revision"):
            raise StateLogError(f"cannot read revision {revision}: the log is at {self._meta('revision')}")
        compacted = self._meta("compact_revision")
        if revision < compacted:
            raise Compacted(compacted)
        later = {
            str(r[0])
            for r in self._db.execute(
                "SELECT DISTINCT key FROM events WHERE revision > ? AND key >= ? AND key < ?",
                (revision, prefix, prefix + _PREFIX_END),
            )
        }
        out = {kv.key: kv for kv in current if kv.key not in later}
        for key in later:
            first_after = self._db.execute(
                "SELECT type, create_revision FROM events WHERE key = ? AND revision > ? "
                "ORDER BY revision, seq LIMIT 1",
                (key, revision),
            ).fetchone()
            last = self._db.execute(
                "SELECT revision, type, value, create_revision, version FROM events WHERE key = ? AND revision <= ? "
                "ORDER BY revision DESC, seq DESC LIMIT 1",
                (key, revision),
            ).fetchone()
            if last is not None:
                if last[1] == "put":
                    out[key] = KeyValue(
                        key=key,
                        value=bytes(last[2]),
                        create_revision=int(last[3]),
                        mod_revision=int(last[0]),
                        version=int(last[4]),
                    )
                continue
            if first_after[0] == "put" and int(first_after[1]) > revision:
                continue  # created after `revision`
            # The key lived at `revision` but the change that made it is compacted away.
            raise Compacted(compacted)
        return [out[k] for k in sorted(out)]

    # --- writes -----------------------------------------------------------------------------------------------

    def _check_writer(self) -> None:
        if not self.writer:
            raise ReadOnly(f"the state {self.path.parent} was opened for reading; this command cannot change it")

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: str, prefix: bool = False) -> int:
        return self.txn([], [Delete(key, prefix)]).revision

    def txn(
        self, compares: Sequence[Compare], then_ops: Sequence[Op], else_ops: Sequence[Op] = (), *, durable: bool = True
    ) -> TxnResult:
        """Check every compare and run then_ops (or else_ops) in one SQLite transaction.

        Durable (the default): the commit returns once the WAL is fsynced (synchronous=FULL). `durable=False`
        commits under synchronous=NORMAL: written to the WAL (it survives kill -9, the page cache has it) but
        fsynced only with the next durable commit or checkpoint, which sync every frame before theirs, so a power
        loss can drop only non-durable commits made after the last durable one, never one in the middle."""
        self._check_writer()
        with self._mutex:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                result, changed = self._txn(compares, then_ops, else_ops)
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
        if changed:
            with self._changed:
                self._changed.notify_all()
        return result

    def _txn(
        self, compares: Sequence[Compare], then_ops: Sequence[Op], else_ops: Sequence[Op]
    ) -> tuple[TxnResult, bool]:
        """The transaction itself, under the mutex; whether it made a revision."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            # One read of every key the compares and puts name (not one per key); puts and deletes keep it current.
            known = self._get_many({c.key for c in compares} | {op.key for op in (*then_ops, *else_ops)})
            ok = all(compare_holds(c, known.get(c.key)) for c in compares)
            ops = then_ops if ok else else_ops
            rev = self._meta("revision")
            events: list[Event] = []
            puts: list[tuple[str, bytes, int, int, int, int]] = []
            for op in ops:
                if isinstance(op, Put):
                    puts.append(self._put_row(cur, op, rev + 1, known))
                    events.append(_put_event(puts[-1]))
                    continue
                self._upsert(cur, puts)  # in order: a delete after a put of the same key deletes it
                events.extend(self._delete(cur, op, rev + 1, known))
            self._upsert(cur, puts)
            if events:  # as in etcd, a txn that changes nothing makes no revision
                rev += 1
                cur.executemany(
                    "INSERT INTO events (revision, seq, type, key, value, create_revision, version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(rev, i, e.type, e.key, e.value, e.create_revision, e.version) for i, e in enumerate(events)],
                )
                cur.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
                self._auto_compact(cur, rev)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return TxnResult(ok, rev), bool(events)

    def _get_many(self, keys: set[str]) -> dict[str, KeyValue]:
        out: dict[str, KeyValue] = {}
        ordered = sorted(keys)
        for i in range(0, len(ordered), 500):  # under SQLite's bound on parameters of one statement
            chunk = ordered[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out.update((str(r[0]), _kv(r)) for r in self._db.execute(f"{_KV} WHERE key IN ({marks})", chunk))
        return out

    def _put_row(
        self, cur: sqlite3.Cursor, op: Put, rev: int, known: dict[str, KeyValue]
    ) -> tuple[str, bytes, int, int, int, int]:
        """The kv row a put writes; `known` holds every key this txn puts (as it is now) and is kept current."""
        if op.lease and cur.execute("SELECT 1 FROM leases WHERE id=?", (op.lease,)).fetchone() is None:
            raise LeaseNotFound(f"lease {op.lease} expired or was revoked; grant a new one")
        old = known.get(op.key)
        create = old.create_revision if old else rev
        version = old.version + 1 if old else 1
        known[op.key] = KeyValue(
            key=op.key, value=op.value, create_revision=create, mod_revision=rev, version=version, lease=op.lease
        )
        return (op.key, op.value, create, rev, version, op.lease)

    @staticmethod
    def _upsert(cur: sqlite3.Cursor, rows: list[tuple[str, bytes, int, int, int, int]]) -> None:
        """Write pending puts in one statement, and empty the list."""
        if rows:
            cur.executemany(
                "INSERT INTO kv (key, value, create_revision, mod_revision, version, lease) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, mod_revision=excluded.mod_revision, "
                "version=excluded.version, lease=excluded.lease",
                rows,
            )
            rows.clear()

    def _delete(self, cur: sqlite3.Cursor, op: Delete, rev: int, known: dict[str, KeyValue]) -> list[Event]:
        if op.prefix:
            keys = [
                r[0]
                for r in cur.execute("SELECT key FROM kv WHERE key >= ? AND key < ?", (op.key, op.key + _PREFIX_END))
            ]
        else:
            keys = [r[0] for r in cur.execute("SELECT key FROM kv WHERE key = ?", (op.key,))]
        cur.executemany("DELETE FROM kv WHERE key=?", [(k,) for k in keys])
        for k in keys:
            known.pop(k, None)
        return [Event(type="delete", key=k, value=b"", revision=rev) for k in keys]

    # --- compaction -------------------------------------------------------------------------------------------

    def compact(self, revision: int) -> None:
        """Drop event history before `revision`; watches from earlier revisions then fail with Compacted."""
        self._check_writer()
        with self._mutex:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                current = self._meta("revision")
                if revision > current:
                    raise StateLogError(f"cannot compact to revision {revision}: the log is at {current}")
                self._compact(cur, revision)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _compact(self, cur: sqlite3.Cursor, revision: int) -> None:
        if revision > self._meta("compact_revision"):
            cur.execute("DELETE FROM events WHERE revision < ?", (revision,))
            cur.execute("UPDATE meta SET value=? WHERE name='compact_revision'", (revision,))

    def _auto_compact(self, cur: sqlite3.Cursor, rev: int) -> None:
        # Compact in steps of `retention`, so that the history table stays between one and two retentions.
        if rev - self._meta("compact_revision") > 2 * self.retention:
            self._compact(cur, rev - self.retention)

    # --- watches ----------------------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int = 0) -> Watch:
        """Every change under `prefix` from `start_revision` (0: from the next revision), in order."""
        w = Watch()
        self._watches.append(w)
        with self._mutex:
            next_rev = start_revision or self._meta("revision") + 1
        threading.Thread(target=self._serve_watch, args=(w, prefix, next_rev), name="watch", daemon=True).start()
        return w

    def _serve_watch(self, w: Watch, prefix: str, next_rev: int) -> None:
        while not w.cancelled and not self._closed.is_set():
            with self._changed:
                try:
                    with self._mutex:
                        if next_rev < self._meta("compact_revision"):
                            w._deliver(Compacted(self._meta("compact_revision")))
                            return
                        rows = self._db.execute(
                            "SELECT revision, type, key, value, create_revision, version FROM events "
                            "WHERE revision >= ? AND key >= ? AND key < ? ORDER BY revision, seq",
                            (next_rev, prefix, prefix + _PREFIX_END),
                        ).fetchall()
                        last = self._meta("revision")
                except sqlite3.ProgrammingError:  # closed underneath us
                    return
                for r in rows:
                    w._deliver(
                        Event(
                            type=r[1],
                            key=r[2],
                            value=bytes(r[3]),
                            revision=r[0],
                            create_revision=r[4],
                            version=r[5],
                        )
                    )
                next_rev = max(next_rev, last + 1)
                self._changed.wait(timeout=1.0)

    # --- leases -----------------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; keys put with it are deleted when it is not kept alive."""
        self._check_writer()
        lease = secrets.randbits(62) + 1
        with self._mutex:
            self._db.execute(
                "INSERT INTO leases (id, ttl, expires_at) VALUES (?, ?, ?)", (lease, ttl, time.time() + ttl)
            )
        return lease

    def keepalive(self, lease: int) -> int:
        """Renew a lease; its TTL, or 0 when it is gone."""
        self._check_writer()
        with self._mutex:
            row = self._db.execute("SELECT ttl FROM leases WHERE id=?", (lease,)).fetchone()
            if row is None:
                return 0
            self._db.execute("UPDATE leases SET expires_at=? WHERE id=?", (time.time() + row[0], lease))
            return int(row[0])

    def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys."""
        self._check_writer()
        with self._mutex:
            if self._db.execute("SELECT 1 FROM leases WHERE id=?", (lease,)).fetchone() is None:
                raise LeaseNotFound(f"lease {lease} expired or was revoked")
            keys = [r[0] for r in self._db.execute("SELECT key FROM kv WHERE lease=?", (lease,))]
        self.txn([], [Delete(k) for k in keys])
        with self._mutex:
            self._db.execute("DELETE FROM leases WHERE id=?", (lease,))

    def _reap_leases(self) -> None:
        while not self._closed.wait(REAPER_INTERVAL):
            try:
                with self._mutex:
                    expired = [
                        r[0] for r in self._db.execute("SELECT id FROM leases WHERE expires_at < ?", (time.time(),))
                    ]
                for lease in expired:
                    with contextlib.suppress(LeaseNotFound):
                        self.revoke(lease)
            except (sqlite3.Error, StateLogError):
                if self._closed.is_set():
                    return
