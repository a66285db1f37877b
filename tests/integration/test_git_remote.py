"""The git source against a real smart-HTTP server on loopback (dulwich's): ls-remote, shallow and incremental
fetches, force-pushes, an unreachable or hung server, and basic auth that never leaks the token."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dulwich.objects import ObjectID
from dulwich.repo import Repo

from agent.sources.git import GitAuth, GitSource, SourceError
from tests.support.gitserver import GitServer, commit, force_push_reset, silent_listener, tag

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MakeSource = Callable[..., GitSource]
TOKEN = "ghp_s3cr3t-t0ken-value"


def bundle(image: str) -> str:
    return json.dumps({"Version": "0.1", "Services": {"web": {"Image": image}}})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def open_source(tmp_path: Path) -> Iterator[MakeSource]:
    made: list[GitSource] = []

    def make(url: str, ref: str = "main", path: str = "stacks", **kw: object) -> GitSource:
        kw.setdefault("cache_dir", tmp_path / f"cache{len(made)}")
        kw.setdefault("timeout", 5)
        source = GitSource(url, ref, path, **kw)  # type: ignore[arg-type]
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


def objects(cache: Path) -> set[bytes]:
    with Repo(str(cache)) as r:
        return set(r.object_store)


def history(repo: Path, n: int) -> list[str]:
    """n commits: the first adds stacks web and api, each later one changes only stacks/api.dab."""
    shas = [commit(repo, {"stacks/web.dab": bundle("web:1"), "stacks/api.dab": bundle("api:0")}, "c0")]
    shas += [commit(repo, {"stacks/api.dab": bundle(f"api:{i}")}, f"c{i}") for i in range(1, n)]
    return shas


def test_remote_head_is_one_cheap_ls_remote(repo: Path, open_source: MakeSource) -> None:
    shas = history(repo, 2)
    tag(repo, "v1", shas[0], annotated=True)
    with GitServer(repo) as server:
        source = open_source(server.url)
        before = server.requests
        started = time.monotonic()
        assert source.remote_head() == shas[-1]
        assert time.monotonic() - started < 1
        assert server.requests - before == 1
        assert not source.cache_dir.exists()  # polling creates no cache
        # An annotated tag: the commit it points to (the server's peeled entry), as fetch() returns.
        tagged = open_source(server.url, ref="v1")
        assert tagged.remote_head() == shas[0] == tagged.fetch()


def test_a_depth_limited_fetch_then_incremental_fetches(repo: Path, open_source: MakeSource) -> None:
    shas = history(repo, 5)
    with GitServer(repo) as server:
        shallow = open_source(server.url, depth=2)
        assert shallow.fetch() == shas[-1]
        with Repo(str(shallow.cache_dir)) as cache:
            assert ObjectID(shas[3].encode()) in cache.object_store
            assert ObjectID(shas[2].encode()) not in cache.object_store  # beyond depth 2
            assert cache.get_shallow() == {shas[3].encode()}
        # web last changed in c0, beyond the boundary: its revision is the oldest commit held, api's its own.
        state = shallow.load(shas[-1])
        assert state.stacks["web"].revision == f"main@sha1:{shas[3]}"
        assert state.stacks["api"].revision == f"main@sha1:{shas[4]}"

        # Incremental with the default depth (history shorter than it): only the new commit's objects come.
        full = open_source(server.url)
        assert full.fetch() == shas[-1]
        before = objects(full.cache_dir)
        new = commit(repo, {"stacks/db.dab": bundle("db:1")}, "db")
        assert full.remote_head() == new
        assert full.fetch() == new
        assert len(objects(full.cache_dir) - before) == 4  # commit, root tree, stacks tree, db.dab
        assert full.fetch() == new  # nothing new: no pack at all
        assert len(objects(full.cache_dir) - before) == 4
        assert {n: s.revision for n, s in full.load(new).stacks.items()} == {
            "api": f"main@sha1:{shas[4]}",
            "db": f"main@sha1:{new}",
            "web": f"main@sha1:{shas[0]}",
        }

        # The shallow cache moves its boundary on, but a stack's revision stays where it was: history held grows.
        assert shallow.fetch() == new
        assert shallow.load(new).stacks["web"].revision == f"main@sha1:{shas[3]}"


def test_a_force_push_is_followed(repo: Path, open_source: MakeSource) -> None:
    shas = history(repo, 4)
    with GitServer(repo) as server:
        source = open_source(server.url, depth=2)
        assert source.fetch() == shas[3]
        # Reset to an older commit and commit on top: history rewritten, not a fast-forward.
        force_push_reset(repo, shas[1])
        rewritten = commit(repo, {"stacks/web.dab": bundle("web:2")}, "instead of c2, c3")
        assert source.remote_head() == rewritten
        assert source.fetch() == rewritten
        state = source.load(rewritten)
        assert state.stacks["web"].revision == f"main@sha1:{rewritten}"
        assert state.stacks["api"].bundle.services["web"].image == "api:1"
        # Back to a commit beyond what the cache held (its boundary was c2): fetched all the same.
        force_push_reset(repo, shas[0])
        assert source.fetch() == shas[0]
        assert source.load(shas[0]).stacks["api"].bundle.services["web"].image == "api:0"


def test_a_sha_ref_the_server_does_not_advertise(repo: Path, open_source: MakeSource) -> None:
    shas = history(repo, 3)
    with GitServer(repo) as server:
        source = open_source(server.url, ref=shas[1])
        assert source.remote_head() == shas[1]
        assert source.fetch() == shas[1]  # dulwich's server refuses the bare SHA: found through the branches
        assert source.load(shas[1]).stacks["api"].revision == f"{shas[1]}@sha1:{shas[1]}"
        missing = open_source(server.url, ref="0" * 40)
        with pytest.raises(SourceError, match=r"commit 0{40} not found within 50 commits of any branch or tag"):
            missing.fetch()


def test_a_missing_ref_is_one_line(repo: Path, open_source: MakeSource) -> None:
    history(repo, 1)
    with GitServer(repo) as server:
        source = open_source(server.url, ref="release")
        with pytest.raises(SourceError) as info:
            source.fetch()
        assert str(info.value) == (
            f"git fetch of {server.url} failed: ref 'release' not found (the remote has branches: main); check --ref"
        )


def test_a_stopped_server_fails_fast_and_a_restarted_one_works_again(repo: Path, open_source: MakeSource) -> None:
    shas = history(repo, 1)
    server = GitServer(repo).start()
    try:
        source = open_source(server.url)
        assert source.fetch() == shas[0]
        server.stop()
        for call, verb in ((source.remote_head, "ls-remote"), (source.fetch, "fetch")):
            started = time.monotonic()
            with pytest.raises(SourceError) as info:
                call()
            assert time.monotonic() - started < 3
            assert str(info.value) == (
                f"git {verb} of {server.url} failed: cannot reach 127.0.0.1:{server.port}: connection refused; "
                "check that the server is up and the URL's host and port"
            )
        assert list(source.load(shas[0]).stacks) == ["api", "web"]  # what was fetched stays readable
        later = commit(repo, {"stacks/web.dab": bundle("web:2")}, "while down")
        server.start()
        assert source.remote_head() == later
        assert source.fetch() == later
    finally:
        server.stop()


def test_a_hung_server_times_out(tmp_path: Path, open_source: MakeSource) -> None:
    sock, url = silent_listener()
    with sock:
        source = open_source(url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(SourceError, match="no answer in time"):
            source.remote_head()
        assert time.monotonic() - started < 3  # a read timeout is not retried


def test_basic_auth_wrong_or_missing_token_is_an_authentication_error_without_the_token(
    repo: Path, open_source: MakeSource
) -> None:
    shas = history(repo, 1)
    with GitServer(repo, token=TOKEN) as server:
        for auth in (GitAuth(token="wrong-" + TOKEN), GitAuth()):
            source = open_source(server.url, auth=auth)
            for call in (source.remote_head, source.fetch):
                with pytest.raises(SourceError) as info:
                    call()
                message = str(info.value)
                assert "authentication failed (HTTP 401)" in message
                assert TOKEN not in message and "wrong-" not in message and "\n" not in message
            assert TOKEN not in repr(source) and TOKEN not in repr(auth)

        source = open_source(server.url, auth=GitAuth(token=TOKEN))
        assert source.remote_head() == shas[0]
        assert source.fetch() == shas[0]
        assert list(source.load(shas[0]).stacks) == ["api", "web"]

    with GitServer(repo, token=TOKEN, username="deploy") as server:
        source = open_source(server.url, auth=GitAuth(token=TOKEN, username="deploy"))
        assert source.fetch() == shas[0]
        default_user = open_source(server.url, auth=GitAuth(token=TOKEN))  # sent as x-access-token
        with pytest.raises(SourceError, match="authentication failed"):
            default_user.remote_head()
        # Credentials in the URL are refused (`ps`, logs and lock files would show them), and shown nowhere.
        with pytest.raises(SourceError, match="carries a password or token") as info:
            open_source(server.url.replace("http://", f"http://deploy:{TOKEN}@"))
        assert TOKEN not in str(info.value)


def test_forbidden_and_not_found_are_told_apart(repo: Path, open_source: MakeSource) -> None:
    history(repo, 1)
    with GitServer(repo, token=TOKEN, reject_status=403) as server:
        source = open_source(server.url, auth=GitAuth(token="not-" + TOKEN))
        with pytest.raises(SourceError) as info:
            source.fetch()
        assert str(info.value) == (
            f"git fetch of {server.url} failed: access denied (HTTP 403): authentication failed or not allowed; "
            "check the token's access"
        )
    with GitServer(repo) as server:
        wrong_path = open_source(server.url + "-typo")
        with pytest.raises(SourceError) as info:
            wrong_path.remote_head()
        assert (
            str(info.value)
            == f"git ls-remote of {server.url}-typo failed: no repository there (HTTP 404); check the URL"
        )
