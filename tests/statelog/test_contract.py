"""One contract for every state-log backend: the same assertions run on SQLite and on a real etcd.

Where the interface leaves a choice open, the tests follow what etcd 3.4 does (checked against the real server):
a transaction that changes nothing makes no revision, a value compare on a missing key never holds (not even
`!=`), a prefix delete is one revision with one delete event per key, compaction at R keeps history from R on.
Revisions are always relative to the log's revision when the test starts: etcd's revision is server-wide.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.state.log import (
    Compacted,
    Compare,
    Delete,
    Event,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    StateLog,
    StateLogError,
    TxnResult,
    Watch,
)
from tests.statelog.conftest import collect
from tests.support.polling import wait_for

# The SQLite half runs in the fast tier; the etcd half is marked integration by the `log` fixture's params.
pytestmark = [pytest.mark.timeout(60)]


def put_event(key: str, value: bytes, revision: int, create_revision: int, version: int) -> Event:
    return Event(type="put", key=key, value=value, revision=revision, create_revision=create_revision, version=version)


def brief(events: list[Event]) -> list[tuple[str, str, bytes, int]]:
    """What every event must carry, whatever its type: type, key, value (empty for a delete), revision."""
    return [(e.type, e.key, e.value, e.revision) for e in events]


def assert_no_more(w: Watch, wait: float = 0.5) -> None:
    extra = w.next(timeout=wait)
    assert extra is None, f"unexpected extra event {extra}"


@pytest.fixture
def grant(log: StateLog) -> Iterator[Callable[[int], int]]:
    """Grant leases that are revoked after the test (a lease expiring later would make a revision mid-test
    for whatever test then runs on the shared etcd)."""
    granted: list[int] = []

    def _grant(ttl: int) -> int:
        lease = log.grant(ttl)
        granted.append(lease)
        return lease

    yield _grant
    for lease in granted:
        with contextlib.suppress(StateLogError):
            log.revoke(lease)


# --- put / get / range / delete ---------------------------------------------------------------------------------


def test_a_fresh_log_has_no_keys(log: StateLog) -> None:
    assert log.get("/a") is None
    assert log.range("") == []
    assert log.range("/") == []
    assert log.revision() >= 0


def test_put_advances_the_revision_and_tracks_versions(log: StateLog) -> None:
    r = log.revision()
    assert log.put("/a", b"1") == r + 1
    assert log.get("/a") == KeyValue(key="/a", value=b"1", create_revision=r + 1, mod_revision=r + 1, version=1)
    assert log.put("/b", b"x") == r + 2
    assert log.put("/a", b"2") == r + 3
    assert log.get("/a") == KeyValue(key="/a", value=b"2", create_revision=r + 1, mod_revision=r + 3, version=2)
    # Writing the same value again is still a write, as in etcd.
    assert log.put("/a", b"2") == r + 4
    assert log.get("/a") == KeyValue(key="/a", value=b"2", create_revision=r + 1, mod_revision=r + 4, version=3)
    assert log.get("/b") == KeyValue(key="/b", value=b"x", create_revision=r + 2, mod_revision=r + 2, version=1)
    assert log.revision() == r + 4


def test_delete_then_put_starts_a_new_life(log: StateLog) -> None:
    r = log.revision()
    log.put("/a", b"1")
    log.put("/a", b"2")
    assert log.delete("/a") == r + 3
    assert log.get("/a") is None
    assert log.range("/") == []
    assert log.put("/a", b"3") == r + 4
    assert log.get("/a") == KeyValue(key="/a", value=b"3", create_revision=r + 4, mod_revision=r + 4, version=1)


def test_a_delete_that_deletes_nothing_makes_no_revision(log: StateLog) -> None:
    # etcd: a DeleteRange that matches nothing leaves the revision alone (and answers the current revision).
    log.put("/a", b"1")
    r = log.revision()
    assert log.delete("/missing") == r
    assert log.delete("/nothing/", prefix=True) == r
    assert log.revision() == r
    assert log.get("/a") is not None


def test_range_is_by_prefix_in_key_order(log: StateLog) -> None:
    for key in ("/stacks/web", "/stacks/api", "/stacksx", "/stack", "/assignments/web/a", "/stacks/"):
        log.put(key, key.encode())
    assert [k.key for k in log.range("/stacks/")] == ["/stacks/", "/stacks/api", "/stacks/web"]
    assert [k.key for k in log.range("/stacks")] == ["/stacks/", "/stacks/api", "/stacks/web", "/stacksx"]
    assert [k.key for k in log.range("/none/")] == []
    assert [k.key for k in log.range("")] == [
        "/assignments/web/a",
        "/stack",
        "/stacks/",
        "/stacks/api",
        "/stacks/web",
        "/stacksx",
    ]
    assert all(k.value == k.key.encode() for k in log.range(""))


def test_range_at_a_revision_sees_the_keys_as_they_were_then(log: StateLog) -> None:
    r = log.revision()
    log.put("/s/a", b"a1")  # r+1
    log.put("/s/b", b"b1")  # r+2
    log.put("/other", b"o")  # r+3
    snapshot = log.revision()
    log.put("/s/a", b"a2")  # a later write ...
    log.delete("/s/b")  # ... a later delete ...
    log.put("/s/c", b"c1")  # ... and a later create are all invisible at the snapshot's revision
    at = log.range("/s/", revision=snapshot)
    assert [(k.key, k.value, k.mod_revision, k.create_revision, k.version) for k in at] == [
        ("/s/a", b"a1", r + 1, r + 1, 1),
        ("/s/b", b"b1", r + 2, r + 2, 1),
    ]
    assert [k.key for k in log.range("/s/", revision=r + 1)] == ["/s/a"]
    assert [(k.key, k.value) for k in log.range("/s/", revision=log.revision())] == [("/s/a", b"a2"), ("/s/c", b"c1")]
    assert log.range("/s/", revision=snapshot) == at, "a read at a revision is repeatable"


def test_range_at_a_compacted_revision_raises_compacted(log: StateLog) -> None:
    r = log.revision()
    for i in range(4):
        log.put("/k/x", str(i).encode())  # r+1 .. r+4
    log.compact(r + 3)
    with pytest.raises(Compacted):
        log.range("/k/", revision=r + 1)
    assert [k.value for k in log.range("/k/", revision=r + 3)] == [b"2"]


def test_delete_prefix_removes_only_that_prefix_in_one_revision(log: StateLog) -> None:
    r = log.revision()
    for key in ("/assignments/web/a", "/assignments/web/b", "/assignments/webx/a", "/assignments/api/a"):
        log.put(key, b"x")
    assert log.delete("/assignments/web/", prefix=True) == r + 5
    assert log.revision() == r + 5
    assert [k.key for k in log.range("/assignments/")] == ["/assignments/api/a", "/assignments/webx/a"]
    # A prefix delete of exactly one key name, not a prefix, leaves longer keys alone.
    assert log.delete("/assignments/api") == r + 5
    assert log.get("/assignments/api/a") is not None


def test_values_and_keys_round_trip_verbatim(log: StateLog) -> None:
    r = log.revision()
    blob = bytes(range(256)) + b"\x00"
    log.put("/blob", blob)
    log.put("/empty", b"")
    log.put("/ключ/ü €", b"\xff\xfe")
    assert log.get("/blob") == KeyValue(key="/blob", value=blob, create_revision=r + 1, mod_revision=r + 1, version=1)
    assert log.get("/empty") == KeyValue(key="/empty", value=b"", create_revision=r + 2, mod_revision=r + 2, version=1)
    assert log.get("/ключ/ü €") == KeyValue(
        key="/ключ/ü €", value=b"\xff\xfe", create_revision=r + 3, mod_revision=r + 3, version=1
    )
    assert [k.key for k in log.range("/ключ/")] == ["/ключ/ü €"]


# --- txn ---------------------------------------------------------------------------------------------------------


def seeded(log: StateLog) -> int:
    """/a: created at r+1, modified at r+3, version 2, value b"2"; /b at r+2. Returns r."""
    r = log.revision()
    log.put("/a", b"1")
    log.put("/b", b"x")
    log.put("/a", b"2")
    return r


# Each case builds its compare from the base revision r of `seeded`.
COMPARES: list[tuple[str, Callable[[int], Compare], bool]] = [
    ("value==", lambda r: Compare("/a", "value", "==", b"2"), True),
    ("value==old", lambda r: Compare("/a", "value", "==", b"1"), False),
    ("value!=", lambda r: Compare("/a", "value", "!=", b"1"), True),
    ("value!=same", lambda r: Compare("/a", "value", "!=", b"2"), False),
    ("value<", lambda r: Compare("/a", "value", "<", b"3"), True),
    ("value>", lambda r: Compare("/a", "value", ">", b"3"), False),
    ("value>shorter", lambda r: Compare("/a", "value", ">", b""), True),
    ("mod==", lambda r: Compare("/a", "mod_revision", "==", r + 3), True),
    ("mod==create", lambda r: Compare("/a", "mod_revision", "==", r + 1), False),
    ("mod!=", lambda r: Compare("/a", "mod_revision", "!=", r + 1), True),
    ("mod<", lambda r: Compare("/a", "mod_revision", "<", r + 4), True),
    ("mod>", lambda r: Compare("/a", "mod_revision", ">", r + 3), False),
    ("create==", lambda r: Compare("/a", "create_revision", "==", r + 1), True),
    ("create!=", lambda r: Compare("/a", "create_revision", "!=", r + 1), False),
    ("create<", lambda r: Compare("/a", "create_revision", "<", r + 2), True),
    ("create>", lambda r: Compare("/b", "create_revision", ">", r + 1), True),
    ("version==", lambda r: Compare("/a", "version", "==", 2), True),
    ("version>", lambda r: Compare("/a", "version", ">", 1), True),
    ("version<", lambda r: Compare("/a", "version", "<", 2), False),
    ("version!=", lambda r: Compare("/b", "version", "!=", 1), False),
    # A missing key: create/mod revision and version 0 ...
    ("missing.create==0", lambda r: Compare("/missing", "create_revision", "==", 0), True),
    ("missing.mod==0", lambda r: Compare("/missing", "mod_revision", "==", 0), True),
    ("missing.mod<", lambda r: Compare("/missing", "mod_revision", "<", r + 1), True),
    ("missing.version==0", lambda r: Compare("/missing", "version", "==", 0), True),
    ("missing.version>0", lambda r: Compare("/missing", "version", ">", 0), False),
    # ... and no value: a value compare on a missing key never holds, whatever the operator (etcd).
    ("missing.value==empty", lambda r: Compare("/missing", "value", "==", b""), False),
    ("missing.value!=", lambda r: Compare("/missing", "value", "!=", b"x"), False),
    ("missing.value<", lambda r: Compare("/missing", "value", "<", b"z"), False),
    ("missing.value>", lambda r: Compare("/missing", "value", ">", b""), False),
]


@pytest.mark.parametrize(("make", "holds"), [(m, h) for _, m, h in COMPARES], ids=[i for i, _, _ in COMPARES])
def test_txn_compare(log: StateLog, make: Callable[[int], Compare], holds: bool) -> None:
    r = seeded(log)
    result = log.txn([make(r)], [Put("/then", b"1")], [Put("/else", b"1")])
    assert result.succeeded is holds
    assert result.revision == r + 4
    assert (log.get("/then") is not None, log.get("/else") is not None) == (holds, not holds)


def test_txn_all_compares_must_hold(log: StateLog) -> None:
    r = seeded(log)
    both = [Compare("/a", "version", "==", 2), Compare("/b", "mod_revision", "==", r + 2)]
    assert log.txn(both, [Put("/ok", b"")]).succeeded
    one_fails = [Compare("/a", "version", "==", 2), Compare("/b", "mod_revision", "==", r + 99)]
    result = log.txn(one_fails, [Put("/not", b"")])
    assert not result.succeeded
    assert log.get("/not") is None
    assert log.get("/ok") is not None


def test_txn_ops_are_one_revision(log: StateLog) -> None:
    r = seeded(log)
    ops: list[Op] = [Put("/x", b"1"), Put("/y", b"2"), Delete("/b"), Put("/a", b"3")]
    result = log.txn([Compare("/a", "value", "==", b"2")], ops)
    assert (result.succeeded, result.revision) == (True, r + 4)
    assert log.revision() == r + 4
    assert log.range("/") == [
        KeyValue(key="/a", value=b"3", create_revision=r + 1, mod_revision=r + 4, version=3),
        KeyValue(key="/x", value=b"1", create_revision=r + 4, mod_revision=r + 4, version=1),
        KeyValue(key="/y", value=b"2", create_revision=r + 4, mod_revision=r + 4, version=1),
    ]


def test_txn_else_branch_and_prefix_delete(log: StateLog) -> None:
    r = seeded(log)
    log.put("/dir/1", b"1")
    log.put("/dir/2", b"2")
    result = log.txn(
        [Compare("/a", "mod_revision", "==", r + 1)],  # stale: /a was modified at r+3
        [Put("/then", b"")],
        [Delete("/dir/", prefix=True), Put("/else", b"e")],
    )
    assert (result.succeeded, result.revision) == (False, r + 6)
    assert log.range("/dir/") == []
    assert log.get("/else") == KeyValue(key="/else", value=b"e", create_revision=r + 6, mod_revision=r + 6, version=1)
    assert log.get("/then") is None


def test_a_txn_that_changes_nothing_makes_no_revision(log: StateLog) -> None:
    r = seeded(log)
    # Compares fail and there is no else branch.
    assert log.txn([Compare("/a", "version", "==", 99)], [Put("/then", b"")]) == TxnResult(False, r + 3)
    # Compares hold but there is nothing to do, or only deletes of missing keys.
    assert log.txn([Compare("/a", "version", "==", 2)], []) == TxnResult(True, r + 3)
    assert log.txn([], [Delete("/missing"), Delete("/none/", prefix=True)]) == TxnResult(True, r + 3)
    assert log.revision() == r + 3
    assert log.get("/a") == KeyValue(key="/a", value=b"2", create_revision=r + 1, mod_revision=r + 3, version=2)


def test_compare_and_swap_loses_no_update_under_contention(log: StateLog) -> None:
    """8 threads x 25 increments of one counter by get -> txn(mod_revision == seen -> put n+1), retrying."""
    threads_n, per_thread = 8, 25
    log.put("/counter", b"0")
    successes = [0] * threads_n
    attempts = [0] * threads_n
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def worker(i: int) -> None:
        try:
            start.wait(timeout=10)
            while successes[i] < per_thread:
                attempts[i] += 1
                kv = log.get("/counter")
                assert kv is not None
                n = int(kv.value)
                result = log.txn(
                    [Compare("/counter", "mod_revision", "==", kv.mod_revision)],
                    [Put("/counter", str(n + 1).encode())],
                )
                if result.succeeded:
                    successes[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not any(t.is_alive() for t in threads), "workers still running"
    assert errors == []
    final = log.get("/counter")
    assert final is not None
    assert sum(successes) == threads_n * per_thread
    assert int(final.value) == threads_n * per_thread
    assert final.version == threads_n * per_thread + 1


# --- watch -------------------------------------------------------------------------------------------------------


def test_watch_delivers_every_change_after_start_once_in_order(
    log: StateLog, watches: Callable[[Watch], Watch]
) -> None:
    r = log.revision()
    w = watches(log.watch("/w/", start_revision=r + 1))
    log.put("/w/a", b"1")  # r+1
    log.put("/outside", b"x")  # r+2: not under the prefix
    log.put("/w/a", b"2")  # r+3
    log.put("/w/b", b"b")  # r+4
    log.delete("/w/a")  # r+5
    log.put("/w/dir/1", b"1")  # r+6
    log.put("/w/dir/2", b"2")  # r+7
    log.put("/w/dir/3", b"3")  # r+8
    log.delete("/w/dir/", prefix=True)  # r+9: one event per key
    log.delete("/w/missing")  # no revision, no event
    log.txn([], [Put("/w/t1", b"t1"), Put("/w/b", b"b2"), Delete("/w/t0"), Put("/elsewhere", b"")])  # r+10
    log.txn([], [Delete("/w/t1"), Put("/w/t2", b"t2")])  # r+11
    log.put("/w", b"not under /w/")  # r+12

    expected = [
        ("put", "/w/a", b"1", r + 1),
        ("put", "/w/a", b"2", r + 3),
        ("put", "/w/b", b"b", r + 4),
        ("delete", "/w/a", b"", r + 5),
        ("put", "/w/dir/1", b"1", r + 6),
        ("put", "/w/dir/2", b"2", r + 7),
        ("put", "/w/dir/3", b"3", r + 8),
        ("delete", "/w/dir/1", b"", r + 9),
        ("delete", "/w/dir/2", b"", r + 9),
        ("delete", "/w/dir/3", b"", r + 9),
        ("put", "/w/b", b"b2", r + 10),
        ("put", "/w/t1", b"t1", r + 10),
        ("delete", "/w/t1", b"", r + 11),
        ("put", "/w/t2", b"t2", r + 11),
    ]
    events = collect(w, len(expected))
    assert_no_more(w)
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions), f"out of order: {revisions}"
    # Within one revision (one txn) the order of events is not part of the contract: compare sorted by key.
    assert sorted(brief(events), key=lambda t: (t[3], t[1])) == expected
    puts = [e for e in events if e.type == "put"]
    assert puts[:3] == [
        put_event("/w/a", b"1", r + 1, r + 1, 1),
        put_event("/w/a", b"2", r + 3, r + 1, 2),
        put_event("/w/b", b"b", r + 4, r + 4, 1),
    ]
    assert put_event("/w/b", b"b2", r + 10, r + 4, 2) in puts
    assert put_event("/w/t1", b"t1", r + 10, r + 10, 1) in puts


def test_watch_from_the_past_replays_history(log: StateLog, watches: Callable[[Watch], Watch]) -> None:
    r = log.revision()
    for i in range(5):
        log.put(f"/h/{i}", str(i).encode())  # r+1 .. r+5
    log.delete("/h/0")  # r+6
    everything = watches(log.watch("/h/", start_revision=r + 1))
    events = collect(everything, 6)
    assert brief(events) == [
        *[("put", f"/h/{i}", str(i).encode(), r + 1 + i) for i in range(5)],
        ("delete", "/h/0", b"", r + 6),
    ]
    # The replay continues seamlessly into live changes.
    log.put("/h/live", b"l")  # r+7
    assert brief(collect(everything, 1)) == [("put", "/h/live", b"l", r + 7)]
    assert_no_more(everything, 0.2)
    # A start in the middle of history delivers from exactly that revision on.
    middle = watches(log.watch("/h/", start_revision=r + 4))
    assert [e.revision for e in collect(middle, 4)] == [r + 4, r + 5, r + 6, r + 7]
    assert_no_more(middle, 0.2)


def test_watch_from_zero_starts_with_the_next_revision(log: StateLog, watches: Callable[[Watch], Watch]) -> None:
    for i in range(3):
        log.put(f"/z/{i}", b"old")
    log.delete("/z/0")
    r = log.revision()
    w = watches(log.watch("/z/", 0))
    # Written right after watch() returns, before the backend may have finished setting up: still delivered.
    log.put("/z/new", b"new")
    log.delete("/z/1")
    assert brief(collect(w, 2)) == [("put", "/z/new", b"new", r + 1), ("delete", "/z/1", b"", r + 2)]
    assert_no_more(w)


def test_a_future_start_revision_skips_what_comes_before(log: StateLog, watches: Callable[[Watch], Watch]) -> None:
    r = log.revision()
    w = watches(log.watch("/f/", start_revision=r + 3))
    for i in range(4):
        log.put(f"/f/{i}", b"")  # r+1 .. r+4
    assert [(e.key, e.revision) for e in collect(w, 2)] == [("/f/2", r + 3), ("/f/3", r + 4)]
    assert_no_more(w, 0.3)


def test_two_concurrent_watches_on_different_prefixes(log: StateLog, watches: Callable[[Watch], Watch]) -> None:
    r = log.revision()
    wa = watches(log.watch("/pa/", start_revision=r + 1))
    wb = watches(log.watch("/pb/", start_revision=r + 1))
    for i in range(10):
        log.put(f"/pa/{i}", b"a")  # r+1+2i
        log.put(f"/pb/{i}", b"b")  # r+2+2i
    got: dict[str, list[Event]] = {}

    def drain(name: str, w: Watch) -> None:
        got[name] = collect(w, 10)

    threads = [threading.Thread(target=drain, args=args, daemon=True) for args in (("a", wa), ("b", wb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert [(e.key, e.revision) for e in got["a"]] == [(f"/pa/{i}", r + 1 + 2 * i) for i in range(10)]
    assert [(e.key, e.revision) for e in got["b"]] == [(f"/pb/{i}", r + 2 + 2 * i) for i in range(10)]
    assert_no_more(wa, 0.2)
    assert_no_more(wb, 0.2)


def test_cancel_ends_iteration_promptly(log: StateLog, watches: Callable[[Watch], Watch]) -> None:
    w = watches(log.watch("/c/", 0))
    seen: list[Event] = []
    ended = threading.Event()

    def consume() -> None:
        for event in w:
            seen.append(event)
        ended.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    log.put("/c/1", b"1")
    wait_for(lambda: seen, timeout=10)
    time.sleep(0.2)  # the consumer is blocked waiting for the next event
    started = time.monotonic()
    w.cancel()
    assert ended.wait(timeout=2), "iteration did not end after cancel()"
    assert time.monotonic() - started < 2
    consumer.join(timeout=2)
    assert [e.key for e in seen] == ["/c/1"]
    assert w.cancelled
    assert w.next(timeout=0.1) is None
    # Writes after the cancel do not break the backend (nor reach the cancelled watch).
    log.put("/c/2", b"2")
    assert w.next(timeout=0.3) is None


def test_watch_from_a_compacted_revision_raises_compacted(log: StateLog, watches: Callable[[Watch], Watch]) -> None:
    r = log.revision()
    for i in range(6):
        log.put(f"/k/{i}", str(i).encode())  # r+1 .. r+6
    log.compact(r + 4)
    # Keys keep their latest values; history before r+4 is gone.
    assert [k.value for k in log.range("/k/")] == [str(i).encode() for i in range(6)]
    with pytest.raises(Compacted) as info:
        w = watches(log.watch("/k/", start_revision=r + 2))
        w.next(timeout=10)
    assert info.value.compact_revision == r + 4
    assert isinstance(info.value, StateLogError)
    # History from the compaction revision on is still there (etcd keeps revision r+4 itself).
    w = watches(log.watch("/k/", start_revision=r + 4))
    assert [(e.key, e.revision) for e in collect(w, 3)] == [("/k/3", r + 4), ("/k/4", r + 5), ("/k/5", r + 6)]


# --- leases ------------------------------------------------------------------------------------------------------


def test_a_key_whose_lease_is_not_kept_alive_disappears(
    log: StateLog, grant: Callable[[int], int], watches: Callable[[Watch], Watch]
) -> None:
    r = log.revision()
    w = watches(log.watch("/l/", start_revision=r + 1))
    started = time.monotonic()
    lease = grant(2)
    assert lease != 0
    log.put("/l/leased", b"v", lease=lease)  # r+1
    acked = time.monotonic()
    log.put("/l/plain", b"p")  # r+2
    kv = log.get("/l/leased")
    assert kv is not None
    assert (kv.value, kv.lease) == (b"v", lease)

    wait_for(lambda: log.get("/l/leased") is None, timeout=6, interval=0.05)
    gone = time.monotonic()
    assert gone - started <= 3.0, f"the key outlived its 2 s lease by {gone - started - 2:.1f}s"
    assert gone - acked >= 1.5, f"the key vanished {gone - acked:.1f}s after its put: before its 2 s TTL"
    assert log.get("/l/plain") is not None
    assert brief(collect(w, 3)) == [
        ("put", "/l/leased", b"v", r + 1),
        ("put", "/l/plain", b"p", r + 2),
        ("delete", "/l/leased", b"", r + 3),
    ]
    assert log.keepalive(lease) == 0
    with pytest.raises(LeaseNotFound):
        log.put("/l/again", b"", lease=lease)


def test_keepalive_keeps_a_key_past_its_ttl(log: StateLog, grant: Callable[[int], int]) -> None:
    lease = grant(2)
    log.put("/k/alive", b"v", lease=lease)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert 0 < log.keepalive(lease) <= 2
        assert log.get("/k/alive") is not None
        time.sleep(0.5)
    kv = log.get("/k/alive")
    assert kv is not None
    assert kv.lease == lease


def test_revoke_deletes_the_lease_keys_at_once(
    log: StateLog, grant: Callable[[int], int], watches: Callable[[Watch], Watch]
) -> None:
    lease = grant(30)
    log.put("/rv/a", b"a", lease=lease)
    log.put("/rv/b", b"b", lease=lease)
    log.put("/rv/plain", b"p")
    r = log.revision()
    w = watches(log.watch("/rv/", start_revision=r + 1))
    log.revoke(lease)
    assert log.get("/rv/a") is None
    assert log.get("/rv/b") is None
    assert log.get("/rv/plain") is not None
    assert log.revision() == r + 1
    events = collect(w, 2)
    assert sorted(brief(events)) == [("delete", "/rv/a", b"", r + 1), ("delete", "/rv/b", b"", r + 1)]
    assert log.keepalive(lease) == 0


def test_a_put_replaces_the_lease_of_a_key(log: StateLog, grant: Callable[[int], int]) -> None:
    # etcd: a put without a lease detaches the key from its old lease; a put with another lease moves it.
    first, second = grant(30), grant(30)
    assert first != second
    log.put("/mv/detached", b"1", lease=first)
    log.put("/mv/detached", b"2")
    log.put("/mv/moved", b"1", lease=first)
    log.put("/mv/moved", b"2", lease=second)
    log.put("/mv/stays", b"1", lease=first)
    assert [(k.key, k.lease) for k in log.range("/mv/")] == [
        ("/mv/detached", 0),
        ("/mv/moved", second),
        ("/mv/stays", first),
    ]
    log.revoke(first)
    assert [k.key for k in log.range("/mv/")] == ["/mv/detached", "/mv/moved"]
    log.revoke(second)
    assert [k.key for k in log.range("/mv/")] == ["/mv/detached"]


def test_put_with_an_unknown_or_revoked_lease_raises_lease_not_found(
    log: StateLog, grant: Callable[[int], int]
) -> None:
    r = log.revision()
    with pytest.raises(LeaseNotFound):
        log.put("/u/k", b"v", lease=0x1234_5678_9ABC)
    assert log.get("/u/k") is None
    assert log.revision() == r
    lease = grant(30)
    log.revoke(lease)
    with pytest.raises(LeaseNotFound):
        log.put("/u/k", b"v", lease=lease)
    assert log.get("/u/k") is None
    assert log.keepalive(0x1234_5678_9ABC) == 0


def test_a_txn_putting_with_an_unknown_lease_raises_and_changes_nothing(log: StateLog) -> None:
    log.put("/u/a", b"1")
    r = log.revision()
    with pytest.raises(LeaseNotFound):
        log.txn([], [Put("/u/a", b"2"), Put("/u/b", b"v", lease=0x1234_5678_9ABD)])
    assert log.get("/u/a") == KeyValue(key="/u/a", value=b"1", create_revision=r, mod_revision=r, version=1)
    assert log.get("/u/b") is None
    assert log.revision() == r
