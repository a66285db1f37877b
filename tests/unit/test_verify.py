"""Signature checks of a git source (verify: head | every-commit, path rules) with real keys: gpg and ssh-keygen
keys made in a temporary directory, commits and tags signed by the git command line, checked through open_source
exactly as the agent and `reconcile --once` load a source."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sources import verify
from agent.sources.git import GitSource
from agent.sources.source import Source, SourceConfigError, open_source
from agent.sources.verify import VerificationRefused, Verifier, VerifyKeyError, glob_pattern
from schemas.config import AgentConfig, VerifyConfig
from tests.support.signing import Keys, Signer, git, git_commit, git_tag

pytestmark = pytest.mark.timeout(60)

BUNDLE = json.dumps({"Version": "0.1", "Services": {"web": {"Image": "nginx:1.27"}}})


class Team:
    def __init__(self, keys: Keys) -> None:
        self.alice = keys.openpgp("alice")  # OpenPGP, allowed
        self.bob = keys.ssh("bob")  # SSH, allowed
        self.mallory = keys.openpgp("mallory")  # OpenPGP, not allowed
        self.eve = keys.ssh("eve")  # SSH, not allowed

    @property
    def allowed(self) -> list[str]:
        return [str(self.alice.public), str(self.bob.public)]


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    with Keys() as keys:
        yield Team(keys)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


Open = Callable[..., Source]


@pytest.fixture
def load_with(tmp_path: Path, repo: Path, team: Team) -> Iterator[Open]:
    """open_source on `repo` (ref main, path stacks) with `verify` settings; every source is closed afterwards."""
    made: list[Source] = []

    def make(**settings: Any) -> Source:
        settings.setdefault("keys", team.allowed)
        cfg = AgentConfig(
            source=str(repo), ref="main", path="stacks", state_dir=str(tmp_path / "state"), verify=settings
        )
        source = open_source(cfg)
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


def refused(source: Source) -> VerificationRefused:
    with pytest.raises(VerificationRefused) as caught:
        source.load()
    return caught.value


def stack(name: str) -> dict[str, str | None]:
    return {f"stacks/{name}.dab": BUNDLE}


# --- head -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_a_commit_signed_by_an_allowed_key_is_loaded(team: Team, repo: Path, load_with: Open, who: str) -> None:
    git_commit(repo, stack("web"), "web", getattr(team, who))
    assert sorted(load_with(mode="head").load().stacks) == ["web"]


def test_an_unsigned_head_is_refused_naming_the_commit_the_absence_and_the_rule(repo: Path, load_with: Open) -> None:
    sha = git_commit(repo, stack("web"), "web")
    exc = refused(load_with(mode="head"))
    assert exc.commit == sha
    assert exc.key == "no signature (on the commit or on a tag pointing at it)"
    assert exc.rule == "verify.mode head needs 1 allowed key"
    assert str(exc).startswith(f"commit {sha[:12]} on main refused by signature checks: no signature")


@pytest.mark.parametrize("who", ["mallory", "eve"])
def test_a_head_signed_by_a_key_not_in_the_list_is_refused_naming_that_key(
    team: Team, repo: Path, load_with: Open, who: str
) -> None:
    signer: Signer = getattr(team, who)
    git_commit(repo, stack("web"), "web", signer)
    exc = refused(load_with(mode="head"))
    if signer.kind == "openpgp":
        assert exc.key == f"signed by OpenPGP key {signer.signing}, which is not in verify.keys"
    else:
        shown = subprocess.run(["ssh-keygen", "-l", "-f", str(signer.public)], capture_output=True, text=True)
        fingerprint = shown.stdout.split()[1]
        assert exc.key == f"signed by SSH key {fingerprint}, which is not in verify.keys"


def test_head_mode_checks_only_the_head(team: Team, repo: Path, load_with: Open) -> None:
    git_commit(repo, stack("web"), "web", team.alice)
    git_commit(repo, stack("api"), "api, unsigned")
    git_commit(repo, stack("db"), "db", team.bob)
    assert sorted(load_with(mode="head").load().stacks) == ["api", "db", "web"]


# --- every-commit ---------------------------------------------------------------------------------------------


def test_every_commit_refuses_a_head_whose_parent_is_unsigned(team: Team, repo: Path, load_with: Open) -> None:
    git_commit(repo, stack("web"), "web", team.alice)
    source = load_with(mode="every-commit")
    assert sorted(source.load().stacks) == ["web"]  # no head recorded yet: the head only; now it is recorded
    unsigned = git_commit(repo, stack("api"), "api, unsigned")
    git_commit(repo, stack("db"), "db", team.bob)
    exc = refused(source)
    assert exc.commit == unsigned and exc.rule == "verify.mode every-commit needs 1 allowed key"

    # A fresh process (reconcile --once in CI) finds the recorded head and refuses the same way.
    assert refused(load_with(mode="every-commit")).commit == unsigned


def test_every_commit_after_a_force_push_checks_back_to_the_merge_base(team: Team, repo: Path, load_with: Open) -> None:
    base = git_commit(repo, stack("web"), "web", team.alice)
    git_commit(repo, stack("api"), "api", team.alice)
    source = load_with(mode="every-commit")
    source.load()
    git(repo, "reset", "-q", "--hard", base)  # history rewritten: api's commit is gone from main
    git_commit(repo, stack("db"), "db", team.bob)
    assert sorted(source.load().stacks) == ["db", "web"]
    git(repo, "reset", "-q", "--hard", base)
    sneaky = git_commit(repo, stack("db"), "db, unsigned")
    git_commit(repo, stack("db2"), "db2", team.bob)
    assert refused(source).commit == sneaky


def test_every_commit_from_since_deepens_a_shallow_cache(team: Team, repo: Path, tmp_path: Path) -> None:
    shas = [git_commit(repo, stack(f"s{i}"), f"s{i}", None if i in (0, 2) else team.bob) for i in range(7)]
    settings = VerifyConfig(mode="every-commit", keys=team.allowed, since=shas[0])
    with GitSource(str(repo), "main", "stacks", cache_dir=tmp_path / "cache", depth=2) as source:
        verifier = Verifier(settings, "main", tmp_path / "record.json")
        try:
            head = source.fetch()
            with pytest.raises(VerificationRefused) as caught:
                verifier.check(source, head)
            assert caught.value.commit == shas[2], "beyond the first fetch's depth of 2"
        finally:
            verifier.close()


def test_since_outside_the_history_is_refused_with_the_fix(team: Team, repo: Path, load_with: Open) -> None:
    git_commit(repo, stack("web"), "web", team.alice)
    exc = refused(load_with(mode="every-commit", since="0" * 40))
    assert "fix verify.since" in exc.rule


# --- more than one signer -------------------------------------------------------------------------------------

PROD = {"rules": [{"path": "stacks/prod/**", "signers": 2}]}


def test_two_signers_met_by_a_commit_signature_and_a_signed_tag_from_a_second_key(
    team: Team, repo: Path, load_with: Open
) -> None:
    sha = git_commit(repo, {"stacks/prod/web.dab": BUNDLE, **stack("web")}, "prod", team.alice)
    source = load_with(mode="head", **PROD)
    exc = refused(source)
    assert exc.rule == "verify.rules[0] stacks/prod/** needs 2 distinct keys (stacks/prod/web.dab)"
    assert "only (1 of 2 distinct keys)" in exc.key and team.alice.signing in exc.key
    git_tag(repo, "approved-by-bob", sha, team.bob)
    assert sorted(source.load().stacks) == ["web"]


def test_two_tags_from_one_key_are_one_signer(team: Team, repo: Path, load_with: Open) -> None:
    sha = git_commit(repo, {"stacks/prod/web.dab": BUNDLE}, "prod", team.alice)
    git_tag(repo, "a1", sha, team.alice)
    git_tag(repo, "a2", sha, team.alice)
    git_tag(repo, "m1", sha, team.mallory)  # a signer not in the list adds nothing either
    exc = refused(load_with(mode="every-commit", **PROD))
    assert "only (1 of 2 distinct keys)" in exc.key and "tag m1: signed by OpenPGP key" in exc.key


def test_a_rule_applies_only_to_commits_that_change_its_paths(team: Team, repo: Path, load_with: Open) -> None:
    sha = git_commit(repo, {"stacks/prod/web.dab": BUNDLE}, "prod", team.alice)
    git_tag(repo, "b1", sha, team.bob)
    source = load_with(mode="every-commit", **PROD)
    source.load()
    git_commit(repo, stack("web"), "outside prod", team.bob)
    assert sorted(source.load().stacks) == ["web"]


# --- cost -----------------------------------------------------------------------------------------------------


def test_no_new_commits_costs_no_process_and_results_are_cached(
    team: Team, repo: Path, load_with: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    git_commit(repo, stack("web"), "web", team.alice)
    source = load_with(mode="every-commit")
    source.load()
    unsigned = git_commit(repo, stack("api"), "api")
    git_commit(repo, stack("db"), "db", team.bob)
    refused(source)

    def no_process(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(verify.subprocess, "run", no_process)
    assert refused(source).commit == unsigned, "the same refusal from cached results"
    monkeypatch.undo()
    git_commit(repo, stack("api"), "api again", team.bob)
    git_tag(repo, "fix", unsigned, team.bob)  # a signed tag on the unsigned commit makes it count
    source.load()
    monkeypatch.setattr(verify.subprocess, "run", no_process)
    source.load()


# --- settings -------------------------------------------------------------------------------------------------


def test_keys_that_cannot_be_used_are_one_line_naming_the_file(team: Team, repo: Path, load_with: Open) -> None:
    git_commit(repo, stack("web"), "web", team.alice)
    junk = repo.parent / "junk.txt"
    junk.write_text("not a key\n")
    with pytest.raises(VerifyKeyError, match=re.escape(f"verify.keys: {junk} holds no OpenPGP or SSH public key")):
        load_with(mode="head", keys=[str(junk)]).load()
    with pytest.raises(VerifyKeyError, match=re.escape("verify.keys: cannot read /nonexistent.asc")):
        load_with(mode="head", keys=["/nonexistent.asc"]).load()


def test_verify_needs_keys_and_a_git_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode head needs at least one key file"):
        VerifyConfig(mode="head")
    cfg = AgentConfig(source=str(tmp_path), state_dir=str(tmp_path), verify={"mode": "head", "keys": ["k"]})
    with pytest.raises(SourceConfigError, match="signatures are checked on git sources only"):
        open_source(cfg)


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("stacks/prod/**", "stacks/prod/web.dab", True),
        ("stacks/prod/**", "stacks/prod/a/b.dab", True),
        ("stacks/prod/**", "stacks/production/web.dab", False),
        ("stacks/*.dab", "stacks/web.dab", True),
        ("stacks/*.dab", "stacks/prod/web.dab", False),
        ("stacks/?eb.dab", "stacks/web.dab", True),
        ("**/secret.dab", "a/b/secret.dab", True),
        ("stacks/web.dab", "stacks/web_dab", False),
    ],
)
def test_rule_globs(glob: str, path: str, matches: bool) -> None:
    assert bool(glob_pattern(glob).fullmatch(path)) is matches


def test_verify_from_the_environment_over_the_file(tmp_path: Path) -> None:
    from agent.config import ConfigError, load_config

    file = tmp_path / "agent.yaml"
    file.write_text("verify:\n  mode: head\n  keys: [/etc/dabctl/alice.asc]\n")
    env = {"DABCTL_VERIFY__MODE": "every-commit", "DABCTL_VERIFY__KEYS": "/a.pub,/b.pub"}
    cfg = load_config(file, {}, environ=env)
    assert (cfg.verify.mode, cfg.verify.keys) == ("every-commit", ["/a.pub", "/b.pub"])
    cfg = load_config(None, {}, environ={"DABCTL_VERIFY": '{"mode": "head", "keys": ["/k.pub"]}'})
    assert cfg.verify.mode == "head"
    with pytest.raises(ConfigError, match="DABCTL_VERIFY__MOOD: no such setting"):
        load_config(None, {}, environ={"DABCTL_VERIFY__MOOD": "head"})
