"""Signature checks benchmark: what `verify` adds to a pass, next to the raw tools doing the same checks.

A repository of 10 commits signed by one key (OpenPGP, then SSH) on top of an accepted head. Each run opens the
source afresh (empty per-commit cache, as after an agent restart) and times `Verifier.check` of the new head in
`every-commit` mode — the 10-commit range — then the check of a pass with no new commits (the head already
accepted). Peers, in the same runs: `git verify-commit` of the same 10 commits (one process each, gpg.ssh
allowedSignersFile for SSH) and the raw verifier calls alone (`gpgv`, `ssh-keygen -Y verify`, one per commit,
serially). No Docker, no network: keys and the repository live in a temporary directory.

    .venv/bin/python bench/verify.py [--runs 7] [--commits 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import log, machine, print_table, ratio, stats

from agent.sources.source import open_source
from schemas.config import AgentConfig
from tests.support.signing import Keys, Signer, git, git_commit

BUNDLE = json.dumps({"Version": "0.1", "Services": {"web": {"Image": "nginx:1.27"}}})


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def scenario(work: Path, signer: Signer, commits: int, runs: int) -> list[list[str]]:
    repo = work / f"repo-{signer.kind}"
    base = git_commit(repo, {"stacks/web.dab": BUNDLE}, "base", signer)
    shas = [git_commit(repo, {f"stacks/s{i}.dab": BUNDLE}, f"c{i}", signer) for i in range(commits)]
    head = shas[-1]
    allowed = work / f"allowed-{signer.kind}"
    allowed.write_text(f"* {signer.public.read_text().split()[0]} {signer.public.read_text().split()[1]}\n")

    verify_range: list[float] = []
    verify_none: list[float] = []
    raw_git: list[float] = []
    raw_tool: list[float] = []
    for run in range(runs):
        state = work / f"state-{signer.kind}-{run}"
        record = state / "git"
        cfg = AgentConfig(
            source=str(repo),
            ref="main",
            path="stacks",
            state_dir=str(state),
            verify={"mode": "every-commit", "keys": [str(signer.public)]},
        )
        source = open_source(cfg)
        try:
            inner = source.inner  # type: ignore[attr-defined]
            inner.verifier.accepted = base  # the accepted head 10 commits back
            inner.git.fetch()
            inner.verifier._keys()  # the keyring is built once per agent start: not part of a pass
            verify_range.append(timed(inner.verifier.check, inner.git, head))
            inner.verifier.accept(head)
            verify_none.append(timed(inner.verifier.check, inner.git, head))
        finally:
            source.close()
        assert record.exists()

        def git_verify() -> None:
            for sha in shas:
                options = ["-c", f"gpg.ssh.allowedSignersFile={allowed}"] if signer.kind == "ssh" else []
                git(repo, *options, "verify-commit", sha, signer=signer)

        raw_git.append(timed(git_verify))
        raw_tool.append(timed(lambda: raw_checks(repo, shas, signer, allowed, work)))
    label = "OpenPGP (gpgv)" if signer.kind == "openpgp" else "SSH (ssh-keygen -Y verify)"
    return [
        [label, f"dabctl every-commit, {commits} new commits", stats(verify_range), ratio(verify_range, raw_git)],
        [label, "dabctl, no new commits", f"{stats(verify_none)}", ratio(verify_none, raw_git)],
        [label, f"git verify-commit x{commits}", stats(raw_git), "1.00x"],
        [label, f"raw {signer.kind} verifier x{commits}", stats(raw_tool), ratio(raw_tool, raw_git)],
    ]


def raw_checks(repo: Path, shas: list[str], signer: Signer, allowed: Path, work: Path) -> None:
    """The verifier processes alone, as `git verify-commit` would run them (payload and signature from git)."""
    for sha in shas:
        raw = git(repo, "cat-file", "commit", sha).encode() + b"\n"
        header, _, message = raw.partition(b"\n\n")
        payload_lines: list[bytes] = []
        signature: list[bytes] = []
        in_sig = False
        for line in header.split(b"\n"):
            if line.startswith(b"gpgsig "):
                in_sig = True
                signature.append(line[7:])
            elif in_sig and line.startswith(b" "):
                signature.append(line[1:])
            else:
                in_sig = False
                payload_lines.append(line)
        payload = b"\n".join(payload_lines) + b"\n\n" + message
        sig = work / "sig"
        sig.write_bytes(b"\n".join(signature) + b"\n")
        if signer.kind == "ssh":
            command = ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "x", "-n", "git", "-s", str(sig)]
        else:
            keyring = work / "keyring.gpg"
            if not keyring.exists():
                subprocess.run(
                    ["gpg", "--batch", "--no-default-keyring", "--keyring", str(keyring), "--import", signer.public],
                    env={**os.environ, "GNUPGHOME": str(signer.gnupghome)},
                    capture_output=True,
                    check=True,
                )
            command = ["gpgv", "--keyring", str(keyring), str(sig), "-"]
        subprocess.run(command, input=payload, capture_output=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--commits", type=int, default=10)
    args = parser.parse_args()
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="dabctl-bench-verify-"))
    rows: list[list[str]] = []
    try:
        with Keys() as keys:
            for signer in (keys.openpgp("alice"), keys.ssh("bob")):
                log(f"{signer.kind}: {args.runs} runs of {args.commits} commits")
                rows += scenario(work, signer, args.commits, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(machine())
    print(f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; median of {args.runs} runs (min-max)")
    print_table(["keys", "contender", "seconds", "÷ git verify-commit"], rows)


if __name__ == "__main__":
    main()
