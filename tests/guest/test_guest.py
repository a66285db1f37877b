"""Each test here is one test of tests/guest/inside, run in the qemu guest with IPVS (conftest.py boots it once):
it passes when the inner test passed and fails with the inner failure's message otherwise."""

from __future__ import annotations

import pytest

from tests.guest.conftest import GuestRun, inner_tests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.parametrize("inner", inner_tests())
def test_in_guest(inner: str, guest_run: GuestRun) -> None:
    cases = guest_run.cases.get(inner)
    if not cases:
        pytest.fail(f"{inner} did not run in the guest; {guest_run.report()}")
    failed = [c for c in cases if c.outcome in ("failed", "error")]
    if failed:
        pytest.fail("\n\n".join(f"{c.name} {c.outcome} in the guest:\n{c.message}" for c in failed), pytrace=False)
    if all(c.outcome == "skipped" for c in cases):
        pytest.skip(f"skipped in the guest: {cases[0].message}")
