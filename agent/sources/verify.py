"""Apply only what trusted people signed: signature checks of a git source's commits before they are loaded.

    verifier = Verifier(cfg.verify, ref="main", record=cache_dir.with_name(cache_dir.name + ".verified.json"))
    verifier.check(git, head)     # VerificationRefused: one line naming the commit, the key (or its absence), the rule
    state = git.load(head)
    verifier.accept(head)         # recorded: the next `every-commit` range starts here

Modes: `head` checks the commit being applied; `every-commit` checks every commit reachable from it and not from the
last accepted head (`git rev-list head ^accepted`: after a force-push, the new history back to the merge base),
deepening the shallow cache as needed; with no head recorded, the commits after `since` when it is set, else the
head only.

A commit is signed by the distinct allowed keys among its own signature and the signed annotated tags the remote
has pointing at it. It needs one, or `signers` where a rule's path glob matches a file it changes (against its first
parent; in `head` mode, against the last accepted head). OpenPGP signatures are checked with gpgv against a keyring
of the configured keys; SSH signatures with `ssh-keygen -Y verify` against an allowed-signers list of them, in
git's namespace `git`, as `git verify-commit` does. A signature's result is cached by the object's SHA, and the
accepted head is skipped, so a pass with no new commits runs no process.

The accepted head is recorded next to the cache (`<cache>.verified.json`), per ref, rather than in the state log:
it is the anchor of what this node's cache has checked, written by whoever loads the source (the agent, `reconcile
--once` in CI, `plan`); the sources package may not use the state log (the layers contract), and the file
survives removing the cache itself (which its error messages suggest). Losing it only narrows `every-commit` back
to `since` (or the head), the documented first-run behaviour: set `since` to keep the range checked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dulwich.diff_tree import tree_changes
from dulwich.object_store import iter_tree_contents
from dulwich.objects import Commit, ObjectID, Tag
from dulwich.repo import Repo

from schemas.config import VerifyConfig
from schemas.errors import DabctlError

if TYPE_CHECKING:
    from agent.sources.git import GitSource

__all__ = ["Keyring", "VerificationRefused", "Verifier", "VerifyKeyError"]

log = logging.getLogger("dabctl.sources")

MAX_RANGE = 1000  # commits checked in one go; more needs verify.since closer to the head
MAX_DEPTH = 4096  # how deep the shallow cache is ever made for a range
_PARALLEL = 4  # signature checks in flight (each one a gpgv or ssh-keygen process)
_TIMEOUT = 30.0
_SSH_ARMOR = b"-----BEGIN SSH SIGNATURE-----"
_PGP_ARMOR = b"-----BEGIN PGP SIGNATURE-----"
_SSH_TYPES = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com)$"
)
_UNSIGNED = "no signature"


class VerifyKeyError(DabctlError):
    """A file in verify.keys cannot be used (unreadable, no public key in it, a secret key)."""


class VerificationRefused(DabctlError):
    """A revision of a git source is not signed as `verify` requires: nothing of it is applied.

    Terminal: it waits for a new commit, a signed tag or other settings. `commit`, `key` and `rule` are the parts of
    the one-line message, for status and metrics."""

    def __init__(self, *, ref: str, commit: str, key: str, rule: str, more: int = 0) -> None:
        self.ref, self.commit, self.key, self.rule, self.more = ref, commit, key, rule, more
        also = f" (and {more} more commit(s) refused)" if more else ""
        super().__init__(
            f"commit {commit[:12]} on {ref} refused by signature checks: {key}; rule: {rule}{also}; "
            "not applied: sign it (a signed annotated tag on it counts too) with keys in verify.keys"
        )


@dataclass(frozen=True)
class Key:
    """One allowed key: its fingerprint (OpenPGP primary key, or SSH `SHA256:...`) and the file it came from."""

    fingerprint: str
    file: str

    def __str__(self) -> str:
        return f"key {self.fingerprint} ({self.file})"


@dataclass(frozen=True)
class Checked:
    """One signature's result: the allowed key that made it, or why it does not count."""

    key: Key | None
    why: str = ""


class Keyring:
    """The configured keys as a gpgv keyring and an ssh allowed-signers file, in a private temporary directory.

    Building it runs gpg without its agent (`--no-autostart`) in that directory; the user's ~/.gnupg is never read."""

    def __init__(self, files: Iterable[str]) -> None:
        self.files = list(files)
        self.keys: dict[str, Key] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="dabctl-keys-"))
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        allowed: list[str] = []
        openpgp: list[str] = []
        for file in self.files:
            try:
                data = Path(file).read_bytes()
            except OSError as exc:
                raise VerifyKeyError(f"verify.keys: cannot read {file}: {exc.strerror}; check the path") from None
            ssh = list(_ssh_public_keys(data))
            for kind, blob in ssh:
                fingerprint = _ssh_fingerprint(blob)
                self.keys[fingerprint] = Key(fingerprint, file)
                allowed.append(f'* namespaces="git" {kind} {base64.b64encode(blob).decode()}')
            if not ssh:
                for fingerprint in self._openpgp_fingerprints(file):
                    self.keys[fingerprint] = Key(fingerprint, file)
                openpgp.append(file)
        (self.dir / "allowed_signers").write_text("".join(line + "\n" for line in allowed), encoding="utf-8")
        self.gpg_keyring = self.dir / "keys.gpg"
        if openpgp:
            self._gpg("--no-default-keyring", "--keyring", str(self.gpg_keyring), "--import", *openpgp)

    def _openpgp_fingerprints(self, file: str) -> list[str]:
        out = self._gpg("--with-colons", "--import-options", "show-only", "--import", file, quiet=True)
        lines = [line.split(":") for line in out.splitlines()]
        if any(f[0] == "sec" for f in lines):
            raise VerifyKeyError(f"verify.keys: {file} holds a secret key; give the public key (gpg --export --armor)")
        # A primary key's fingerprint is the `fpr` record right after its `pub` record (subkeys follow `sub`).
        found = [b[9] for a, b in itertools.pairwise(lines) if a[0] == "pub" and b[0] == "fpr"]
        if not found:
            raise VerifyKeyError(
                f"verify.keys: {file} holds no OpenPGP or SSH public key; give `gpg --export --armor KEY` output "
                "or an SSH .pub file"
            )
        return found

    def _gpg(self, *args: str, quiet: bool = False) -> str:
        """gpg's output; a failure raises VerifyKeyError, or gives "" with `quiet` (the caller explains)."""
        command = ["gpg", "--homedir", str(self.dir), "--batch", "--no-autostart", "--no-tty", *args]
        try:
            done = subprocess.run(command, capture_output=True, timeout=_TIMEOUT, check=False)
        except FileNotFoundError:
            raise VerifyKeyError("verify.keys: gpg is not installed; install GnuPG (Debian: gnupg)") from None
        if done.returncode != 0 and quiet:
            return ""
        if done.returncode != 0:
            last = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["failed"])[-1]
            raise VerifyKeyError(f"verify.keys: gpg could not read {' '.join(args[-1:])}: {last}")
        return done.stdout.decode("utf-8", "replace")

    def check(self, signature: bytes, payload: bytes) -> Checked:
        """Whether `signature` over `payload` was made by one of the keys (by neither: why not)."""
        if not signature:
            return Checked(None, _UNSIGNED)
        if signature.lstrip().startswith(_SSH_ARMOR):
            return self._check_ssh(signature, payload)
        if signature.lstrip().startswith(_PGP_ARMOR):
            return self._check_openpgp(signature, payload)
        return Checked(None, "a signature of an unknown kind (neither OpenPGP nor SSH)")

    def _check_ssh(self, signature: bytes, payload: bytes) -> Checked:
        signer = _ssh_signer(signature)
        if signer is None:
            return Checked(None, "an SSH signature that cannot be read")
        key = self.keys.get(signer)
        if key is None:
            return Checked(None, f"signed by SSH key {signer}, which is not in verify.keys")
        with self._signature_file(signature) as sig:
            command = ["ssh-keygen", "-Y", "verify", "-f", str(self.dir / "allowed_signers")]
            done = _run([*command, "-I", "dabctl", "-n", "git", "-s", sig], payload, "ssh-keygen (OpenSSH client)")
        if done.returncode != 0:
            return Checked(None, f"a signature by {key} that does not verify (the signed content was changed)")
        return Checked(key)

    def _check_openpgp(self, signature: bytes, payload: bytes) -> Checked:
        with self._signature_file(signature) as sig:
            command = ["gpgv", "--keyring", str(self.gpg_keyring), "--status-fd", "1", sig, "-"]
            done = _run(command, payload, "gpgv (GnuPG)")
        status: dict[str, list[str]] = {}
        for line in done.stdout.decode("utf-8", "replace").splitlines():
            if line.startswith("[GNUPG:] "):
                word, *fields = line[9:].split()
                status.setdefault(word, fields)
        for word, why in (("EXPKEYSIG", "expired"), ("REVKEYSIG", "revoked"), ("EXPSIG", "expired")):
            if word in status:
                return Checked(None, f"signed by OpenPGP key {status[word][0]}, which is {why}")
        if done.returncode == 0 and "VALIDSIG" in status:
            primary = status["VALIDSIG"][-1].upper()
            key = self.keys.get(primary)
            return Checked(key) if key else Checked(None, f"signed by OpenPGP key {primary}, not in verify.keys")
        if "BADSIG" in status:
            return Checked(None, f"a bad signature by OpenPGP key {status['BADSIG'][0]} (the signed content changed)")
        if "ERRSIG" in status:
            fields = status["ERRSIG"]
            signer = fields[6] if len(fields) > 6 and fields[6] != "-" else fields[0]  # the issuer fingerprint
            return Checked(None, f"signed by OpenPGP key {signer.upper()}, which is not in verify.keys")
        return Checked(None, "an OpenPGP signature that gpgv cannot read")

    @contextlib.contextmanager
    def _signature_file(self, signature: bytes) -> Iterator[str]:
        fd, name = tempfile.mkstemp(dir=self.dir, suffix=".sig")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(signature)
            yield name
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _run(command: list[str], payload: bytes, tool: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(command, input=payload, capture_output=True, timeout=_TIMEOUT, check=False)
    except FileNotFoundError:
        raise VerifyKeyError(f"verify: {command[0]} is not installed; install {tool}") from None


def _ssh_public_keys(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(type, key blob) of each SSH public key in a .pub, authorized_keys or allowed_signers file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        for kind, encoded in itertools.pairwise(words):
            if not _SSH_TYPES.match(kind):
                continue
            try:
                blob = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                continue
            if _ssh_string(blob, 0)[0] == kind.encode():
                yield kind, blob
                break


def _ssh_string(data: bytes, at: int) -> tuple[bytes, int]:
    """The SSH wire-format string at offset `at` and the offset after it (b"" when out of range)."""
    if at + 4 > len(data):
        return b"", len(data)
    size = int.from_bytes(data[at : at + 4], "big")
    return data[at + 4 : at + 4 + size], at + 4 + size


def _ssh_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_signer(signature: bytes) -> str | None:
    """The fingerprint of the public key an armored SSHSIG names (magic, version, then the key)."""
    body = b"".join(line.strip() for line in signature.strip().splitlines()[1:-1])
    try:
        raw = base64.b64decode(body)
    except binascii.Error:
        return None
    if not raw.startswith(b"SSHSIG") or len(raw) < 10:
        return None
    key, _ = _ssh_string(raw, 10)
    return _ssh_fingerprint(key) if key else None


def glob_pattern(glob: str) -> re.Pattern[str]:
    """A path glob as a regular expression: `**` spans directories, `*` and `?` stay within one."""
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out += ".*"
            i += 2
        elif glob[i] == "*":
            out += "[^/]*"
            i += 1
        elif glob[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(glob[i])
            i += 1
    return re.compile(out)


class _Missing(Exception):
    """A commit the range needs is beyond the shallow cache's boundary."""


@dataclass(frozen=True)
class _Need:
    signers: int
    rule: str


class Verifier:
    """The `verify` settings of one git source: check a head before it is loaded, record it once accepted."""

    def __init__(self, settings: VerifyConfig, ref: str, record: Path) -> None:
        self.settings = settings
        self.ref = ref
        self.record = record
        self.accepted: str | None = self._read_record()
        self._rules = [(i, rule, glob_pattern(rule.path.strip("/"))) for i, rule in enumerate(settings.rules)]
        self._keyring: Keyring | None = None
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._signatures: dict[bytes, Checked] = {}  # commit or tag SHA -> result, for the current keyring

    @property
    def mode(self) -> str:
        return self.settings.mode

    # --- the check ----------------------------------------------------------------------------------------------

    def check(self, git: GitSource, head: str) -> None:
        """Refuse (VerificationRefused) unless `head`, and in every-commit mode its new history, is signed enough."""
        if self.settings.mode == "none" or head == self.accepted:
            return
        keyring = self._keys()
        repo = git.repository()
        anchor = self.accepted
        if self.settings.mode == "every-commit":
            anchor = anchor or self.settings.since
            commits = self._range(git, head, anchor) if anchor else [_commit(repo, head)]
            bases = {c.id: (c.parents[0] if c.parents else None) for c in commits}
        else:
            commits = [_commit(repo, head)]
            bases = {commits[0].id: ObjectID(anchor.encode()) if anchor else None}
        self._own_signatures(keyring, commits)
        failures: list[tuple[Commit, str, str]] = []
        tags: dict[bytes, list[Tag]] | None = None
        for commit in commits:
            need = self._need(repo, commit, bases[commit.id])
            signers, why = self._signers(commit, [])
            if len(signers) < need.signers:
                if tags is None:
                    tags = self._tags(git, repo, {c.id for c in commits})
                signers, why = self._signers(commit, tags.get(commit.id, []))
            if len(signers) < need.signers:
                failures.append((commit, _describe(signers, why, need), need.rule))
        if failures:
            commit, key, rule = failures[0]
            raise VerificationRefused(
                ref=self.ref, commit=commit.id.decode(), key=key, rule=rule, more=len(failures) - 1
            )

    def accept(self, head: str) -> None:
        """Record `head` as the last accepted one (the start of the next every-commit range)."""
        if self.settings.mode == "none" or head == self.accepted:
            return
        self.accepted = head
        try:
            doc = json.loads(self.record.read_text(encoding="utf-8")) if self.record.exists() else {}
        except (OSError, ValueError):
            doc = {}
        heads = doc.get("heads") if isinstance(doc, dict) else None
        heads = dict(heads) if isinstance(heads, dict) else {}
        heads[self.ref] = head
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            partial = self.record.with_name(self.record.name + ".tmp")
            partial.write_text(json.dumps({"version": 1, "heads": heads}, indent=1) + "\n", encoding="utf-8")
            os.replace(partial, self.record)
        except OSError as exc:
            log.warning("cannot record the verified head", extra={"file": str(self.record), "error": exc.strerror})

    def close(self) -> None:
        if self._keyring is not None:
            self._keyring.close()
            self._keyring = None

    # --- which commits ------------------------------------------------------------------------------------------

    def _range(self, git: GitSource, head: str, anchor: str) -> list[Commit]:
        """`git rev-list head ^anchor`, oldest first, deepening the cache until every commit of it is held."""
        repo = git.repository()
        depth = git.depth
        while True:
            try:
                commits, met = _rev_list(repo, ObjectID(head.encode()), ObjectID(anchor.encode()))
            except _Missing:
                if depth >= MAX_DEPTH:
                    raise self._too_long(head, anchor) from None
                depth = min(depth * 4, MAX_DEPTH)
                git.deepen(depth)
                continue
            except _TooMany:
                raise self._too_long(head, anchor) from None
            if not met and anchor == self.settings.since and self.accepted is None:
                raise VerificationRefused(
                    ref=self.ref,
                    commit=head,
                    key="not checked",
                    rule=f"verify.since {anchor[:12]} must be in the history of {self.ref}; fix verify.since",
                )
            return commits

    def _too_long(self, head: str, anchor: str) -> VerificationRefused:
        return VerificationRefused(
            ref=self.ref,
            commit=head,
            key="not checked",
            rule=f"every-commit checks at most {MAX_RANGE} commits after {anchor[:12]}; set verify.since to a "
            "trusted commit closer to the head",
        )

    # --- how many signers ---------------------------------------------------------------------------------------

    def _need(self, repo: Repo, commit: Commit, base: ObjectID | None) -> _Need:
        need = _Need(1, f"verify.mode {self.settings.mode} needs 1 allowed key")
        if not self._rules:
            return need
        changed = _changed(repo, commit, base)
        for i, rule, pattern in self._rules:
            if rule.signers <= need.signers:
                continue
            hit = next((path for path in changed if pattern.fullmatch(path)), None)
            if hit is not None:
                need = _Need(rule.signers, f"verify.rules[{i}] {rule.path} needs {rule.signers} distinct keys ({hit})")
        return need

    def _signers(self, commit: Commit, tags: list[Tag]) -> tuple[dict[str, Key], list[str]]:
        """The distinct allowed keys among the commit's signature and the tags' (and why the others do not count)."""
        signers: dict[str, Key] = {}
        why: list[str] = []
        for name, result in [("", self._signatures[commit.id])] + [
            (f"tag {tag.name.decode('utf-8', 'replace')}: ", self._tag_signature(tag)) for tag in tags
        ]:
            if result.key is not None:
                signers.setdefault(result.key.fingerprint, result.key)
            elif result.why != _UNSIGNED:
                why.append(name + result.why)
        return signers, why

    def _own_signatures(self, keyring: Keyring, commits: list[Commit]) -> None:
        todo = [c for c in commits if c.id not in self._signatures]
        if not todo:
            return

        def one(commit: Commit) -> Checked:
            return keyring.check(commit.gpgsig or b"", commit.raw_without_sig())

        if len(todo) == 1:
            self._signatures[todo[0].id] = one(todo[0])
            return
        with ThreadPoolExecutor(max_workers=_PARALLEL) as pool:
            for commit, result in zip(todo, pool.map(one, todo), strict=True):
                self._signatures[commit.id] = result

    def _tag_signature(self, tag: Tag) -> Checked:
        if tag.id not in self._signatures:
            keyring = self._keys()
            self._signatures[tag.id] = keyring.check(tag.signature or b"", tag.raw_without_sig())
        return self._signatures[tag.id]

    def _tags(self, git: GitSource, repo: Repo, commits: set[bytes]) -> dict[bytes, list[Tag]]:
        """The annotated tags the remote advertises pointing at one of `commits` (fetched when not held)."""
        advertised = git.advertised
        candidates: list[bytes] = []
        for name, sha in advertised.items():
            if not name.startswith(b"refs/tags/") or name.endswith(b"^{}"):
                continue
            peeled = advertised.get(name + b"^{}")
            if (peeled is not None and peeled in commits) or (peeled is None and sha not in commits):
                candidates.append(sha)  # peeled entries missing (a local remote): the tag object says
        missing = [sha.decode() for sha in candidates if ObjectID(sha) not in repo.object_store]
        if missing:
            git.fetch_objects(missing)
        out: dict[bytes, list[Tag]] = {}
        for sha in candidates:
            try:
                tag = repo[sha]
            except KeyError:
                continue
            if isinstance(tag, Tag) and tag.object[1] in commits:
                out.setdefault(tag.object[1], []).append(tag)
        return out

    # --- keys and the record ------------------------------------------------------------------------------------

    def _keys(self) -> Keyring:
        """The keyring, rebuilt when a key file changed (results cached under the old keys are dropped)."""
        stamp: list[tuple[str, int, int]] = []
        for file in self.settings.keys:
            try:
                st = os.stat(file)
            except OSError as exc:
                raise VerifyKeyError(f"verify.keys: cannot read {file}: {exc.strerror}; check the path") from None
            stamp.append((file, st.st_mtime_ns, st.st_size))
        if self._keyring is None or tuple(stamp) != self._stamp:
            keyring = Keyring(self.settings.keys)
            self.close()
            self._keyring, self._stamp = keyring, tuple(stamp)
            self._signatures = {}
        return self._keyring

    def _read_record(self) -> str | None:
        try:
            doc = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        head = doc.get("heads", {}).get(self.ref) if isinstance(doc, dict) else None
        return head if isinstance(head, str) and re.fullmatch(r"[0-9a-f]{40}", head) else None


class _TooMany(Exception):
    """The range is longer than MAX_RANGE."""


def _commit(repo: Repo, sha: str | bytes) -> Commit:
    obj = repo[ObjectID(sha if isinstance(sha, bytes) else sha.encode())]
    assert isinstance(obj, Commit)
    return obj


def _held(repo: Repo, sha: bytes) -> Commit | None:
    try:
        obj = repo[ObjectID(sha)]
    except KeyError:
        return None
    return obj if isinstance(obj, Commit) else None


def _rev_list(repo: Repo, head: ObjectID, anchor: ObjectID) -> tuple[list[Commit], bool]:
    """Commits reachable from `head` and not from `anchor` (oldest first), and whether the walk met `anchor`'s
    history. _Missing when one of them, or a parent of one, is beyond the shallow boundary."""
    excluded = {anchor}
    todo = [anchor]
    while todo:  # the anchor's history as far as it is held
        commit = _held(repo, todo.pop())
        if commit is None:
            continue
        for parent in commit.parents:
            if parent not in excluded:
                excluded.add(parent)
                todo.append(parent)
    found: list[Commit] = []
    seen = {head}
    todo = [head]
    met = head in excluded
    while todo:
        sha = todo.pop(0)
        if sha in excluded:
            met = True
            continue
        commit = _held(repo, sha)
        if commit is None:
            raise _Missing(sha)
        found.append(commit)
        if len(found) > MAX_RANGE:
            raise _TooMany()
        for parent in commit.parents:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return found[::-1], met


def _changed(repo: Repo, commit: Commit, base: ObjectID | None) -> list[str]:
    """Paths of the files `commit` changes against `base` (every file when `base` is absent or not held)."""
    store = repo.object_store
    held = _held(repo, base) if base is not None else None
    if held is None:
        return [e.path.decode("utf-8", "replace") for e in iter_tree_contents(store, commit.tree)]
    paths = []
    for change in tree_changes(store, held.tree, commit.tree):
        entry = change.new if change.new is not None and change.new.path is not None else change.old
        if entry is not None and entry.path is not None:
            paths.append(entry.path.decode("utf-8", "replace"))
    return paths


def _describe(signers: dict[str, Key], why: list[str], need: _Need) -> str:
    """The key part of a refusal: who signed (and how many of how many), or the absence of a signature."""
    notes = "; ".join(why)
    if not signers:
        return notes or "no signature (on the commit or on a tag pointing at it)"
    named = ", ".join(str(k) for k in signers.values())
    text = f"signed by {named} only ({len(signers)} of {need.signers} distinct keys)"
    return f"{text}; {notes}" if notes else text
