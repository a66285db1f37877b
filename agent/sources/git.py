"""A git repository as a bundle source: ls-remote to poll, shallow incremental fetch into a cache, read from trees.

    source = GitSource("https://git.example/ops.git", ref="main", path="stacks", cache_dir=state / "git",
                       auth=GitAuth(token=token))
    if source.remote_head() != last:      # one ls-remote: cheap enough to poll
        commit = source.fetch()           # shallow first, incremental afterwards, follows force-pushes
        state = source.load(commit)       # every bundle file directly in `stacks/`, read from the commit's tree

The cache is a bare repository kept between passes. Nothing is ever checked out: a pass reads blobs from one
commit's tree, so it never sees a half-updated directory. A stack's revision is `<ref>@sha1:<commit>` where commit
is the last one (on the first-parent chain, within the history held locally) that changed that stack's own file.

Errors reaching or reading the repository are SourceError, one line saying what failed and what to check; bundle
errors are InvalidBundles, exactly as for a directory (file names shown as `<ref>:<path>/<file>`). Credentials
never appear in messages or reprs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import stat
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Self, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import urllib3
from dulwich.client import (
    AuthCallbackPoolManager,
    GitClient,
    HTTPUnauthorized,
    SSHGitClient,
    SubprocessGitClient,
    SubprocessSSHVendor,
    SubprocessWrapper,
    Urllib3HttpGitClient,
    default_urllib3_manager,
)
from dulwich.errors import GitProtocolError, HangupException, NotGitRepository
from dulwich.object_store import tree_lookup_path
from dulwich.objects import Blob, Commit, ObjectID, Tree
from dulwich.protocol import Protocol
from dulwich.refs import Ref
from dulwich.repo import Repo

from agent.sources.packguard import PackGuard, PackRefused
from bundles.desired import DesiredState, StackBundle
from bundles.errors import BundleError, InvalidBundles, SourceError
from bundles.load import BUNDLE_SUFFIXES, stack_bundle
from schemas.config import is_loopback

__all__ = ["GitAuth", "GitSource", "SourceError", "ssh_command"]

_SHA1 = re.compile(r"[0-9a-f]{40}")
_SCP_LIKE = re.compile(r"^(?P<user>[^@/:\s]+)@(?P<host>[^@/:\s]+):(?P<path>.+)$")
_PEELED = b"^{}"
_REGULAR_FILES = (0o100644, 0o100755, 0o100664)
_TOKEN_USER = "x-access-token"
DEFAULT_MAX_OBJECT_BYTES = 32 * 1024 * 1024  # the config's git_max_object_bytes


@dataclass(frozen=True)
class GitAuth:
    """Credentials for one repository.

    token: HTTP(S) basic-auth password (user `x-access-token` unless `username` is given); never shown.
    ssh_key_file: ssh private key. known_hosts_file: the only host keys an ssh:// server is checked against (ssh's
    own known_hosts files when unset); an unknown or changed host key is an error, never accepted.
    """

    token: str | None = field(default=None, repr=False)
    username: str | None = None
    ssh_key_file: str | None = None
    known_hosts_file: str | None = None


_NO_AUTH = GitAuth()


def ssh_command(auth: GitAuth, timeout: float) -> list[str]:
    """The ssh command line (before dulwich's `-p port`, `host` and the git command) for a fetch.

    Host keys are checked strictly against `auth.known_hosts_file` (and nothing else) when given; BatchMode makes a
    missing key or passphrase fail instead of prompting; the keep-alives bound a stalled connection to ~`timeout`.
    """
    seconds = max(1, math.ceil(timeout))
    args = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        f"ConnectTimeout={seconds}",
        "-o",
        f"ServerAliveInterval={max(1, math.ceil(seconds / 3))}",
        "-o",
        "ServerAliveCountMax=3",
    ]
    if auth.known_hosts_file:
        # ssh splits this option's value on whitespace (it takes several files): quote a path with spaces.
        known = auth.known_hosts_file
        known = f'"{known}"' if any(c.isspace() for c in known) else known
        args += ["-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null"]
    if auth.ssh_key_file:
        args += ["-i", auth.ssh_key_file, "-o", "IdentitiesOnly=yes"]
    return args


@dataclass(frozen=True)
class _Remote:
    """Where the repository is and how to reach it, parsed once from the URL."""

    kind: str  # "local" | "http" | "ssh"
    location: str  # for messages: no credentials
    target: str  # local path, or the URL without credentials (http), or the path on the host (ssh)
    _: KW_ONLY
    host: str = ""
    port: int | None = None
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def _parse_url(url: str) -> _Remote:
    if not url:
        raise SourceError("git source URL is empty; pass a repository URL or path")
    if "://" not in url:
        scp = _SCP_LIKE.match(url)
        if scp and not os.path.exists(url):
            return _Remote("ssh", url, scp["path"], host=scp["host"], user=scp["user"])  # user@host:path (scp-like)
        return _Remote("local", url, os.path.abspath(url))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise SourceError(f"git source URL {_strip_userinfo(url)} has an invalid port; fix the URL") from None
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "file":
        return _Remote("local", clean, unquote(parts.path))
    if scheme in ("http", "https"):
        if not host:
            raise SourceError(f"git source URL {clean} has no host; fix the URL")
        if password is not None:
            raise SourceError(
                f"git source URL {clean} carries a password or token, which `ps`, logs and lock files would show; "
                "remove it and put the token in a file (mode 0600) named by git_token_file"
            )
        return _Remote("http", clean, clean, host=host, port=port, user=user, password=password)
    if scheme in ("ssh", "git+ssh"):
        if not host:
            raise SourceError(f"git source URL {clean} has no host; fix the URL")
        if password:
            raise SourceError(f"git source URL {clean}: ssh passwords are not supported; use an ssh key")
        return _Remote("ssh", clean, unquote(parts.path), host=host, port=port, user=user)
    raise SourceError(f"git source URL {clean}: unsupported scheme {scheme!r}; use https://, ssh:// or a local path")


def _strip_userinfo(url: str) -> str:
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{sep}{tail}"


class _Responses:
    """Responses handed to dulwich, so that each operation can end by releasing their connections: dulwich raises
    on a 401/403/404 without reading or releasing the response, which would leave its socket open."""

    def __init__(self) -> None:
        self.open: list[urllib3.BaseHTTPResponse] = []

    def release(self) -> None:
        while self.open:
            response = self.open.pop()
            with contextlib.suppress(Exception):
                response.drain_conn()
                response.release_conn()


class _Tracked(urllib3.PoolManager):
    """Keeps every response it opens (dulwich leaks them unless they are closed explicitly). A PoolManager, so that
    in _ProxyManager it comes before urllib3's ProxyManager and wraps its urlopen."""

    responses: _Responses

    # urllib3's own PoolManager.urlopen has this signature, narrower than RequestMethods.urlopen, and the same ignore.
    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        response = super().urlopen(method, url, redirect=redirect, **kw)
        self.responses.open.append(response)
        return response


class _PoolManager(_Tracked):
    """urllib3's pool manager retrying a refused connection twice but never a read that timed out (the default
    retries would make a hung server cost four timeouts), and keeping track of its responses."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(retries=_RETRIES, **kw)
        self.responses = _Responses()


class _ProxyManager(_Tracked, urllib3.ProxyManager):
    """The same, through an http(s)_proxy."""

    def __init__(self, proxy_url: str, **kw: Any) -> None:
        super().__init__(proxy_url, retries=_RETRIES, **kw)
        self.responses = _Responses()


class _Releasing(GitClient):
    """Remembers its connections: dulwich leaves a subprocess (ssh, git upload-pack), its pipes and the protocol
    open when the other side hangs up early (an unknown host key) or the fetch is refused mid-pack, so each operation
    ends with release()."""

    _open: list[Protocol]

    def _connect(
        self, cmd: bytes, path: str | bytes, protocol_version: int | None = None
    ) -> tuple[Protocol, Callable[[], bool], IO[bytes] | None]:
        proto, can_read, stderr = cast(Any, super())._connect(cmd, path, protocol_version)
        self.__dict__.setdefault("_open", []).append(proto)
        return proto, can_read, stderr

    def release(self) -> None:
        opened: list[Protocol] = self.__dict__.get("_open", [])
        while opened:
            proto = opened.pop()
            with contextlib.suppress(Exception):
                proto.close()


class _SSHGitClient(_Releasing, SSHGitClient):
    """dulwich's ssh client, releasing its connections."""


class _LocalGitClient(_Releasing, SubprocessGitClient):
    """A repository on this machine, read by `git upload-pack` in a child process: the pack then streams through
    the same PackGuard as a remote's, and a huge object costs the child's memory for a moment, never the agent's
    (dulwich's in-process LocalGitClient inflates every object it sends).

    It speaks git's protocol v2: in v0, git answers a shallow fetch's "deepen" while dulwich is still sending its
    "have" lines, and dulwich then takes the flush that ends git's shallow section for an ACK (an assertion fails,
    about one fetch in four); v2 is one request, then one response.
    """

    def _connect(
        self, cmd: bytes, path: str | bytes, protocol_version: int | None = None
    ) -> tuple[Protocol, Callable[[], bool], IO[bytes] | None]:
        where = path.decode() if isinstance(path, bytes) else path
        env = {**os.environ, "GIT_PROTOCOL": "version=2"}
        argv = ["git", cmd.decode("ascii"), where]
        proc = subprocess.Popen(
            argv, bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        wrapper = SubprocessWrapper(proc)
        proto = Protocol(wrapper.read, wrapper.write, wrapper.close, report_activity=self._report_activity)
        self.__dict__.setdefault("_open", []).append(proto)
        return proto, wrapper.can_read, proc.stderr


_RETRIES = urllib3.Retry(total=None, connect=2, read=0, status=0, other=0, redirect=5, backoff_factor=0.1)


class GitSource:
    """One ref of one repository, fetched into a local bare cache and read commit by commit."""

    def __init__(
        self,
        url: str,
        ref: str = "main",
        path: str = "",
        *,
        cache_dir: Path,
        auth: GitAuth = _NO_AUTH,
        depth: int = 50,
        timeout: float = 30,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ) -> None:
        if not ref or ref.strip() != ref or ".." in ref:
            raise SourceError(f"invalid ref {ref!r}; give a branch, a tag or a 40-hex commit SHA")
        if depth < 1:
            raise SourceError(f"invalid depth {depth}; give at least 1")
        if timeout <= 0:
            raise SourceError(f"invalid timeout {timeout}; give a positive number of seconds")
        self._remote = _parse_url(url)
        if auth.token and self._remote.location.startswith("http://") and not is_loopback(self._remote.host):
            raise SourceError(
                f"git source URL {self._remote.location} is plain HTTP: the token would cross the network in clear "
                "text; use https://"
            )
        self.ref = ref
        self.path = "/".join(p for p in path.strip("/").split("/") if p not in ("", "."))
        self.cache_dir = Path(cache_dir)
        self.depth = depth
        self.timeout = float(timeout)
        self.max_object_bytes = max_object_bytes
        self._auth = auth
        self._secrets = [s for s in (auth.token, self._remote.password) if s]
        self._client: GitClient | None = None
        self._pool: urllib3.PoolManager | AuthCallbackPoolManager | None = None
        self._repo: Repo | None = None
        self._memo: tuple[bytes, dict[bytes, bytes]] | None = None
        # The refs the remote advertised at the last fetch (name -> SHA, peeled `^{}` entries included), so that
        # signature checks (agent/sources/verify.py) find the tags pointing at a commit without another round trip.
        self.advertised: dict[bytes, bytes] = {}

    # --- public ---------------------------------------------------------------------------------------------------

    @property
    def location(self) -> str:
        """The URL without user name or password, for status and logs."""
        return self._remote.location

    def __repr__(self) -> str:
        return f"GitSource({self.location!r}, ref={self.ref!r}, path={self.path!r})"

    def remote_head(self) -> str:
        """The commit the ref points to on the remote (one ls-remote; for a SHA ref, the SHA itself)."""
        if self._is_sha:
            return self.ref
        action = f"git ls-remote of {self.location}"
        client, path = self._connect(action)
        try:
            refs: Mapping[Ref, ObjectID | None] = client.get_refs(path.encode()).refs
        except Exception as exc:
            raise self._error(action, exc) from None
        finally:
            self._release()
        name, sha = self._resolve(refs, action)
        peeled = refs.get(Ref(name + _PEELED))  # an annotated tag: the commit it points to
        if peeled:
            return peeled.decode()
        return self._peel_cached(sha) or self._peel_local(sha) or sha.decode()

    def fetch(self) -> str:
        """Fetch the ref into the cache (shallow, incremental, following force-pushes); return its commit SHA."""
        action = f"git fetch of {self.location}"
        repo = self._cache(action)
        if self._is_sha:
            sha = ObjectID(self.ref.encode())
            if not _complete(repo, sha):  # a commit never changes: once held, no network at all
                self._fetch_sha(repo, sha, action)
            name = b"pinned/" + sha
        else:
            client, path = self._connect(action)
            chosen: dict[str, tuple[bytes, ObjectID]] = {}

            def determine_wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
                self.advertised = {bytes(k): bytes(v) for k, v in refs.items() if v}
                name, sha = self._resolve(refs, action)
                chosen["tip"] = (name, sha)
                return [] if _complete(repo, sha) else [sha]

            self._fetch(client, path, repo, determine_wants, action)
            if "tip" not in chosen:  # an empty repository: no refs to choose from
                self._resolve({}, action)
            name, sha = chosen["tip"]
            if not _complete(repo, sha):
                # A want that is an ancestor of a "have" beyond the cache's shallow boundary (the ref moved back,
                # a tag on older history) can come back empty (dulwich's server does that): ask again, offering
                # no haves.
                self._fetch(client, path, _without_haves(repo), lambda refs, depth=None: [sha], action)
            name = name.removeprefix(b"refs/")
        commit = self._peel_in(repo, sha, action)
        # A force-push is followed: the cache's ref is set to the remote's, fast-forward or not. It is kept under
        # refs/heads/ so that the next fetch offers it as a "have" (dulwich's graph walker offers heads).
        repo.refs[Ref(b"refs/heads/" + name)] = commit
        return commit.decode()

    def load(self, commit: str) -> DesiredState:
        """Every bundle file directly in `path` of the commit's tree, one stack each, strictly parsed."""
        repo = self._cache(f"reading {self.location}")
        head = self._commit(repo, commit)
        where = f"{self.path!r} in {self.ref}@{commit[:12]} of {self.location}"
        try:
            mode, tree_id = tree_lookup_path(repo.__getitem__, head.tree, self.path.encode())
        except KeyError:
            # git keeps no empty directories: deleting the last bundle deletes `path` too. A path the ref's history
            # held is an emptied source (the engine still refuses to prune everything without --allow-empty); one it
            # never held is a mistake in --path.
            if self._held_before(repo, head):
                return DesiredState(stacks={})
            raise SourceError(f"path {where} does not exist; check --path") from None
        except Exception as exc:  # a file where a directory was expected on the way
            raise SourceError(f"path {where} cannot be read ({exc}); check --path") from None
        if not stat.S_ISDIR(mode):
            raise SourceError(f"path {where} is a file, not a directory; check --path")
        tree = repo[tree_id]
        assert isinstance(tree, Tree)

        prefix = f"{self.ref}:{self.path}/" if self.path else f"{self.ref}:"
        files: dict[bytes, ObjectID] = {}
        errors: list[BundleError] = []
        origin: dict[str, str] = {}
        for entry in tree.items():
            name = entry.path.decode("utf-8", "replace")
            suffix = PurePosixPath(name).suffix.lower()
            if suffix not in BUNDLE_SUFFIXES or stat.S_ISDIR(entry.mode) or entry.mode == 0o160000:
                continue  # directories, submodules and other files are not stacks
            shown = prefix + name
            if entry.mode not in _REGULAR_FILES:
                errors.append(
                    BundleError(
                        shown,
                        "is a symbolic link",
                        fix="commit the bundle itself: a git source reads regular files only",
                    )
                )
                continue
            stem = PurePosixPath(name).stem
            if stem in origin:
                errors.append(
                    BundleError(
                        shown, f"stack {stem!r} is also defined by {origin[stem]}", fix="keep one file per stack"
                    )
                )
                continue
            origin[stem] = shown
            files[entry.path] = entry.sha

        revisions = self._revisions(repo, head, files)
        stacks: dict[str, StackBundle] = {}
        for raw_name, blob_id in files.items():
            try:
                stack = self._stack(repo, raw_name, blob_id, prefix, revisions[raw_name])
            except InvalidBundles as exc:
                errors.extend(exc.errors)
                continue
            stacks[stack.name] = stack
        if errors:
            raise InvalidBundles(errors)
        return DesiredState(stacks=dict(sorted(stacks.items())))

    def repository(self) -> Repo:
        """The cache (a bare repository), for readers of its objects such as the signature checks."""
        return self._cache(f"reading {self.location}")

    def deepen(self, depth: int) -> None:
        """Fetch the ref's history again, `depth` commits deep (a shallow cache's boundary moves back)."""
        action = f"git fetch of {self.location} (deepening to {depth} commits)"
        repo = self._cache(action)
        client, path = self._connect(action)

        def wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
            return [ObjectID(self.ref.encode())] if self._is_sha else [self._resolve(refs, action)[1]]

        shallow, self.depth = self.depth, max(depth, self.depth)
        try:  # without "have"s: a server sends nothing for a want the client already holds
            self._fetch(client, path, _without_haves(repo), wants, action)
        finally:
            self.depth = shallow

    def fetch_objects(self, shas: list[str]) -> None:
        """Fetch objects the remote advertises (annotated tags) into the cache."""
        if not shas:
            return
        action = f"git fetch of tags from {self.location}"
        repo = self._cache(action)
        client, path = self._connect(action)
        wanted = [ObjectID(s.encode()) for s in shas]
        self._fetch(client, path, repo, lambda refs, depth=None: wanted, action)

    def close(self) -> None:
        """Release the cache repository and any connections."""
        if self._repo is not None:
            self._repo.close()
            self._repo = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._pool is not None:
            self._pool.clear()  # dulwich's HTTP client leaves its connections to the pool manager
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- connecting ---------------------------------------------------------------------------------------------

    @property
    def _is_sha(self) -> bool:
        return _SHA1.fullmatch(self.ref) is not None

    def _connect(self, action: str) -> tuple[GitClient, str]:
        remote = self._remote
        if remote.kind == "ssh":
            self._check_ssh_files(action)
        if remote.kind == "local":
            self._check_local(action)
        if self._client is None:
            if remote.kind == "local":
                self._client = _LocalGitClient()
            elif remote.kind == "http":
                username = self._auth.username or remote.user
                password = self._auth.token or remote.password
                if password is not None and username is None:
                    username = _TOKEN_USER
                manager = self._pool = default_urllib3_manager(
                    None,
                    pool_manager_cls=_PoolManager,
                    proxy_manager_cls=_ProxyManager,
                    base_url=remote.target,
                    timeout=self.timeout,
                )
                self._client = Urllib3HttpGitClient(
                    remote.target,
                    pool_manager=manager,
                    username=username,
                    password=password,
                    timeout=self.timeout,
                )
            else:
                self._client = _SSHGitClient(
                    remote.host,
                    port=remote.port,
                    username=self._auth.username or remote.user,
                    vendor=SubprocessSSHVendor(),
                    ssh_command=shlex.join(ssh_command(self._auth, self.timeout)),
                )
        target = "" if remote.kind == "http" else remote.target
        return self._client, target

    def _check_local(self, action: str) -> None:
        """A local path is a repository (git upload-pack would only say so on its stderr)."""
        try:
            Repo(self._remote.target).close()
        except (NotGitRepository, OSError) as exc:
            raise self._error(action, exc) from None

    def _check_ssh_files(self, action: str) -> None:
        known = self._auth.known_hosts_file
        if known and not os.path.isfile(known):
            raise SourceError(
                f"{action} failed: known_hosts file {known} does not exist; "
                f"add the server's verified host key to it (ssh-keyscan, then check the fingerprint)"
            )
        key = self._auth.ssh_key_file
        if key and not os.path.isfile(key):
            raise SourceError(f"{action} failed: ssh key file {key} does not exist; check the key path")

    def _cache(self, action: str) -> Repo:
        if self._repo is not None:
            return self._repo
        directory = self.cache_dir
        try:
            if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
                directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # bundles' Env values are secrets
                directory.mkdir(exist_ok=True, mode=0o700)
                self._repo = Repo.init_bare(str(directory))
            else:
                repo = Repo(str(directory))
                if not repo.bare:
                    repo.close()
                    raise NotGitRepository(directory)
                self._repo = repo
        except NotGitRepository:
            raise SourceError(
                f"{action} failed: cache directory {directory} is not a bare git repository; remove it (it is rebuilt)"
            ) from None
        except OSError as exc:
            raise SourceError(
                f"{action} failed: cache directory {directory}: {exc.strerror}; check its permissions"
            ) from None
        return self._repo

    # --- fetching -----------------------------------------------------------------------------------------------

    def _fetch(self, client: GitClient, path: str, repo: Repo, determine_wants: Any, action: str) -> None:
        try:
            self._fetch_raw(client, path, repo, determine_wants)
        except PackRefused as exc:
            raise PackRefused(f"{action} failed: {exc}") from None
        except SourceError:
            raise
        except Exception as exc:
            raise self._error(action, exc) from None

    def _fetch_raw(self, client: GitClient, path: str, repo: Repo, determine_wants: Any) -> None:
        try:
            self._fetch_pack(client, path, repo, determine_wants, self.depth)
        except GitProtocolError as exc:
            if "shallow" not in str(exc) or "capab" not in str(exc):
                raise
            self._fetch_pack(client, path, repo, determine_wants, None)  # the server cannot do depth
        finally:
            self._release()

    def _fetch_pack(self, client: GitClient, path: str, repo: Repo, determine_wants: Any, depth: int | None) -> None:
        """dulwich's GitClient.fetch, with the pack passing through a PackGuard on its way to a file on disk: an
        object over the limit ends the fetch before it is inflated, and nothing of the pack is stored."""
        with tempfile.TemporaryFile(prefix="incoming-", dir=repo.object_store.path) as spool:
            guard = PackGuard(spool.write, self.max_object_bytes)
            result = client.fetch_pack(
                path.encode(), determine_wants, repo.get_graph_walker(), guard.write, depth=depth
            )
            guard.finish()
            if spool.tell():
                spool.seek(0)
                repo.object_store.add_thin_pack(spool.read, None)
        repo.update_shallow(result.new_shallow, result.new_unshallow)

    def _release(self) -> None:
        """Close what dulwich leaves open after an operation (an ssh process, HTTP responses)."""
        if isinstance(self._client, _Releasing):
            self._client.release()
        if isinstance(self._pool, _PoolManager | _ProxyManager):
            self._pool.responses.release()

    def _fetch_sha(self, repo: Repo, sha: ObjectID, action: str) -> None:
        """Fetch one commit by SHA: asked for directly, else found among the branches and tags (servers may refuse
        an unadvertised SHA)."""
        client, path = self._connect(action)
        attempts: list[tuple[Repo, Any]] = [
            (repo, lambda refs, depth=None: [sha]),
            (_without_haves(repo), lambda refs, depth=None: [sha]),
            (repo, _branches_and_tags),
            (_without_haves(repo), _branches_and_tags),
        ]
        for target, wants in attempts:
            try:
                self._fetch_raw(client, path, target, wants)
            except PackRefused as exc:
                raise PackRefused(f"{action} failed: {exc}") from None
            except Exception as exc:
                fatal = isinstance(exc, HTTPUnauthorized | HangupException | NotGitRepository) or _network_reason(exc)
                if fatal and self._remote.kind != "local":  # git upload-pack hangs up on an unadvertised SHA
                    raise self._error(action, exc) from None
                continue
            if _complete(repo, sha):
                return
        raise SourceError(
            f"{action} failed: commit {self.ref} not found within {self.depth} commits of any branch or tag; "
            "check --ref"
        )

    def _resolve(self, refs: Mapping[Ref, ObjectID | None], action: str) -> tuple[bytes, ObjectID]:
        """The remote ref the configured name means (branch first, then tag, or a full `refs/...` name)."""
        ref = self.ref.encode()
        candidates = (
            [ref] if ref.startswith(b"refs/") or ref == b"HEAD" else [b"refs/heads/" + ref, b"refs/tags/" + ref]
        )
        for name in candidates:
            sha = refs.get(Ref(name))
            if sha:
                return name, sha
        raise SourceError(f"{action} failed: ref {self.ref!r} not found{_available(refs)}; check --ref")

    def _peel_in(self, repo: Repo, sha: ObjectID, action: str) -> ObjectID:
        try:
            _, obj = repo.object_store.peel(sha)
        except KeyError:
            raise SourceError(
                f"{action} failed: the server did not send {sha.decode()}; retry, or remove the cache {self.cache_dir}"
            ) from None
        if not isinstance(obj, Commit):
            raise SourceError(
                f"{action} failed: ref {self.ref!r} is not a commit ({obj.type_name.decode()}); check --ref"
            )
        return obj.id

    def _peel_cached(self, sha: ObjectID) -> str | None:
        """The commit an (annotated) tag object points to, when the cache already holds it."""
        if self._repo is None and not self.cache_dir.exists():
            return None  # polling never creates the cache
        try:
            repo = self._cache("reading the cache")
            _, obj = repo.object_store.peel(sha)
        except (KeyError, SourceError):
            return None
        return obj.id.decode() if isinstance(obj, Commit) else None

    def _peel_local(self, sha: ObjectID) -> str | None:
        """The commit a tag object points to in a repository on this machine (its refs carry no peeled entries)."""
        if self._remote.kind != "local":
            return None
        try:
            with Repo(self._remote.target) as remote:
                _, obj = remote.object_store.peel(sha)
        except Exception:
            return None
        return obj.id.decode() if isinstance(obj, Commit) else None

    # --- reading ------------------------------------------------------------------------------------------------

    def _commit(self, repo: Repo, commit: str) -> Commit:
        if not _SHA1.fullmatch(commit):
            raise SourceError(f"reading {self.location}: {commit!r} is not a commit SHA; pass what fetch() returned")
        try:
            _, obj = repo.object_store.peel(ObjectID(commit.encode()))
        except KeyError:
            raise SourceError(
                f"reading {self.location}: commit {commit} is not in the cache {self.cache_dir}; fetch it first"
            ) from None
        if not isinstance(obj, Commit):
            raise SourceError(f"reading {self.location}: {commit} is not a commit")
        return obj

    def _dir_tree(self, repo: Repo, commit: Commit) -> ObjectID | None:
        """The id of `path`'s tree in a commit; None when it is absent (or the objects are not held locally)."""
        try:
            mode, sha = tree_lookup_path(repo.__getitem__, commit.tree, self.path.encode())
        except Exception:
            return None
        return sha if stat.S_ISDIR(mode) else None

    def _held_before(self, repo: Repo, head: Commit) -> bool:
        """Whether `path` is a directory in a commit before `head` on its first-parent chain (history held locally)."""
        commit = self._parent(repo, head)
        while commit is not None:
            if self._dir_tree(repo, commit) is not None:
                return True
            commit = self._parent(repo, commit)
        return False

    def _revisions(self, repo: Repo, head: Commit, files: Mapping[bytes, ObjectID]) -> dict[bytes, bytes]:
        """For each file, the newest commit on the first-parent chain from `head` whose blob of it differs from its
        parent's (or whose parent lacks it), walking only the history held locally: where a parent is missing (a
        shallow boundary) the walk stops at the oldest commit held."""
        found: dict[bytes, bytes] = {}
        pending = dict(files)
        current = head
        current_dir = self._dir_tree(repo, head)
        while pending:
            if self._memo is not None and self._memo[0] == current.id:
                remembered = self._memo[1]
                for name in list(pending):
                    if name in remembered:
                        found[name] = remembered[name]
                        del pending[name]
                if not pending:
                    break
            parent = self._parent(repo, current)
            parent_dir = self._dir_tree(repo, parent) if parent is not None else None
            if parent is None or parent_dir is None:
                for name in pending:
                    found[name] = current.id
                break
            if parent_dir != current_dir:
                parent_tree = repo[parent_dir]
                assert isinstance(parent_tree, Tree)
                before = {e.path: e.sha for e in parent_tree.items()}
                for name, blob in list(pending.items()):
                    if before.get(name) != blob:
                        found[name] = current.id
                        del pending[name]
            current, current_dir = parent, parent_dir
        self._memo = (head.id, dict(found))
        return found

    @staticmethod
    def _parent(repo: Repo, commit: Commit) -> Commit | None:
        if not commit.parents:
            return None
        try:
            parent = repo[commit.parents[0]]
        except KeyError:
            return None  # beyond the shallow boundary
        return parent if isinstance(parent, Commit) else None

    def _stack(self, repo: Repo, raw_name: bytes, blob_id: ObjectID, prefix: str, revision: bytes) -> StackBundle:
        name = raw_name.decode("utf-8", "replace")
        blob = repo[blob_id]
        assert isinstance(blob, Blob)
        path = PurePosixPath(name)
        return stack_bundle(
            path.stem, prefix + name, blob.as_raw_string(), path.suffix.lower(), f"{self.ref}@sha1:{revision.decode()}"
        )

    # --- errors -------------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())

    def _error(self, action: str, exc: BaseException) -> SourceError:
        return SourceError(self._scrub(f"{action} failed: {self._explain(exc)}"))

    def _explain(self, exc: BaseException) -> str:
        if isinstance(exc, HTTPUnauthorized):
            return "authentication failed (HTTP 401); check the token (and user name)"
        if isinstance(exc, HangupException):
            return _explain_ssh(str(exc), self._auth)
        if isinstance(exc, NotGitRepository):
            if self._remote.kind == "http":
                return "no repository there (HTTP 404); check the URL"
            return "not a git repository; check the URL or path"
        if isinstance(exc, GitProtocolError):
            text = str(exc)
            status = re.search(r"unexpected http resp (\d+)", text)
            if status and status.group(1) == "403":
                return "access denied (HTTP 403): authentication failed or not allowed; check the token's access"
            if status:
                return f"the server answered HTTP {status.group(1)}; check the URL and the server"
            reason = _network_reason(exc)
            if reason:
                return f"cannot reach {self._remote.host}{_port(self._remote.port)}: {reason}"
            return f"git protocol error: {text}"
        if isinstance(exc, FileNotFoundError) and self._remote.kind == "ssh":
            return "the ssh command was not found; install an OpenSSH client"
        if isinstance(exc, OSError):
            return f"{exc.strerror or exc}; check the path and permissions"
        return f"{type(exc).__name__}: {exc}"


def _complete(repo: Repo, sha: ObjectID) -> bool:
    """Whether the cache holds the commit `sha` names (through tags) and its tree."""
    try:
        _, obj = repo.object_store.peel(sha)
    except KeyError:
        return False
    return isinstance(obj, Commit) and obj.tree in repo.object_store


class _WithoutHaves:
    """The cache as a fetch target that offers the server no "have" commits (everything else passes through)."""

    def __init__(self, repo: Repo) -> None:
        self._repo = repo

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    def get_graph_walker(self, heads: list[ObjectID] | None = None) -> Any:
        return self._repo.get_graph_walker(heads=[])


def _without_haves(repo: Repo) -> Repo:
    return cast(Repo, _WithoutHaves(repo))


def _branches_and_tags(refs: Mapping[Ref, ObjectID | None], depth: int | None = None) -> list[ObjectID]:
    return [
        sha
        for name, sha in refs.items()
        if sha and name.startswith((b"refs/heads/", b"refs/tags/")) and not name.endswith(_PEELED)
    ]


def _port(port: int | None) -> str:
    return f":{port}" if port else ""


def _network_reason(exc: BaseException) -> str | None:
    """A short reason for a urllib3 failure wrapped in GitProtocolError (refused, timed out, name unknown)."""
    cause: BaseException | None = exc.__cause__
    reason: Any = getattr(cause, "reason", cause)
    if reason is None:
        return None
    text = str(reason)
    if "refused" in text.lower():  # before timeouts: urllib3's NewConnectionError is a ConnectTimeoutError
        return "connection refused; check that the server is up and the URL's host and port"
    if isinstance(reason, urllib3.exceptions.TimeoutError) or "timed out" in text.lower():
        return "no answer in time (timed out); check that the server is up and reachable"
    if "Name or service not known" in text or "getaddrinfo" in text or "resolution" in text.lower():
        return "host name not found; check the URL"
    if isinstance(reason, urllib3.exceptions.SSLError):
        return "TLS failed (certificate not trusted or wrong host); check the server's certificate"
    if isinstance(reason, urllib3.exceptions.HTTPError | OSError):
        return text.split(": ", 1)[-1]
    return None


def _explain_ssh(stderr: str, auth: GitAuth) -> str:
    lowered = stderr.lower()
    if "host key verification failed" in lowered or "host key for" in lowered:
        where = auth.known_hosts_file or "ssh's known_hosts files"
        return (
            f"the server's host key is not in {where} (or has changed); add its verified key "
            "(ssh-keyscan, then check the fingerprint)"
        )
    if "permission denied" in lowered:
        return "ssh authentication failed (permission denied); check the key and that it may read the repository"
    if "could not resolve" in lowered:
        return "host name not found; check the URL"
    if "timed out" in lowered:
        return "no answer in time (timed out); check that the server is up and reachable"
    if "connection refused" in lowered:
        return "connection refused; check that the server is up and the URL's host and port"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"the connection closed: {lines[-1]}" if lines else "the connection closed unexpectedly"


def _available(refs: Mapping[Ref, ObjectID | None]) -> str:
    branches = sorted(k[len(b"refs/heads/") :].decode() for k in refs if k.startswith(b"refs/heads/"))
    tags = sorted(
        k[len(b"refs/tags/") :].decode() for k in refs if k.startswith(b"refs/tags/") and not k.endswith(_PEELED)
    )
    parts = []
    if branches:
        parts.append("branches: " + ", ".join(branches[:5]) + (", ..." if len(branches) > 5 else ""))
    if tags:
        parts.append("tags: " + ", ".join(tags[:5]) + (", ..." if len(tags) > 5 else ""))
    return f" (the remote has {'; '.join(parts)})" if parts else " (the remote has no branches)"
