"""Real git repositories for source tests: commits made with dulwich, served over HTTP on loopback.

    sha = commit(repo_dir, {"stacks/web.dab": "...", "old.dab": None}, "message")   # write / delete, commit
    with GitServer(repo_dir, token="s3cret") as server:                             # basic auth required
        server.url                  # http://127.0.0.1:PORT/repo
        server.stop(); server.start()   # same port: clients see it go away and come back
    force_push_reset(repo_dir, older_sha)                                            # history rewritten

The server is dulwich's own smart-HTTP WSGI application (`dulwich.web.make_wsgi_chain`) on wsgiref's
`make_server` in a thread. With `token`, every request must carry basic auth with that password (any user name, or
`username` when given); others get 401 — the way forges answer a clone without credentials — or `reject_status`.
"""

from __future__ import annotations

import base64
import binascii
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from dulwich import porcelain
from dulwich.refs import Ref
from dulwich.repo import Repo
from dulwich.server import BackendRepo, DictBackend
from dulwich.web import make_server, make_wsgi_chain

__all__ = ["AUTHOR", "GitServer", "commit", "force_push_reset", "init_repo", "silent_listener", "tag"]

AUTHOR = b"dabctl tests <tests@dabctl.invalid>"
BRANCH = b"main"
_clock = {"t": 1_700_000_000}

_StartResponse = Callable[..., Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


def init_repo(repo_dir: Path) -> Path:
    """A new non-bare repository whose HEAD is `main` (dulwich's default is master); returns `repo_dir`."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    repo = porcelain.init(str(repo_dir))
    try:
        repo.refs.set_symbolic_ref(Ref(b"HEAD"), Ref(b"refs/heads/" + BRANCH))
    finally:
        repo.close()
    return repo_dir


def commit(repo_dir: Path, files: Mapping[str, str | None], message: str) -> str:
    """Write (str) or delete (None) files in the work tree, stage exactly those and commit; return the commit SHA.

    The repository is created (on `main`) when `repo_dir` is not one yet. Author, committer and a steadily
    increasing timestamp are fixed, so runs are reproducible.
    """
    if not (repo_dir / ".git").exists():
        init_repo(repo_dir)
    added: list[str] = []
    removed: list[str] = []
    for name, content in files.items():
        path = repo_dir / name
        if content is None:
            removed.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            added.append(str(path))
    if removed:
        porcelain.remove(str(repo_dir), paths=removed)
    if added:
        porcelain.add(str(repo_dir), paths=added)
    _clock["t"] += 60
    sha = porcelain.commit(
        str(repo_dir),
        message=message,
        author=AUTHOR,
        committer=AUTHOR,
        author_timestamp=_clock["t"],
        commit_timestamp=_clock["t"],
        author_timezone=0,
        commit_timezone=0,
        env={},
    )
    return sha.decode()


def force_push_reset(repo_dir: Path, sha: str) -> None:
    """Move the current branch (and the work tree) back to `sha`: later commits are no longer on it."""
    porcelain.reset(str(repo_dir), "hard", sha)


def tag(repo_dir: Path, name: str, sha: str | None = None, annotated: bool = False) -> None:
    """Create a lightweight (or annotated) tag at `sha` (default HEAD)."""
    porcelain.tag_create(
        str(repo_dir),
        name,
        objectish=sha or "HEAD",
        author=AUTHOR,
        message=f"tag {name}".encode() if annotated else None,
        annotated=annotated,
        tag_time=_clock["t"],
        tag_timezone=0,
    )


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(WSGIServer):
    allow_reuse_address = True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_basic_auth(app: _App, password: str, username: str | None, status: int) -> _App:
    """Answer `status` (401 with a Basic challenge, or 403) unless the request carries the right credentials."""

    def wrapped(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        ok = False
        if header.startswith("Basic "):
            try:
                user, _, given = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, given = "", ""
            ok = given == password and (username is None or user == username)
        if not ok:
            body = b"authentication required\n"
            headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            if status == 401:
                start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"'), *headers])
            else:
                start_response(f"{status} Forbidden", headers)
            return [body]
        return app(environ, start_response)

    return wrapped


class GitServer:
    """Serve one repository over smart HTTP at `http://127.0.0.1:PORT/repo` (port fixed across restarts)."""

    def __init__(
        self, repo_dir: Path, token: str | None = None, username: str | None = None, reject_status: int = 401
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.token = token
        self.username = username
        self.reject_status = reject_status
        self.port = _free_port()
        self.requests = 0
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._repo: Repo | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/repo"

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._repo = Repo(str(self.repo_dir))
        app: _App = make_wsgi_chain(DictBackend({"/repo": cast(BackendRepo, self._repo)}))
        if self.token is not None:
            app = _require_basic_auth(app, self.token, self.username, self.reject_status)
        counted = app

        def counting(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
            self.requests += 1
            return counted(environ, start_response)

        self._server = make_server("127.0.0.1", self.port, counting, server_class=_Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="gitserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until start() again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def silent_listener() -> tuple[socket.socket, str]:
    """A loopback socket that accepts connections (in the kernel backlog) but never answers: a hung server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}/repo"
