"""Real signing keys and signed commits for the signature-check tests: gpg and ssh-keygen keys made in temporary
directories, commits and tags made and signed by the git command line.

    with Keys() as keys:                                    # a private GNUPGHOME; its gpg-agent is stopped at exit
        alice = keys.openpgp("alice")                       # .public: an armored public key file
        bob = keys.ssh("bob")                               # .public: bob.pub
        sha = git_commit(repo, {"stacks/web.dab": "..."}, "message", alice)   # signed by alice (None: unsigned)
        git_tag(repo, "v1", sha, bob)                       # an annotated tag signed by bob

Nothing reads or writes ~/.gnupg or the user's git configuration (GIT_CONFIG_GLOBAL=/dev/null, no system config).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["Keys", "Signer", "git", "git_commit", "git_tag"]

_clock = {"t": 1_750_000_000}


@dataclass(frozen=True)
class Signer:
    """One key: `kind` openpgp or ssh, `signing` what git's user.signingkey takes, `public` the public key file."""

    name: str
    kind: str
    signing: str
    public: Path
    gnupghome: Path


class Keys:
    """Keys made for a test session in one temporary directory (short: gpg-agent's socket path must fit)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dabctl-sig-"))
        self.gnupghome = self.dir / "g"
        self.gnupghome.mkdir(mode=0o700)

    def openpgp(self, name: str) -> Signer:
        uid = f"{name} <{name}@dabctl.invalid>"
        env = {**os.environ, "GNUPGHOME": str(self.gnupghome)}
        quick = ["gpg", "--batch", "--passphrase", "", "--quick-generate-key", uid, "ed25519", "sign", "never"]
        subprocess.run(quick, env=env, check=True, capture_output=True)
        out = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--list-keys", f"<{name}@dabctl.invalid>"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        fingerprint = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
        public = self.dir / f"{name}.asc"
        exported = subprocess.run(["gpg", "--batch", "--armor", "--export", fingerprint], env=env, capture_output=True)
        public.write_bytes(exported.stdout)
        return Signer(name, "openpgp", fingerprint, public, self.gnupghome)

    def ssh(self, name: str) -> Signer:
        private = self.dir / name
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@dabctl.invalid", "-f", str(private)],
            check=True,
            capture_output=True,
        )
        return Signer(name, "ssh", str(private), Path(f"{private}.pub"), self.gnupghome)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.gnupghome), "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def git(repo: Path, *args: str, signer: Signer | None = None) -> str:
    """Run git in `repo` with no user or system configuration (and `signer`'s key when given); its stdout."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(repo),
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "dabctl tests",
        "GIT_AUTHOR_EMAIL": "tests@dabctl.invalid",
        "GIT_COMMITTER_NAME": "dabctl tests",
        "GIT_COMMITTER_EMAIL": "tests@dabctl.invalid",
        "GIT_AUTHOR_DATE": f"@{_clock['t']} +0000",
        "GIT_COMMITTER_DATE": f"@{_clock['t']} +0000",
    }
    options: list[str] = []
    if signer is not None:
        env["GNUPGHOME"] = str(signer.gnupghome)
        options = ["-c", f"user.signingkey={signer.signing}", "-c", f"gpg.format={signer.kind}"]
    done = subprocess.run(["git", *options, *args], cwd=repo, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def git_commit(repo: Path, files: Mapping[str, str | None], message: str, signer: Signer | None = None) -> str:
    """Write (str) or delete (None) files and commit them (signed by `signer`, unsigned with None); the SHA."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q", "-b", "main")
    for name, content in files.items():
        path = repo / name
        if content is None:
            git(repo, "rm", "-q", name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            git(repo, "add", name)
    _clock["t"] += 60
    sign = ["-S"] if signer is not None else ["--no-gpg-sign"]
    git(repo, "commit", "-q", "--allow-empty", *sign, "-m", message, signer=signer)
    return git(repo, "rev-parse", "HEAD")


def git_tag(repo: Path, name: str, sha: str, signer: Signer) -> None:
    """An annotated tag `name` at `sha`, signed by `signer`."""
    _clock["t"] += 1
    git(repo, "tag", "-s", "-m", f"tag {name}", name, sha, signer=signer)
