"""Join tokens: their shape, the role they grant, and that a secret is never shown by accident."""

from __future__ import annotations

import pytest

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
