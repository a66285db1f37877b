"""Join tokens: their shape, the role they grant, and that a secret is never shown by accident."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.node.join import ClusterSetupError, join_cluster
from schemas.config import AgentConfig
from schemas.join import InvalidToken, JoinToken, role_of, secret_digest


def test_a_token_has_the_final_shape_and_parses_back() -> None:
    token = JoinToken.new()
    text = str(token)
    assert text.startswith("DABCTL-1-none-") and len(token.secret) >= 25
    assert JoinToken.parse(text) == token
    pinned = JoinToken("ab" * 32, token.secret)
    assert JoinToken.parse(str(pinned)).ca_digest == "ab" * 32
    assert token.secret not in repr(token)


@pytest.mark.parametrize(
    "text",
    ["", "SWMTKN-1-none-" + "a" * 25, "DABCTL-2-none-" + "a" * 25, "DABCTL-1-none-short", "DABCTL-1-xyz-" + "a" * 25],
)
def test_other_strings_are_not_tokens(text: str) -> None:
    with pytest.raises(InvalidToken, match="not a dabctl join token"):
        JoinToken.parse(text)


def test_the_role_is_the_one_whose_digest_matches() -> None:
    worker, manager = JoinToken.new(), JoinToken.new()
    assert role_of(worker, worker.digest, manager.digest) == "worker"
    assert role_of(manager, worker.digest, manager.digest) == "manager"
    assert role_of(JoinToken.new(), worker.digest, manager.digest) is None
    assert role_of(worker, "", "") is None
    assert secret_digest(worker.secret) == worker.digest != worker.secret


def test_a_token_without_a_ca_digest_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    # No join runs in plain HTTP: a token that names no CA (an earlier version's cluster) is refused on the joining
    # node, with the way to a cluster that has one. The manager address is one nothing listens on.
    cfg = AgentConfig(state_dir=str(tmp_path / "state"), node_name="n2")
    with pytest.raises(ClusterSetupError, match=r"names no cluster CA.*`dabctl cluster init`"):
        join_cluster(cfg, str(JoinToken.new()), "127.0.0.1:9", "127.0.0.1")
    assert not (tmp_path / "state" / "cluster.json").exists()
