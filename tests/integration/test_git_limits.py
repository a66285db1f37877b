"""A malicious repository cannot exhaust the agent: a 256 MiB blob of zeros (about 300 KB in git) anywhere in the
history — not only under --path — is refused by the size in its pack header, and the fetching process's peak RSS
grows by less than 50 MiB over the same fetch of a small repository.

Each fetch runs the agent's own source code (config -> open_source -> load) in a child process; its peak RSS is
the child's ru_maxrss from wait4, so nothing else in the test process counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gitserver import GitServer

# Real git and a 256 MiB object measured in child processes: the integration tier (the fast tier stays fast).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1024 * 1024
ZEROS = 256 * MiB

CHILD = """
import json, sys
from agent.config import load_config
from agent.sources.source import open_source
from schemas.errors import DabctlError
cfg = load_config(None, json.loads(sys.argv[1]), environ={})
try:
    source = open_source(cfg)
    print(json.dumps({"stacks": sorted(source.load().stacks)}))
except DabctlError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""

BUNDLE = '{"Version": "0.1", "Services": {"web": {"Image": "dabctl/sample:1"}}}\n'


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args], cwd=repo, check=True, capture_output=True
    )


def make_repo(repo: Path, zeros: int) -> Path:
    """A repository with a bundle under stacks/ and, outside it, a file of `zeros` zero bytes."""
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "stacks").mkdir()
    (repo / "stacks" / "web.dab").write_text(BUNDLE)
    with open(repo / "zeros.bin", "wb") as f:
        f.truncate(zeros)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    (repo / "zeros.bin").unlink()  # the work tree copy is not part of what is served
    return repo


def fetch(source: str, state: Path, **settings: object) -> tuple[dict[str, object], int]:
    """Load the source in a child process as the agent would; its answer and its peak RSS in bytes."""
    flags = {"source": source, "path": "stacks", "state_dir": str(state), **settings}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(flags)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out
    return json.loads(out), usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("repos")
    yield make_repo(root / "small", 1024), make_repo(root / "zeros", ZEROS)


def test_the_hostile_repository_is_small_on_disk(repos: tuple[Path, Path]) -> None:
    _, zeros = repos
    size = sum(f.stat().st_size for f in (zeros / ".git").rglob("*") if f.is_file())
    assert size < 2 * MiB


def test_a_256_mib_blob_is_refused_before_it_is_inflated(repos: tuple[Path, Path], tmp_path: Path) -> None:
    small, zeros = repos
    ok, baseline = fetch(str(small), tmp_path / "a")
    assert ok == {"stacks": ["web"]}
    refused, peak = fetch(str(zeros), tmp_path / "b")
    assert refused["error"] == "PackRefused"
    assert refused["message"] == (
        f"git fetch of {zeros} failed: the repository holds a 256 MiB blob (object 5 of 5 in the pack), over "
        "git_max_object_bytes (32 MiB); nothing was fetched: remove it from the repository's history, or raise "
        "git_max_object_bytes"
    )
    # Without the limit the same fetch takes the whole blob (and more) into memory: the repository is hostile.
    accepted, unlimited = fetch(str(zeros), tmp_path / "c", git_max_object_bytes=ZEROS + MiB)
    growth, unlimited_growth = (peak - baseline) / MiB, (unlimited - baseline) / MiB
    print(
        f"\npeak RSS: small repository {baseline / MiB:.1f} MiB; 256 MiB blob refused: +{growth:.1f} MiB; "
        f"accepted (limit raised): +{unlimited_growth:.1f} MiB"
    )
    assert growth < 50
    # The limit, and nothing else, refused it: raised, the same fetch goes through (and stores the blob). How much
    # memory that takes is dulwich's business and varies (+23 to +311 MiB seen), so it is printed, not asserted.
    assert "error" not in accepted, accepted
    assert sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.pack")) > 0
    assert not list((tmp_path / "b").rglob("*.pack"))  # nothing of it was stored


def test_over_http_too(repos: tuple[Path, Path], tmp_path: Path) -> None:
    small, zeros = repos
    with GitServer(small) as server:
        ok, baseline = fetch(server.url, tmp_path / "a")
    assert ok == {"stacks": ["web"]}
    with GitServer(zeros) as server:
        refused, peak = fetch(server.url, tmp_path / "b")
    assert refused["error"] == "PackRefused"
    assert "the repository holds a 256 MiB blob" in str(refused["message"])
    print(
        f"\npeak RSS over HTTP: small repository {baseline / MiB:.1f} MiB; 256 MiB blob refused: "
        f"+{(peak - baseline) / MiB:.1f} MiB"
    )
    assert (peak - baseline) / MiB < 50
