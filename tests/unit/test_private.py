"""Secrets at rest and in flight: the state directory 0700 and its files 0600 from creation, an existing one
tightened; secret files held to ssh's rules; no credentials in URLs; no token over plain HTTP; no lock file through
a symbolic link; plain-HTTP etcd elsewhere than loopback only with etcd_insecure. (The machine runs as root; files
"not owned by root" are chowned to nobody.)"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.private import PrivateFileRefused, private_dir
from agent.sources.git import GitAuth, GitSource
from agent.sources.source import read_secret
from agent.state.backends import open_log
from agent.state.holder import HolderLock
from agent.state.sqlite import SqliteStateLog
from bundles.errors import SourceError
from schemas.config import AgentConfig

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteStateLog]:
    state = SqliteStateLog(tmp_path / "state" / "state.db", holder={"api": "x"})
    state.put("k", b"POSTGRES_PASSWORD=hunter2")
    yield state
    state.close()


def test_the_state_directory_is_0700_and_its_files_0600_from_creation(log: SqliteStateLog, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert mode(state) == 0o700
    files = sorted(p.name for p in state.iterdir())
    assert files == ["state.db", "state.db-shm", "state.db-wal", "state.db.lock"]
    assert {name: mode(state / name) for name in files} == dict.fromkeys(files, 0o600)


def test_an_existing_loose_state_directory_is_tightened_on_first_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "state.db").touch(mode=0o644)
    os.chmod(state / "state.db", 0o644)
    (state / "git").mkdir(mode=0o755)
    os.chmod(state / "git", 0o755)
    SqliteStateLog(state / "state.db").close()
    assert (mode(state), mode(state / "state.db"), mode(state / "git")) == (0o700, 0o600, 0o700)


def test_a_state_directory_another_user_owns_or_may_write_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "agent-state"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(PrivateFileRefused, match=rf"^the state directory {theirs} is owned by uid 65534, not this"):
        SqliteStateLog(theirs / "state.db")
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    with pytest.raises(PrivateFileRefused, match=r"may be written by group or others \(mode 0777\).*chmod 700"):
        private_dir(open_to_all)


def test_a_group_given_traversal_keeps_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 0, NOBODY)
    os.chmod(state, 0o750)
    private_dir(state)
    assert mode(state) == 0o710


def test_the_lock_file_is_never_opened_through_a_symbolic_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "state.db.lock").symlink_to(victim)
    with pytest.raises(PrivateFileRefused, match=r"state.db.lock is a symbolic link: another user may have planted"):
        SqliteStateLog(state / "state.db")
    assert victim.read_text() == "precious"
    lock = HolderLock(state / "agent.lock")
    (state / "agent.lock").symlink_to(victim)
    with pytest.raises(PrivateFileRefused):
        lock.acquire()
    assert victim.read_text() == "precious"
    assert HolderLock.holder_of(state / "agent.lock") is None


@pytest.mark.parametrize(
    ("setting", "file_mode", "owner", "message"),
    [
        (
            "git_token_file",
            0o640,
            0,
            r"^git_token_file: {f} may be read by group or others \(mode 0640\); chmod 600 {f}$",
        ),
        ("git_token_file", 0o604, 0, r"\(mode 0604\)"),
        (
            "webhook_secret_file",
            0o600,
            NOBODY,
            r"^webhook_secret_file: {f} is owned by uid 65534, not root: .*chown root {f}$",
        ),
    ],
)
def test_secret_files_others_may_read_or_own_are_refused_as_ssh_does(
    tmp_path: Path, setting: str, file_mode: int, owner: int, message: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("tok-123\n")
    os.chmod(secret, file_mode)
    os.chown(secret, owner, owner)
    with pytest.raises(PrivateFileRefused, match=message.format(f=secret)) as info:
        read_secret(str(secret), None, setting=setting)
    assert "tok-123" not in str(info.value)
    os.chmod(secret, 0o600)
    os.chown(secret, 0, 0)
    assert read_secret(str(secret), None, setting=setting) == "tok-123"


def test_a_group_readable_ssh_or_etcd_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("-----BEGIN KEY-----\n")
    os.chmod(key, 0o644)
    cfg = AgentConfig(source="ssh://git@127.0.0.1/r.git", git_ssh_key_file=str(key), state_dir=str(tmp_path / "s"))
    from agent.sources.source import open_source

    with pytest.raises(PrivateFileRefused, match=r"^git_ssh_key_file: .* \(mode 0644\); chmod 600"):
        open_source(cfg)
    etcd = AgentConfig(state="etcd://127.0.0.1:2379", etcd_cert_file=str(key), etcd_key_file=str(key))
    with pytest.raises(PrivateFileRefused, match=r"^etcd_key_file: "):
        open_log(etcd, writer=True)


@pytest.mark.parametrize(
    "url", ["https://x-access-token:s3cret-tok@git.example.com/ops.git", "http://bot:s3cret-tok@127.0.0.1:8080/r"]
)
def test_a_url_with_credentials_is_refused_with_a_pointer_to_git_token_file(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"source": url}, environ={})
    assert str(info.value).startswith("--source: source: the URL carries a password or token (user:TOKEN@)")
    assert "git_token_file" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_token_over_plain_http_to_another_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"is plain HTTP: the token would cross the network in clear text; use https"):
        GitSource("http://git.example.com/ops.git", cache_dir=tmp_path, auth=GitAuth(token="tok-123"))
    for url in ("http://127.0.0.1:8080/r", "http://localhost/r", "http://[::1]/r", "https://git.example.com/r"):
        GitSource(url, cache_dir=tmp_path, auth=GitAuth(token="tok-123")).close()
    GitSource("http://git.example.com/ops.git", cache_dir=tmp_path).close()  # no token, nothing to leak


def test_plain_http_etcd_elsewhere_than_loopback_needs_etcd_insecure() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"state": "etcd://127.0.0.1:2379,10.0.0.5:2379"}, environ={})
    assert "state etcd://10.0.0.5:2379 is plain HTTP to an address other than loopback" in str(info.value)
    assert "TLS with client certificates" in str(info.value) and "etcd_insecure: true" in str(info.value)
    assert load_config(None, {"state": "etcd://10.0.0.5:2379", "etcd_insecure": True}, environ={}).etcd_insecure
    assert load_config(None, {"state": "etcd://10.0.0.5:2379", "etcd_ca_file": "/ca.pem"}, environ={})
    assert load_config(None, {"state": "etcd://localhost:2379,[::1]:2379"}, environ={})


def test_an_error_line_never_quotes_an_env_value(tmp_path: Path) -> None:
    from bundles import load_directory
    from bundles.errors import InvalidBundles

    (tmp_path / "shop.dab").write_text(
        '{"Version": "0.1", "Services": {"db": {"Image": "postgres:16", '
        '"Env": ["POSTGRES PASSWORD=hunter2-s3cret", "=hunter2-s3cret"]}}}'
    )
    with pytest.raises(InvalidBundles) as info:
        load_directory(tmp_path)
    text = str(info.value)
    assert "invalid Env entry 'POSTGRES PASSWORD=...' (value not shown)" in text
    assert "hunter2" not in text
