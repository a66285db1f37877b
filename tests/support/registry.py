"""A real Docker registry (Debian's /usr/bin/docker-registry 2.8) on a free loopback port, for pull tests.

    with Registry() as reg:                              # started, GET /v2/ answers
        v1 = build_variant(api, "dabctl-test/app:v1", "v1")   # a local image whose ID differs from the sample's
        digest = reg.push(api, "dabctl-test/app:v1", f"{reg.host}/app:latest")   # "sha256:..."
        reg.stop(); reg.start()                          # same port and storage: pushed images survive
        reg.remove_images(api)                           # every local image with a reference into this registry

    with Registry(auth=("user", "secret")) as reg:       # basic auth (htpasswd, bcrypt)
        reg.push(api, src, f"{reg.host}/app:1", auth=reg.credentials)
        config_dir = reg.docker_config()                 # a DOCKER_CONFIG-style dir holding config.json

Docker treats registries on 127.0.0.0/8 as insecure-allowed, so the engine pulls over plain http without any daemon
configuration. The registry's storage, config, htpasswd file and log live in a directory that `close()` (and leaving
the `with` block) removes; its log is `<dir>/registry.log` and a start that fails raises with the log's tail.

`push` behaves like a push from *another* machine: the engine's references into the registry (tags and repository
digests) are the same afterwards as before, so the code under test has to pull to see what was pushed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import docker
import docker.errors

from tests.support.etcd import free_port

__all__ = ["REGISTRY", "Registry", "build_variant", "image_refs", "split_ref"]

REGISTRY = "/usr/bin/docker-registry"
HTPASSWD = "/usr/bin/htpasswd"


def split_ref(ref: str) -> tuple[str, str]:
    """("host:port/repo", "tag") of a tagged reference; the tag defaults to "latest"."""
    name, sep, tag = ref.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return ref, "latest"


def image_refs(api: docker.APIClient, prefix: str) -> dict[str, str]:
    """Every local reference (tag or repository digest) starting with `prefix`, mapped to its image ID."""
    out: dict[str, str] = {}
    for img in api.images(all=False):
        for ref in (img.get("RepoTags") or []) + (img.get("RepoDigests") or []):
            if ref.startswith(prefix) and not ref.endswith("<none>"):
                out[ref] = img["Id"]
    return out


def build_variant(api: docker.APIClient, tag: str, marker: str, base: str = "dabctl/sample:1") -> str:
    """Make a local image `tag` that differs from `base` (a file /marker and a label v=<marker>); its image ID.

    Built by committing a created (never started) container, so it takes well under a second.
    """
    import io
    import tarfile

    container = api.create_container(base, command=["true"], labels={"dabctl.test": "registry-variant"})["Id"]
    try:
        data = f"{marker}\n{secrets.token_hex(8)}\n".encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("marker")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        api.put_archive(container, "/", buf.getvalue())
        repository, image_tag = split_ref(tag)
        result = api.commit(container, repository=repository, tag=image_tag, changes=[f"LABEL v={marker}"])
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(container, force=True)
    return str(api.inspect_image(result["Id"])["Id"])  # type: ignore[no-untyped-call]


class Registry:
    """One `docker-registry serve` process with filesystem storage in its own temporary directory."""

    def __init__(
        self,
        auth: tuple[str, str] | None = None,
        directory: Path | None = None,
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
    ) -> None:
        """`address`/`port` (default: a free loopback port) is where it listens; with `netns` it runs in that
        network namespace (which must hold `address`), e.g. on a cluster's bridge (tests/support/cluster.py)."""
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="dabctl-registry-")) if directory is None else Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.storage.mkdir(exist_ok=True)
        self.port = free_port() if port is None else port
        self.host = f"{address}:{self.port}"
        self.netns = netns
        self.url = f"http://{self.host}"
        self.auth = auth
        self.log_path = self.dir / "registry.log"
        self.config_path = self.dir / "config.yml"
        self.proc: subprocess.Popen[bytes] | None = None
        self._pushed: set[str] = set()
        self._write_config()

    # --- configuration -----------------------------------------------------------------------------------------

    @property
    def credentials(self) -> dict[str, str] | None:
        """docker-py `auth_config` for this registry (None without auth)."""
        if self.auth is None:
            return None
        return {"username": self.auth[0], "password": self.auth[1], "serveraddress": self.host}

    def _write_config(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(self.storage))}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.auth is not None:
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text(_htpasswd_line(*self.auth) + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: dabctl-test", f"    path: {json.dumps(str(htpasswd))}"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def docker_config(self, directory: Path | None = None, password: str | None = None) -> Path:
        """Write a Docker client config (`config.json` with `auths` for this registry, as `docker login` would) into
        `directory` (default: a new directory inside this registry's own, removed with it); return the directory.

        `password` overrides the registry's password (to write wrong credentials)."""
        if self.auth is None:
            raise ValueError("this registry has no auth; it needs no credentials")
        target = (
            Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="docker-config-", dir=self.dir))
        )
        target.mkdir(parents=True, exist_ok=True)
        user, secret = self.auth[0], self.auth[1] if password is None else password
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        (target / "config.json").write_text(json.dumps({"auths": {self.host: {"auth": token}}}, indent=2))
        return target

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> Self:
        """Start the registry (same port and storage as before a stop) and wait until GET /v2/ answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        log: IO[bytes] = self.log_path.open("ab")
        try:
            wrapper = ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []
            self.proc = subprocess.Popen(
                [*wrapper, REGISTRY, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not answer within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=2) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code == 401
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (SIGKILL after `timeout`) and wait until the port is closed. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 5
        while self._answers() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop, and remove the directory if this registry made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- images ------------------------------------------------------------------------------------------------

    def push(
        self,
        api: docker.APIClient,
        source_image: str,
        repo_tag: str,
        auth: dict[str, str] | None = None,
        keep_local: bool = False,
    ) -> str:
        """Tag `source_image` as `repo_tag` (which must start with this registry's host) and push it; return the
        repository digest ("sha256:...") the push reported.

        Unless `keep_local`, the engine's references into this registry are restored afterwards (the tag is put
        back where it pointed, or removed; new repository digests are removed), like a push from another host."""
        if not repo_tag.startswith(self.host + "/"):
            raise ValueError(f"{repo_tag!r} is not in registry {self.host}")
        repository, tag = split_ref(repo_tag)
        before = image_refs(api, self.host + "/")
        self._pushed.add(api.inspect_image(source_image)["Id"])  # type: ignore[no-untyped-call]
        api.tag(source_image, repository, tag)
        digest = ""
        errors: list[str] = []
        for event in api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth):
            if "error" in event:
                errors.append(str(event["error"]))
            aux = event.get("aux") or {}
            if aux.get("Digest"):
                digest = str(aux["Digest"])
        if not keep_local:
            self._restore_refs(api, before)
        if errors or not digest.startswith("sha256:"):
            raise RuntimeError(f"pushing {repo_tag} failed: {'; '.join(errors) or 'no digest reported'}")
        return digest

    def _restore_refs(self, api: docker.APIClient, before: dict[str, str]) -> None:
        after = image_refs(api, self.host + "/")
        for ref, image_id in after.items():
            if before.get(ref) != image_id:
                with contextlib.suppress(docker.errors.NotFound):
                    api.remove_image(ref, noprune=True)
        for ref, image_id in before.items():
            if "@" not in ref and after.get(ref) != image_id:
                repository, tag = split_ref(ref)
                api.tag(image_id, repository, tag)

    def drop_blob(self, digest: str) -> None:
        """Delete a blob's data from storage (the manifests that name it stay): pulls that need it fail."""
        hexdigest = digest.removeprefix("sha256:")
        data = self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
        data.unlink()

    def remove_images(self, api: docker.APIClient, also: list[str] | None = None) -> None:
        """Force-remove every local image with a reference into this registry, the images pushed from, and `also`
        (references or IDs). Images still used by containers stay (remove the containers first)."""
        targets = set(image_refs(api, self.host + "/").values()) | self._pushed | set(also or [])
        for target in targets:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                api.remove_image(target, force=True)


def _htpasswd_line(user: str, password: str) -> str:
    """`user:$2y$...` (bcrypt), from apache2-utils' htpasswd or else the bcrypt module."""
    if os.path.exists(HTPASSWD):
        out = subprocess.run([HTPASSWD, "-Bbn", user, password], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    import bcrypt

    hashed: Any = bcrypt.hashpw(password.encode(), bcrypt.gensalt())
    return f"{user}:{hashed.decode()}"
