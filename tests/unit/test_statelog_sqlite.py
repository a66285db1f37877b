"""The embedded SQLite state log keeps etcd's contract; Records write only when something changes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state.log import Compare, Delete, KeyValue, Op, Put
from agent.state.records import OWNER_KEY, Records
from agent.state.sqlite import SqliteStateLog, StateLogError
from schemas.errors import DabctlError


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteStateLog]:
    """A fresh log in its own state directory, closed afterwards."""
    store = SqliteStateLog(tmp_path / "state" / "state.db")
    yield store
    store.close()


def kv(key: str, value: bytes, create: int, mod: int, version: int) -> KeyValue:
    return KeyValue(key=key, value=value, create_revision=create, mod_revision=mod, version=version)


# --- put / get / range / delete ---------------------------------------------------------------------------------


def test_new_log_is_empty_at_revision_0(log: SqliteStateLog) -> None:
    assert log.revision() == 0
    assert log.get("/a") is None
    assert log.range("") == []


def test_put_advances_the_revision_and_tracks_versions(log: SqliteStateLog) -> None:
    assert log.put("/a", b"1") == 1
    assert log.get("/a") == kv("/a", b"1", 1, 1, 1)
    assert log.put("/b", b"x") == 2
    assert log.put("/a", b"2") == 3
    assert log.get("/a") == kv("/a", b"2", 1, 3, 2)
    # Writing the same value again is still a write, as in etcd.
    assert log.put("/a", b"2") == 4
    assert log.get("/a") == kv("/a", b"2", 1, 4, 3)
    assert log.revision() == 4


def test_delete_then_put_starts_a_new_life(log: SqliteStateLog) -> None:
    log.put("/a", b"1")
    log.put("/a", b"2")
    assert log.delete("/a") == 3
    assert log.get("/a") is None
    assert log.put("/a", b"3") == 4
    assert log.get("/a") == kv("/a", b"3", 4, 4, 1)


def test_deleting_a_missing_key_does_not_advance_the_revision(log: SqliteStateLog) -> None:
    # etcd only makes a revision when a transaction changes something: a no-op delete must not look like a write
    # (a watcher would wake for nothing, and the etcd backend must pass the same contract tests).
    log.put("/a", b"1")
    log.delete("/missing")
    log.delete("/nothing/", prefix=True)
    assert log.revision() == 1


def test_range_is_by_prefix_in_key_order(log: SqliteStateLog) -> None:
    for key in ("/stacks/web", "/stacks/api", "/stacksx", "/stack", "/assignments/web/a", "/stacks/"):
        log.put(key, key.encode())
    assert [k.key for k in log.range("/stacks/")] == ["/stacks/", "/stacks/api", "/stacks/web"]
    assert [k.key for k in log.range("/stacks")] == ["/stacks/", "/stacks/api", "/stacks/web", "/stacksx"]
    assert [k.key for k in log.range("/none/")] == []
    assert len(log.range("")) == 6


def test_delete_prefix_removes_only_that_prefix(log: SqliteStateLog) -> None:
    for key in ("/assignments/web/a", "/assignments/web/b", "/assignments/webx/a", "/assignments/api/a"):
        log.put(key, b"x")
    rev = log.delete("/assignments/web/", prefix=True)
    assert rev == 5
    assert [k.key for k in log.range("/assignments/")] == ["/assignments/api/a", "/assignments/webx/a"]


def test_values_are_bytes_verbatim(log: SqliteStateLog) -> None:
    blob = bytes(range(256)) + b"\x00"
    log.put("/blob", blob)
    log.put("/empty", b"")
    assert log.get("/blob") == kv("/blob", blob, 1, 1, 1)
    assert log.get("/empty") == kv("/empty", b"", 2, 2, 1)


# --- txn ---------------------------------------------------------------------------------------------------------


def seeded(log: SqliteStateLog) -> None:
    """/a: created at 1, modified at 3, version 2, value b"2"; /b at revision 2."""
    log.put("/a", b"1")
    log.put("/b", b"x")
    log.put("/a", b"2")


@pytest.mark.parametrize(
    ("compare", "holds"),
    [
        (Compare("/a", "value", "==", b"2"), True),
        (Compare("/a", "value", "==", b"1"), False),
        (Compare("/a", "value", "!=", b"1"), True),
        (Compare("/a", "value", "<", b"3"), True),
        (Compare("/a", "value", ">", b"3"), False),
        (Compare("/a", "mod_revision", "==", 3), True),
        (Compare("/a", "mod_revision", "==", 1), False),
        (Compare("/a", "mod_revision", "<", 4), True),
        (Compare("/a", "mod_revision", ">", 3), False),
        (Compare("/a", "create_revision", "==", 1), True),
        (Compare("/a", "create_revision", "!=", 1), False),
        (Compare("/a", "version", "==", 2), True),
        (Compare("/a", "version", ">", 1), True),
        (Compare("/a", "version", "<", 2), False),
        # A missing key: revisions and version 0, no value.
        (Compare("/missing", "create_revision", "==", 0), True),
        (Compare("/missing", "mod_revision", "==", 0), True),
        (Compare("/missing", "version", "==", 0), True),
        (Compare("/missing", "version", ">", 0), False),
        (Compare("/missing", "value", "==", b""), False),
        (Compare("/missing", "value", "!=", b"x"), False),  # as in etcd: no value to compare
    ],
    ids=lambda v: repr(v) if not isinstance(v, Compare) else f"{v.key}.{v.target}{v.op}{v.operand!r}",
)
def test_txn_compare(log: SqliteStateLog, compare: Compare, holds: bool) -> None:
    seeded(log)
    result = log.txn([compare], [Put("/then", b"1")], [Put("/else", b"1")])
    assert result.succeeded is holds
    assert result.revision == 4
    assert (log.get("/then") is not None, log.get("/else") is not None) == (holds, not holds)


def test_txn_all_compares_must_hold(log: SqliteStateLog) -> None:
    seeded(log)
    both = [Compare("/a", "version", "==", 2), Compare("/b", "mod_revision", "==", 2)]
    assert log.txn(both, [Put("/ok", b"")]).succeeded
    one_fails = [Compare("/a", "version", "==", 2), Compare("/b", "mod_revision", "==", 99)]
    assert not log.txn(one_fails, [Put("/not", b"")]).succeeded
    assert log.get("/not") is None


def test_txn_ops_are_one_revision(log: SqliteStateLog) -> None:
    seeded(log)
    ops: list[Op] = [Put("/x", b"1"), Put("/y", b"2"), Delete("/b"), Put("/a", b"3")]
    result = log.txn([], ops)
    assert (result.succeeded, result.revision) == (True, 4)
    assert [(k.key, k.mod_revision) for k in log.range("/")] == [("/a", 4), ("/x", 4), ("/y", 4)]
    assert log.get("/a") == kv("/a", b"3", 1, 4, 3)


@pytest.mark.parametrize(
    ("compares", "then_ops", "else_ops"),
    [
        pytest.param([], [], [], id="nothing"),
        pytest.param([Compare("/a", "version", "==", 2)], [], [Put("/else", b"")], id="held-no-then"),
        pytest.param([Compare("/a", "version", "==", 9)], [Put("/then", b"")], [], id="failed-no-else"),
    ],
)
def test_txn_without_ops_does_not_advance_the_revision(
    log: SqliteStateLog, compares: list[Compare], then_ops: list[Op], else_ops: list[Op]
) -> None:
    seeded(log)
    result = log.txn(compares, then_ops, else_ops)
    assert result.revision == 3
    assert log.revision() == 3
    assert [k.key for k in log.range("/")] == ["/a", "/b"]


def test_conditional_write_on_mod_revision_detects_a_concurrent_change(log: SqliteStateLog) -> None:
    # Read-modify-write as the agent does it: the second writer, having read the old revision, loses.
    log.put("/stacks/web", b"v1")
    read = log.get("/stacks/web")
    assert read is not None
    log.put("/stacks/web", b"other writer")
    guard = [Compare("/stacks/web", "mod_revision", "==", read.mod_revision)]
    assert not log.txn(guard, [Put("/stacks/web", b"v2")]).succeeded
    assert log.get("/stacks/web") == kv("/stacks/web", b"other writer", 1, 2, 2)


def test_failing_op_rolls_back_the_whole_txn(log: SqliteStateLog) -> None:
    seeded(log)
    # SQLite cannot store an arbitrary object: the second op fails after the first was executed.
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as nothing is half-written
        log.txn([], [Put("/half", b"1"), Put("/bad", object())])  # type: ignore[arg-type]
    assert log.get("/half") is None
    assert log.revision() == 3
    assert log.put("/after", b"") == 4


# --- persistence -------------------------------------------------------------------------------------------------


def test_data_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStateLog(path)
    first.put("/a", b"1")
    first.put("/a", b"2")
    first.put("/b", b"3")
    first.delete("/b")
    first.close()
    again = SqliteStateLog(path)
    try:
        assert again.revision() == 4
        assert again.get("/a") == kv("/a", b"2", 1, 2, 2)
        assert again.get("/b") is None
        assert again.put("/c", b"") == 5
    finally:
        again.close()


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DabctlError, match="--state-dir"):
        SqliteStateLog(blocker / "state.db")


# --- records -----------------------------------------------------------------------------------------------------


def test_owner_is_created_once_and_stable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStateLog(path)
    owner = Records(first).owner()
    assert owner
    assert Records(first).owner() == owner
    rev = first.revision()
    assert rev == 1
    first.close()
    again = SqliteStateLog(path)
    try:
        records = Records(again)
        assert records.owner() == owner
        assert records.owner(create=False) == owner
        assert again.revision() == rev
    finally:
        again.close()


def test_owner_without_create_writes_nothing(log: SqliteStateLog) -> None:
    records = Records(log)
    owner = records.owner(create=False)
    assert owner.startswith("none-")
    assert log.revision() == 0
    assert log.get(OWNER_KEY) is None
    # A later reader with create gets a real owner, not the placeholder.
    assert Records(log).owner() != owner


def test_owner_created_by_another_writer_first_is_adopted(log: SqliteStateLog) -> None:
    log.put(OWNER_KEY, b"someone-else")
    assert Records(log).owner() == "someone-else"
    assert log.revision() == 1


def test_write_assignments_with_nothing_writes_nothing(log: SqliteStateLog) -> None:
    Records(log).write_assignments({}, set())
    assert log.revision() == 0


def test_write_assignments_is_one_transaction(log: SqliteStateLog) -> None:
    records = Records(log)
    records.write_assignments({("shop", "web"): {"n1": ["1", "2"]}, ("shop", "api"): {"n1": ["1"]}}, set())
    assert log.revision() == 1
    assert records.assignments() == {("shop", "web"): {"n1": ["1", "2"]}, ("shop", "api"): {"n1": ["1"]}}
    records.write_assignments({("shop", "web"): {"n1": ["1"]}}, {("shop", "api")})
    assert log.revision() == 2
    assert records.assignments() == {("shop", "web"): {"n1": ["1"]}}


def test_delete_stack_removes_its_assignments_only(log: SqliteStateLog) -> None:
    records = Records(log)
    records.write_assignments({("shop", "web"): {"n1": ["1"]}, ("shop2", "web"): {"n1": ["1"]}}, set())
    records.commit_pass([], [], ["shop"], None)
    assert records.assignments() == {("shop2", "web"): {"n1": ["1"]}}


# --- a state written by an earlier dabctl -------------------------------------------------------------------------

_SCHEMA_0 = """
CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, create_revision INTEGER NOT NULL,
                 mod_revision INTEGER NOT NULL, version INTEGER NOT NULL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('revision', 3), ('compact_revision', 0);
INSERT INTO kv VALUES ('/meta/owner', X'6f6c64', 3, 3, 1);
"""


def test_a_state_of_the_first_schema_is_upgraded_by_a_writer_and_explained_to_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_0)
    db.close()
    with pytest.raises(StateLogError, match="written by an earlier dabctl; run a changing command"):
        SqliteStateLog(path, writer=False)
    writer = SqliteStateLog(path)
    try:
        assert writer.get(OWNER_KEY) == KeyValue(
            key=OWNER_KEY, value=b"old", create_revision=3, mod_revision=3, version=1
        )
        writer.put("/k", b"v")
        assert writer.revision() == 4
    finally:
        writer.close()
    reader = SqliteStateLog(path, writer=False)
    reader.close()


def test_a_state_of_a_newer_dabctl_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStateLog(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StateLogError, match="written by a newer dabctl"):
        SqliteStateLog(path)
