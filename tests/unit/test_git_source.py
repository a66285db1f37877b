"""The git source on local repositories (a path and file://): what a commit's tree yields, revisions per stack,
refs as branch / tag / SHA, one-line errors, credentials kept out of messages, and the ssh command line."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dulwich import porcelain
from dulwich.refs import Ref
from dulwich.repo import Repo

from agent.sources.git import GitAuth, GitSource, SourceError, ssh_command
from bundles.errors import InvalidBundles
from tests.support.gitserver import commit, force_push_reset, init_repo, tag

pytestmark = pytest.mark.timeout(30)

MakeSource = Callable[..., GitSource]


def bundle(image: str = "nginx:1.27", **service: object) -> str:
    return json.dumps({"Version": "0.1", "Services": {"web": {"Image": image, **service}}}, indent=2)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def open_source(tmp_path: Path) -> Iterator[MakeSource]:
    """GitSource factory whose sources are all closed after the test (each with its own cache by default)."""
    made: list[GitSource] = []

    def make(url: str | Path, ref: str = "main", path: str = "stacks", **kw: object) -> GitSource:
        kw.setdefault("cache_dir", tmp_path / f"cache{len(made)}")
        source = GitSource(str(url), ref, path, **kw)  # type: ignore[arg-type]
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


def revisions(source: GitSource, commit_sha: str) -> dict[str, str]:
    return {name: stack.revision for name, stack in source.load(commit_sha).stacks.items()}


# --- what a commit yields ----------------------------------------------------------------------------------------


def test_load_reads_only_the_bundle_files_directly_in_path(repo: Path, open_source: MakeSource) -> None:
    head = commit(
        repo,
        {
            "stacks/web.dab": bundle(),
            "stacks/api.yaml": "Version: '0.1'\nServices:\n  api:\n    Image: api:1\n",
            "stacks/db.JSON": bundle("postgres:16"),
            "stacks/notes.txt": "not a bundle {",
            "stacks/README.md": "# stacks",
            "stacks/sub/nested.dab": "not a bundle {",
            "stacks/old/web.dab": "not a bundle {",
            "top.dab": bundle(),
        },
        "initial",
    )
    source = open_source(repo)
    assert source.fetch() == head
    state = source.load(head)
    assert sorted(state.stacks) == ["api", "db", "web"]
    assert {s.name: s.file for s in state.stacks.values()} == {
        "api": "main:stacks/api.yaml",
        "db": "main:stacks/db.JSON",
        "web": "main:stacks/web.dab",
    }
    web = state.stacks["web"]
    assert web.content == bundle()
    assert web.bundle.services["web"].image == "nginx:1.27"
    assert web.bundle_hash.startswith("sha256:")

    root = open_source(repo, path="")
    root.fetch()
    assert {s.file for s in root.load(head).stacks.values()} == {"main:top.dab"}
    slashed = open_source(repo, path="/stacks/")
    slashed.fetch()  # a leading or trailing slash names the same directory
    assert sorted(slashed.load(head).stacks) == ["api", "db", "web"]


def test_a_revision_changes_only_when_that_stacks_file_changes(repo: Path, open_source: MakeSource) -> None:
    c1 = commit(repo, {"stacks/web.dab": bundle("web:1"), "stacks/api.dab": bundle("api:1")}, "web and api")
    c2 = commit(repo, {"stacks/api.dab": bundle("api:2")}, "api only")
    c3 = commit(repo, {"stacks/db.dab": bundle("db:1"), "README.md": "docs"}, "db and docs")
    source = open_source(repo)
    assert source.fetch() == c3
    assert revisions(source, c3) == {"api": f"main@sha1:{c2}", "db": f"main@sha1:{c3}", "web": f"main@sha1:{c1}"}
    # Older commits are still readable, each with the revisions of its own time.
    assert revisions(source, c2) == {"api": f"main@sha1:{c2}", "web": f"main@sha1:{c1}"}
    assert revisions(source, c1) == {"api": f"main@sha1:{c1}", "web": f"main@sha1:{c1}"}

    c4 = commit(repo, {"stacks/web.dab": bundle("web:2"), "docs/more.md": "x"}, "web")
    c5 = commit(repo, {"stacks/api.dab": None}, "api removed")
    c6 = commit(repo, {"stacks/api.dab": bundle("api:2")}, "api back, same content as in c2")
    assert source.fetch() == c6
    assert revisions(source, c6) == {"api": f"main@sha1:{c6}", "db": f"main@sha1:{c3}", "web": f"main@sha1:{c4}"}
    assert revisions(source, c5) == {"db": f"main@sha1:{c3}", "web": f"main@sha1:{c4}"}

    # A second source on the same cache (a restarted agent) needs no fetch to read and agrees.
    again = open_source(repo, cache_dir=source.cache_dir)
    assert revisions(again, c6) == revisions(source, c6)


def test_renaming_the_path_directory_restarts_revisions_there(repo: Path, open_source: MakeSource) -> None:
    commit(repo, {"old/web.dab": bundle()}, "old layout")
    moved = commit(repo, {"old/web.dab": None, "stacks/web.dab": bundle()}, "moved")
    source = open_source(repo)
    source.fetch()
    assert revisions(source, moved) == {"web": f"main@sha1:{moved}"}


def test_the_commit_read_is_the_one_asked_for_not_the_latest(repo: Path, open_source: MakeSource) -> None:
    c1 = commit(repo, {"stacks/web.dab": bundle("web:1")}, "one")
    source = open_source(repo)
    source.fetch()
    commit(repo, {"stacks/web.dab": bundle("web:2")}, "two")
    source.fetch()
    assert source.load(c1).stacks["web"].bundle.services["web"].image == "web:1"


# --- bundle errors, as for a directory ---------------------------------------------------------------------------


def test_a_broken_bundle_is_reported_with_its_path_in_the_repo_and_the_field(
    repo: Path, open_source: MakeSource
) -> None:
    head = commit(
        repo,
        {
            "stacks/web.dab": bundle(),
            "stacks/x.dab": json.dumps({"Version": "0.1", "Services": {"web": {"Image": "a:1", "Replica": 3}}}),
        },
        "typo",
    )
    source = open_source(repo)
    source.fetch()
    with pytest.raises(InvalidBundles) as info:
        source.load(head)
    assert [str(e) for e in info.value.errors] == [
        "main:stacks/x.dab: Services.web.Replica: unknown field; did you mean 'Deploy.Replicas'?"
    ]


def test_syntax_errors_bad_names_duplicates_and_links_are_all_reported_at_once(
    repo: Path, open_source: MakeSource
) -> None:
    commit(repo, {"stacks/web.dab": bundle()}, "one")
    os.symlink("web.dab", repo / "stacks" / "link.dab")
    porcelain.add(str(repo), [str(repo / "stacks" / "link.dab")])
    head = commit(
        repo,
        {
            "stacks/bad.dab": '{"Version": "0.1",\n  "Services": }',
            "stacks/Web_Shop.dab": bundle(),
            "stacks/web.yaml": "Version: '0.1'\nServices:\n  web:\n    Image: nginx:1\n",
        },
        "many problems",
    )
    source = open_source(repo)
    source.fetch()
    with pytest.raises(InvalidBundles) as info:
        source.load(head)
    assert sorted(str(e) for e in info.value.errors) == [
        "main:stacks/Web_Shop.dab: invalid stack name 'Web_Shop' (the file name); rename the file: lowercase "
        "letters, digits and '-', at most 63 characters, e.g. 'web-shop'",
        "main:stacks/bad.dab:2:15: invalid JSON: Expecting value; fix the syntax there",
        "main:stacks/link.dab: is a symbolic link; commit the bundle itself: a git source reads regular files only",
        "main:stacks/web.yaml: stack 'web' is also defined by main:stacks/web.dab; keep one file per stack",
    ]


def test_a_file_that_is_not_utf8_is_reported_with_its_line(repo: Path, open_source: MakeSource) -> None:
    commit(repo, {"stacks/ok.dab": bundle()}, "ok")
    (repo / "stacks" / "latin.dab").write_bytes(b'{"Version": "0.1",\n "Services": {"w\xe9b": {}}}')
    porcelain.add(str(repo), [str(repo / "stacks" / "latin.dab")])
    head = commit(repo, {}, "latin-1")
    source = open_source(repo)
    source.fetch()
    with pytest.raises(InvalidBundles) as info:
        source.load(head)
    assert [str(e) for e in info.value.errors] == [
        "main:stacks/latin.dab:2: byte 0xe9 is not UTF-8; save the file as UTF-8"
    ]


# --- refs --------------------------------------------------------------------------------------------------------


def test_ref_as_branch_tag_annotated_tag_and_sha(repo: Path, open_source: MakeSource) -> None:
    c1 = commit(repo, {"stacks/web.dab": bundle("web:1")}, "one")
    tag(repo, "v1", c1)
    tag(repo, "v1-signed", c1, annotated=True)
    c2 = commit(repo, {"stacks/web.dab": bundle("web:2")}, "two")

    for ref, expected in (("main", c2), ("refs/heads/main", c2), ("v1", c1), ("v1-signed", c1), (c1, c1)):
        source = open_source(repo, ref=ref)
        assert source.fetch() == expected, ref
        state = source.load(expected)
        assert state.stacks["web"].revision == f"{ref}@sha1:{expected}"
        assert state.stacks["web"].file == f"{ref}:stacks/web.dab"
    # remote_head is the commit (an annotated tag's target), a SHA as is; before any fetch, as after.
    assert open_source(repo, ref="main").remote_head() == c2
    assert open_source(repo, ref="v1").remote_head() == c1
    assert open_source(repo, ref="v1-signed").remote_head() == c1
    assert open_source(repo, ref=c1).remote_head() == c1


def test_an_empty_repository_has_no_ref(tmp_path: Path, open_source: MakeSource) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    init_repo(empty)
    source = open_source(empty)
    for call in (source.remote_head, source.fetch):
        with pytest.raises(SourceError, match=r"ref 'main' not found \(the remote has no branches\); check --ref"):
            call()


def test_a_sha_ref_is_fetched_once_and_then_read_without_the_remote(repo: Path, open_source: MakeSource) -> None:
    c1 = commit(repo, {"stacks/web.dab": bundle()}, "one")
    commit(repo, {"README.md": "x"}, "two")
    source = open_source(repo, ref=c1)
    assert source.fetch() == c1
    moved = repo.rename(repo.parent / "gone")
    assert source.fetch() == c1  # the repository is gone: a pinned commit needs no fetch
    assert list(source.load(c1).stacks) == ["web"]
    moved.rename(repo)


def test_a_missing_ref_or_commit_is_a_source_error(repo: Path, open_source: MakeSource) -> None:
    commit(repo, {"stacks/web.dab": bundle()}, "one")
    tag(repo, "v1")
    source = open_source(repo, ref="release")
    for call in (source.remote_head, source.fetch):
        with pytest.raises(SourceError) as info:
            call()
        assert str(info.value).endswith(
            "failed: ref 'release' not found (the remote has branches: main; tags: v1); check --ref"
        )
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(SourceError, match=f"commit {missing} not found within 50 commits"):
        open_source(repo, ref=missing).fetch()


def test_a_force_push_is_followed(repo: Path, open_source: MakeSource) -> None:
    c1 = commit(repo, {"stacks/web.dab": bundle("web:1")}, "one")
    c2 = commit(repo, {"stacks/web.dab": bundle("web:2")}, "two")
    source = open_source(repo)
    assert source.fetch() == c2
    force_push_reset(repo, c1)
    assert source.remote_head() == c1
    assert source.fetch() == c1  # backwards: not a fast-forward
    c3 = commit(repo, {"stacks/web.dab": bundle("web:3")}, "three, instead of two")
    assert source.fetch() == c3
    assert revisions(source, c3) == {"web": f"main@sha1:{c3}"}
    with Repo(str(source.cache_dir)) as cache:
        assert cache.refs[Ref(b"refs/heads/heads/main")] == c3.encode()


# --- source errors -------------------------------------------------------------------------------------------------


def test_a_missing_path_or_a_file_as_path_is_a_source_error(repo: Path, open_source: MakeSource) -> None:
    head = commit(repo, {"stacks/web.dab": bundle(), "file.txt": "x"}, "one")
    source = open_source(repo, path="deploy/stacks")
    source.fetch()
    with pytest.raises(SourceError) as info:
        source.load(head)
    assert str(info.value) == f"path 'deploy/stacks' in main@{head[:12]} of {repo} does not exist; check --path"
    as_file = open_source(repo, path="file.txt")
    as_file.fetch()
    with pytest.raises(SourceError, match="is a file, not a directory; check --path"):
        as_file.load(head)


def test_deleting_every_bundle_leaves_an_empty_source_not_a_missing_path(repo: Path, open_source: MakeSource) -> None:
    # git keeps no empty directories: deleting the last bundle deletes `path` with it.
    commit(repo, {"stacks/web.dab": bundle(), "stacks/api.dab": bundle("api:1"), "README.md": "docs"}, "two stacks")
    source = open_source(repo)
    source.fetch()
    deleted = commit(repo, {"stacks/web.dab": None, "stacks/api.dab": None}, "every stack removed")
    assert source.fetch() == deleted
    assert source.load(deleted).stacks == {}
    later = commit(repo, {"README.md": "more docs"}, "unrelated")
    assert source.fetch() == later
    assert source.load(later).stacks == {}
    # A restarted agent reads the same from its cache.
    assert open_source(repo, cache_dir=source.cache_dir).load(later).stacks == {}
    # A path that never held anything stays an error: it is a mistake in --path, not an emptied source.
    typo = open_source(repo, path="stack")
    typo.fetch()
    with pytest.raises(SourceError, match=r"path 'stack' in .* does not exist; check --path"):
        typo.load(later)


def test_an_unknown_commit_a_missing_repository_or_a_bad_cache_is_a_source_error(
    repo: Path, tmp_path: Path, open_source: MakeSource
) -> None:
    commit(repo, {"stacks/web.dab": bundle()}, "one")
    source = open_source(repo)
    with pytest.raises(SourceError, match=r"is not in the cache .*; fetch it first"):
        source.load("0123456789abcdef0123456789abcdef01234567")
    nowhere = open_source(tmp_path / "nothing-here")
    for call in (nowhere.remote_head, nowhere.fetch):
        with pytest.raises(SourceError, match=r"of .*nothing-here failed: not a git repository; check the URL or path"):
            call()
    junk = tmp_path / "junk-cache"
    junk.mkdir()
    (junk / "file").write_text("x")
    with pytest.raises(SourceError, match=r"cache directory .*junk-cache is not a bare git repository; remove it"):
        open_source(repo, cache_dir=junk).fetch()


def test_file_urls_work_like_paths(repo: Path, open_source: MakeSource) -> None:
    head = commit(repo, {"stacks/web.dab": bundle()}, "one")
    source = open_source(f"file://{repo}")
    assert source.location == f"file://{repo}"
    assert source.remote_head() == head
    assert source.fetch() == head
    assert list(source.load(head).stacks) == ["web"]


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("https://deploy@git.example.com:8443/ops.git", "https://git.example.com:8443/ops.git"),
        ("http://u@[::1]:8080/r", "http://[::1]:8080/r"),
        ("ssh://git@git.example.com:2222/ops/stacks.git", "ssh://git.example.com:2222/ops/stacks.git"),
        ("git@git.example.com:ops/stacks.git", "git@git.example.com:ops/stacks.git"),
        ("/srv/git/stacks", "/srv/git/stacks"),
        ("file:///srv/git/stacks", "file:///srv/git/stacks"),
    ],
)
def test_location_strips_credentials(url: str, location: str, tmp_path: Path) -> None:
    with GitSource(url, cache_dir=tmp_path / "cache", auth=GitAuth(token="tok-123")) as source:
        assert source.location == location
        assert "s3cret" not in repr(source) and "tok-123" not in repr(source) and "p@ss" not in repr(source)


def test_the_token_is_in_no_repr() -> None:
    auth = GitAuth(token="tok-123", username="bot")
    assert "tok-123" not in repr(auth)
    assert "bot" in repr(auth)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("git://git.example.com/r", "unsupported scheme 'git'; use https://, ssh:// or a local path"),
        ("ftp://git.example.com/r", "unsupported scheme 'ftp'"),
        ("https:///r", "has no host; fix the URL"),
        ("ssh://u:pw@h/r", "ssh passwords are not supported; use an ssh key"),
        (
            "https://x-access-token:pw-s3cret@git.example.com/ops.git",
            r"^git source URL https://git.example.com/ops.git carries a password or token, which `ps`, logs and lock "
            r"files would show; remove it and put the token in a file \(mode 0600\) named by git_token_file$",
        ),
        ("http://u:p%40ss@[::1]:8080/r", "carries a password or token"),
        ("", "URL is empty"),
    ],
)
def test_unusable_urls_are_rejected_at_once(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=message) as info:
        GitSource(url, cache_dir=tmp_path)
    assert "pw" not in str(info.value)


# --- ssh -----------------------------------------------------------------------------------------------------------


def test_the_ssh_command_checks_host_keys_strictly_and_never_prompts() -> None:
    args = ssh_command(GitAuth(ssh_key_file="/keys/deploy", known_hosts_file="/etc/dabctl/known_hosts"), 30)
    assert args[0] == "ssh"
    options = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    assert {
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/etc/dabctl/known_hosts",
        "GlobalKnownHostsFile=/dev/null",
        "IdentitiesOnly=yes",
        "ConnectTimeout=30",
    } <= set(options)
    assert args[args.index("-i") + 1] == "/keys/deploy"
    # Without a known_hosts file ssh's own files are used, still strictly; without a key, ssh's default keys.
    plain = ssh_command(GitAuth(), 2.5)
    assert "StrictHostKeyChecking=yes" in plain and "ConnectTimeout=3" in plain
    assert "-i" not in plain and not any(a.startswith("UserKnownHostsFile") for a in plain)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_ssh_itself_reads_the_command_line_as_meant(tmp_path: Path) -> None:
    """`ssh -G` prints the configuration a command line resolves to, without connecting."""
    key = tmp_path / "deploy key"
    key.write_text("not really a key")
    kh = tmp_path / "known hosts"
    args = ssh_command(GitAuth(ssh_key_file=str(key), known_hosts_file=str(kh)), 10)
    out = subprocess.run(
        [*args, "-G", "-p", "2222", "deploy@git.example.com"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.splitlines()
    for line in (
        "batchmode yes",
        "stricthostkeychecking true",
        f"userknownhostsfile {kh}",
        "globalknownhostsfile /dev/null",
        f"identityfile {key}",
        "identitiesonly yes",
        "connecttimeout 10",
        "port 2222",
        "user deploy",
    ):
        assert line in out, line


def test_a_missing_known_hosts_or_key_file_fails_before_connecting(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    url = "ssh://git@127.0.0.1:9/ops/stacks.git"
    with GitSource(url, cache_dir=tmp_path / "c", auth=GitAuth(known_hosts_file=str(kh))) as source:
        with pytest.raises(SourceError) as info:
            source.remote_head()
        assert str(info.value) == (
            f"git ls-remote of ssh://127.0.0.1:9/ops/stacks.git failed: known_hosts file {kh} does not exist; "
            "add the server's verified host key to it (ssh-keyscan, then check the fingerprint)"
        )
    kh.write_text("")
    auth = GitAuth(known_hosts_file=str(kh), ssh_key_file=str(tmp_path / "id_missing"))
    with (
        GitSource(url, cache_dir=tmp_path / "c", auth=auth) as source,
        pytest.raises(SourceError, match=r"ssh key file .*id_missing does not exist; check the key path"),
    ):
        source.fetch()


FAKE_SSH = """#!/bin/sh
printf '%s\\n' "$@" > "{log}"
echo "Host key verification failed." >&2
exit 255
"""


def test_an_unknown_host_key_is_a_source_error_and_ssh_gets_the_strict_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ssh-args"
    fake = bin_dir / "ssh"
    fake.write_text(FAKE_SSH.format(log=log))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    kh = tmp_path / "known hosts"  # a space: the command line is quoted for dulwich's shlex split
    kh.write_text("")
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key")
    auth = GitAuth(ssh_key_file=str(key), known_hosts_file=str(kh))
    url = "ssh://deploy@git.example.com:2222/ops/stacks.git"
    with GitSource(url, cache_dir=tmp_path / "c", auth=auth) as source, pytest.raises(SourceError) as info:
        source.remote_head()
    assert str(info.value) == (
        "git ls-remote of ssh://git.example.com:2222/ops/stacks.git failed: the server's host key is not in "
        f"{kh} (or has changed); add its verified key (ssh-keyscan, then check the fingerprint)"
    )
    args = log.read_text().splitlines()
    assert f'UserKnownHostsFile="{kh}"' in args and "StrictHostKeyChecking=yes" in args and "BatchMode=yes" in args
    assert args[args.index("-i") + 1] == str(key)
    assert args[args.index("-p") + 1] == "2222"
    assert "deploy@git.example.com" in args
    assert args[-1] == "git-upload-pack '/ops/stacks.git'"
