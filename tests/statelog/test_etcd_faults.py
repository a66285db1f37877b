"""The etcd backend under faults: etcd killed mid-watch, dead and silent endpoints, TLS with client certificates."""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.state.etcd import EtcdStateLog
from agent.state.etcdcluster import follow_members
from agent.state.log import Event, StateLogError, Unavailable, Watch
from tests.statelog.conftest import collect
from tests.support.etcd import EtcdServer, TlsFiles, free_port, make_tls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def prefix() -> str:
    return f"/test-{secrets.token_hex(6)}"


@pytest.fixture
def logs() -> Iterator[Callable[..., EtcdStateLog]]:
    """Open EtcdStateLogs that are closed after the test."""
    opened: list[EtcdStateLog] = []

    def open_log(endpoints: list[str], **kw: object) -> EtcdStateLog:
        store = EtcdStateLog(endpoints, prefix=kw.pop("prefix", prefix()), **kw)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_log
    for store in opened:
        store.close()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test alone, free to be killed."""
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A loopback port that accepts TCP connections (kernel backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def dead_url() -> str:
    """A loopback URL with nothing listening: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


class Collector:
    """Drains a watch on a thread into a list."""

    def __init__(self, w: Watch) -> None:
        self.watch = w
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                self.events.append(event)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, count: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.error is None, f"the watch failed: {self.error!r}"
        assert len(self.events) >= count, f"{len(self.events)} of {count} events within {timeout}s: {self.events}"
        return list(self.events)

    def stop(self) -> None:
        self.watch.cancel()
        self._thread.join(timeout=5)


# --- etcd killed in the middle of a watch ------------------------------------------------------------------------


def test_a_watch_survives_etcd_kill9_and_restart_without_loss_or_duplicates(
    own_etcd: EtcdServer, logs: Callable[..., EtcdStateLog]
) -> None:
    """Three rounds of: put keys, kill -9 etcd while events may still be in flight, restart; then more puts."""
    log = logs([own_etcd.url], timeout=2.0, watch_read_timeout=2.0)
    start = log.revision() + 1
    collector = Collector(log.watch("/kill/", start_revision=start))
    written: list[tuple[str, int]] = []

    def put_keys(n: int) -> None:
        for _ in range(n):
            key = f"/kill/{len(written):03d}"
            written.append((key, log.put(key, key.encode())))

    try:
        for round_ in range(3):
            put_keys(8)
            collector.wait_for(len(written) - 7, timeout=10)  # the stream flows; later events may be in flight
            own_etcd.kill9()
            if round_ == 0:
                # While etcd is down a call fails with Unavailable promptly instead of hanging.
                began = time.monotonic()
                with pytest.raises(Unavailable):
                    log.put("/kill/during-outage", b"x")
                assert time.monotonic() - began < 15
            time.sleep(0.5)  # the watcher sees its stream die and retries against a dead port
            own_etcd.restart()
        put_keys(8)
        collector.wait_for(len(written), timeout=25)
        time.sleep(0.5)  # let any duplicate arrive
        events = list(collector.events)
    finally:
        collector.stop()
    assert [(e.key, e.revision) for e in events] == written
    revisions = [e.revision for e in events]
    assert len(set(revisions)) == len(revisions), "duplicate events"
    assert all(e.type == "put" and e.value == e.key.encode() for e in events)


def test_a_watch_resumes_after_a_restart_with_nothing_written_meanwhile(
    own_etcd: EtcdServer, logs: Callable[..., EtcdStateLog]
) -> None:
    log = logs([own_etcd.url], timeout=2.0, watch_read_timeout=2.0)
    r = log.revision()
    collector = Collector(log.watch("/quiet/", start_revision=0))
    try:
        log.put("/quiet/a", b"1")
        collector.wait_for(1, timeout=10)
        own_etcd.kill9()
        time.sleep(2.5)  # longer than watch_read_timeout: the watcher must keep retrying, not give up
        own_etcd.restart()
        log.put("/quiet/b", b"2")
        events = collector.wait_for(2, timeout=20)
        time.sleep(0.3)
        events = list(collector.events)
    finally:
        collector.stop()
    assert [(e.key, e.revision) for e in events] == [("/quiet/a", r + 1), ("/quiet/b", r + 2)]


class FreezableProxy:
    """A TCP proxy to a loopback port; `freeze()` makes every open connection silent (bytes are read and dropped,
    sockets stay open), as a stream through a dead NAT or a hung server looks. New connections pass normally."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition("//")[2].partition(":")
        self._upstream = (host, int(port))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._threads: list[threading.Thread] = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            frozen = threading.Event()
            with self._lock:
                self._conns.append((client, upstream, frozen))
                for src, dst in ((client, upstream), (upstream, client)):
                    t = threading.Thread(target=self._pump, args=(src, dst, frozen), daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, frozen: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> int:
        """Silence every connection open now; returns how many."""
        with self._lock:
            for _, _, frozen in self._conns:
                frozen.set()
            return len(self._conns)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for client, upstream, _ in self._conns:
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
        for t in self._threads:
            t.join(timeout=2)


@pytest.fixture
def proxy(etcd_server: EtcdServer) -> Iterator[FreezableProxy]:
    p = FreezableProxy(etcd_server.url)
    try:
        yield p
    finally:
        p.close()


def test_a_silent_watch_stream_is_noticed_and_resumed(
    etcd_server: EtcdServer, proxy: FreezableProxy, logs: Callable[..., EtcdStateLog]
) -> None:
    """The etcd3gw lesson (its watch hung silently when etcd restarted): a stream that goes quiet without closing must not hang the watch forever."""
    shared = prefix()
    watcher = logs([proxy.url], prefix=shared, timeout=2.0, watch_read_timeout=2.0)
    writer = logs([etcd_server.url], prefix=shared)
    r = writer.revision()
    collector = Collector(watcher.watch("/frozen/", start_revision=r + 1))
    try:
        writer.put("/frozen/a", b"1")  # r+1
        collector.wait_for(1, timeout=10)
        assert proxy.freeze() >= 1
        writer.put("/frozen/b", b"2")  # r+2
        writer.put("/frozen/c", b"3")  # r+3
        # Noticed after ~watch_read_timeout (etcd here sends a progress notification every second).
        collector.wait_for(3, timeout=15)
        time.sleep(0.3)
        events = list(collector.events)
    finally:
        collector.stop()
    assert [(e.key, e.revision) for e in events] == [("/frozen/a", r + 1), ("/frozen/b", r + 2), ("/frozen/c", r + 3)]


def test_logs_with_overlapping_prefixes_do_not_see_each_other(
    etcd_server: EtcdServer, logs: Callable[..., EtcdStateLog]
) -> None:
    """`/dabctl` must not reach into `/dabctl-staging`: a log's whole keyspace is exactly its own keys."""
    base = prefix()
    mine = logs([etcd_server.url], prefix=base)
    neighbour = logs([etcd_server.url], prefix=base + "-staging")
    neighbour.put("/stacks/web", b"theirs")
    mine.put("/stacks/web", b"mine")
    r = mine.revision()
    w = mine.watch("", start_revision=r + 1)
    try:
        assert [(k.key, k.value) for k in mine.range("")] == [("/stacks/web", b"mine")]
        neighbour.put("/stacks/api", b"theirs")  # r+1: not mine
        mine.put("/stacks/api", b"mine")  # r+2
        assert [(e.key, e.revision) for e in collect(w, 1)] == [("/stacks/api", r + 2)]
        mine.delete("", prefix=True)
        assert [(k.key, k.value) for k in neighbour.range("")] == [
            ("/stacks/api", b"theirs"),
            ("/stacks/web", b"theirs"),
        ]
    finally:
        w.cancel()
        neighbour.delete("/", prefix=True)


# --- endpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dead_first", [True, False], ids=["dead-first", "dead-second"])
def test_a_dead_endpoint_among_several_is_skipped(
    etcd_server: EtcdServer, logs: Callable[..., EtcdStateLog], dead_first: bool
) -> None:
    dead = dead_url()
    endpoints = [dead, etcd_server.url] if dead_first else [etcd_server.url, dead]
    log = logs(endpoints, timeout=2.0)
    r = log.revision()
    w = log.watch("/ep/", start_revision=r + 1)
    try:
        assert log.put("/ep/a", b"1") == r + 1
        assert log.get("/ep/a") is not None
        assert log.txn([], []).revision == r + 1
        lease = log.grant(5)
        assert log.keepalive(lease) > 0
        log.revoke(lease)
        assert [(e.key, e.revision) for e in collect(w, 1)] == [("/ep/a", r + 1)]
    finally:
        w.cancel()


def test_a_silent_endpoint_is_skipped_for_reads(
    etcd_server: EtcdServer, logs: Callable[..., EtcdStateLog], silent_endpoint: str
) -> None:
    shared = prefix()
    logs([etcd_server.url], prefix=shared).put("/silent/a", b"1")
    log = logs([silent_endpoint, etcd_server.url], prefix=shared, timeout=1.0)
    began = time.monotonic()
    kv = log.get("/silent/a")
    assert kv is not None
    assert kv.value == b"1"
    assert time.monotonic() - began < 10


def test_a_keepalive_skips_a_silent_endpoint_well_within_a_short_lease(
    etcd_server: EtcdServer, logs: Callable[..., EtcdStateLog], silent_endpoint: str
) -> None:
    """A node's lease lives a few seconds: a keepalive must not wait the ordinary call timeout (5 s) on an
    endpoint that accepts and never answers, or a live node goes `down`."""
    log = logs([etcd_server.url], prefix=prefix())
    lease = log.grant(5)
    both = logs([silent_endpoint, etcd_server.url], prefix=prefix())
    assert both.timeout == 5.0
    began = time.monotonic()
    assert both.keepalive(lease) > 0
    took = time.monotonic() - began
    assert took < 3.0, f"keepalive took {took:.2f} s past a silent endpoint"
    assert took >= both.keepalive_timeout * 0.9  # it did try the silent one first
    log.revoke(lease)


def test_a_client_follows_the_etcd_clusters_members(etcd_server: EtcdServer, logs: Callable[..., EtcdStateLog]) -> None:
    """A client made with endpoints that are no longer members (or not yet all of them) is pointed at the members
    etcd lists, and keeps working; a second look changes nothing."""
    gone = dead_url()
    log = logs([gone, etcd_server.url], prefix=prefix())
    log.put("/a", b"1")  # through the live endpoint, after the dead one
    assert follow_members(log) is True
    assert log.endpoints == [etcd_server.url.rstrip("/")]
    assert follow_members(log) is False
    kv = log.get("/a")
    assert kv is not None and kv.value == b"1"
    assert log.use_endpoints([]) is False  # nothing listed: keep what it has
    assert log.endpoints == [etcd_server.url.rstrip("/")]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_all_endpoints_dead_raises_unavailable_promptly(
    logs: Callable[..., EtcdStateLog], silent_endpoint: str, kind: str
) -> None:
    endpoints = [dead_url(), dead_url()] if kind == "refused" else [silent_endpoint]
    began = time.monotonic()
    with pytest.raises(Unavailable) as info:
        log = logs(endpoints, timeout=1.0)
        log.get("/x")
    assert time.monotonic() - began < 10, "Unavailable took too long"
    assert str(info.value), "Unavailable without a message"
    if kind == "refused":
        log = logs(endpoints, timeout=1.0)
        for call in (lambda: log.put("/x", b""), lambda: log.grant(5), lambda: log.revision()):
            began = time.monotonic()
            with pytest.raises(Unavailable):
                call()
            assert time.monotonic() - began < 10


# --- TLS with client certificates ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path_factory.mktemp("etcd-tls"), tls=tls) as server:
        yield server


def test_tls_with_a_client_certificate_works(
    tls_etcd: EtcdServer, tls: TlsFiles, logs: Callable[..., EtcdStateLog]
) -> None:
    assert tls_etcd.url.startswith("https://")
    log = logs([tls_etcd.url], ca_file=str(tls.ca), cert_file=str(tls.client_cert), key_file=str(tls.client_key))
    r = log.revision()
    w = log.watch("/tls/", start_revision=r + 1)
    try:
        assert log.put("/tls/a", b"secret") == r + 1
        kv = log.get("/tls/a")
        assert kv is not None
        assert kv.value == b"secret"
        assert [(e.key, e.value) for e in collect(w, 1)] == [("/tls/a", b"secret")]
    finally:
        w.cancel()


CLEAR_TLS_ERROR = re.compile(r"cert|tls|ssl|handshake|verif", re.IGNORECASE)


@pytest.mark.parametrize("missing", ["client-cert", "ca"])
def test_tls_without_a_client_certificate_or_ca_fails_clearly(
    tls_etcd: EtcdServer, tls: TlsFiles, logs: Callable[..., EtcdStateLog], missing: str
) -> None:
    if missing == "client-cert":
        kw = {"ca_file": str(tls.ca)}
    else:  # the server's certificate cannot be verified
        kw = {"cert_file": str(tls.client_cert), "key_file": str(tls.client_key)}
    began = time.monotonic()
    with pytest.raises(StateLogError) as info:
        log = logs([tls_etcd.url], timeout=2.0, **kw)
        log.put("/tls/b", b"x")
    assert time.monotonic() - began < 15
    assert CLEAR_TLS_ERROR.search(str(info.value)), f"unclear TLS error: {info.value}"
