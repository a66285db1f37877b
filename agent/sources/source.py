"""Where bundles come from: a directory, or a git repository read through agent.sources.git.

Each source has a cheap `fingerprint()` (directory: names, sizes and mtimes; git: one ls-remote) so that an
unchanged source costs no loading, and `load()` for the full desired state.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import policy_of
from agent.private import check_secret_file, read_secret_file
from bundles import DesiredState, load_directory
from bundles.load import BUNDLE_SUFFIXES
from bundles.policy import Policy, enforce
from schemas.config import AgentConfig
from schemas.control import SourceRef
from schemas.errors import DabctlError
from schemas.output import SourceKind

if TYPE_CHECKING:
    from agent.sources.verify import Verifier

GIT_SCHEMES = ("http://", "https://", "ssh://", "file://", "git@")


class SourceConfigError(DabctlError):
    """The source settings cannot be used (no source, an unreadable secret file)."""


class Source(Protocol):
    kind: SourceKind
    location: str
    ref: str | None
    path: str | None

    def fingerprint(self) -> str: ...

    def load(self) -> DesiredState: ...

    def close(self) -> None: ...


class DirectorySource:
    """Bundle files directly in one directory."""

    kind: SourceKind = "directory"
    ref: str | None = None
    path: str | None = None

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.location = str(directory)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError as exc:
            return f"error:{exc.strerror}"
        for e in entries:
            if e.is_file() and e.name.lower().endswith(BUNDLE_SUFFIXES):
                st = e.stat()
                h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def load(self) -> DesiredState:
        return load_directory(self.directory)

    def close(self) -> None:
        pass


class GitRepoSource:
    """A ref and subdirectory of a git repository, fetched into a cache under the state directory."""

    kind: SourceKind = "git"

    def __init__(self, cfg: AgentConfig) -> None:
        from agent.sources.git import GitAuth, GitSource
        from agent.sources.verify import Verifier

        assert cfg.source is not None
        token = read_secret(cfg.git_token_file, cfg.git_token_env, setting="git_token_file")
        if cfg.git_ssh_key_file:
            check_secret_file(cfg.git_ssh_key_file, "git_ssh_key_file")
        auth = GitAuth(
            token=token,
            username=cfg.git_username,
            ssh_key_file=cfg.git_ssh_key_file,
            known_hosts_file=cfg.git_known_hosts_file,
        )
        cache = cfg.state_path / "git" / hashlib.sha256(cfg.source.encode()).hexdigest()[:16]
        self.ref: str | None = cfg.ref or "main"
        self.path: str | None = cfg.path or ""
        self.git = GitSource(
            cfg.source,
            ref=self.ref,
            path=self.path,
            cache_dir=cache,
            auth=auth,
            max_object_bytes=cfg.git_max_object_bytes,
        )
        self.location = self.git.location
        # Signature checks (agent/sources/verify.py); the accepted head is recorded beside the cache, per ref.
        self.verifier = Verifier(cfg.verify, self.ref, cache.with_name(cache.name + ".verified.json"))

    def fingerprint(self) -> str:
        head: str = self.git.remote_head()
        return head

    def load(self) -> DesiredState:
        head = self.git.fetch()
        self.verifier.check(self.git, head)  # VerificationRefused: nothing of this revision is loaded
        state: DesiredState = self.git.load(head)
        self.verifier.accept(head)
        return state

    @property
    def verification(self) -> Verifier:
        return self.verifier

    def close(self) -> None:
        self.verifier.close()
        self.git.close()


def read_secret(file: str | None, env: str | None, setting: str = "secret file") -> str | None:
    """A credential from a file (trailing newline dropped; refused when others may read it, as ssh does) or an
    environment variable; never logged."""
    if file:
        return read_secret_file(file, setting)
    if env:
        return os.environ.get(env)
    return None


class Checked:
    """A source whose every load is held to the agent config's policy (bundles.policy)."""

    def __init__(self, inner: Source, policy: Policy) -> None:
        self.inner = inner
        self.policy = policy
        self.kind = inner.kind
        self.location = inner.location
        self.ref = inner.ref
        self.path = inner.path

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def load(self) -> DesiredState:
        return enforce(self.inner.load(), self.policy)

    def close(self) -> None:
        self.inner.close()

    @property
    def directory(self) -> Path | None:
        return getattr(self.inner, "directory", None)

    @property
    def verification(self) -> Verifier | None:
        """The signature checks of a git source (None for a directory)."""
        return getattr(self.inner, "verification", None)


def watch_directory(directory: Path, on_change: Callable[[], None]) -> Any:
    """Call `on_change` from a watchdog thread whenever a file directly in `directory` changes; stop() ends it."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            on_change()

    observer = Observer()
    observer.schedule(Handler(), str(directory), recursive=False)
    observer.daemon = True
    observer.start()
    return observer


def is_git(cfg: AgentConfig) -> bool:
    """A git source: a URL, or a local path together with --ref or --path."""
    source = cfg.source or ""
    return source.startswith(GIT_SCHEMES) or cfg.ref is not None or cfg.path is not None


def source_ref(cfg: AgentConfig) -> SourceRef | None:
    """The configured source in one comparable form (absolute local paths, the default ref); None when unset."""
    if not cfg.source:
        return None
    location = cfg.source
    if not location.startswith(GIT_SCHEMES):
        location = os.path.realpath(location)
    if not is_git(cfg):
        return SourceRef(location=location)
    return SourceRef(location=location, ref=cfg.ref or "main", path=(cfg.path or "").strip("/") or None)


def open_source(cfg: AgentConfig) -> Source:
    if not cfg.source:
        raise SourceConfigError("no source: pass --source DIR or a git URL (or set source in the config file)")
    policy = policy_of(cfg)
    if cfg.verify.mode != "none" and not is_git(cfg):
        raise SourceConfigError(
            f"verify.mode {cfg.verify.mode}: signatures are checked on git sources only; {cfg.source} is a "
            "directory (give a git URL, or --ref/--path for a local repository, or set verify.mode none)"
        )
    inner: Source = GitRepoSource(cfg) if is_git(cfg) else DirectorySource(Path(cfg.source))
    return Checked(inner, policy)
