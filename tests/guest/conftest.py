"""The qemu guest for tests this host's kernel cannot run (it has no IPVS): booted once per session, it runs the
tests in tests/guest/inside with the project's own code against a stock Debian kernel, and each outer test here
reports one inner test's outcome. On the host, tests/guest/inside is not collected; in the guest
(DABCTL_GUEST=1) it is all that runs."""

from __future__ import annotations

import ast
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import qemu

INSIDE = Path(__file__).parent / "inside"
REPO = Path(__file__).parents[2]
IN_GUEST = os.environ.get("DABCTL_GUEST") == "1"
GUEST_TIMEOUT = 180  # boot, inner run and power-off; measured well under a minute here


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if not IN_GUEST and collection_path == INSIDE:
        return True
    return None


def inner_tests() -> list[str]:
    """`module::function` for every test function in tests/guest/inside, read from the source (no import)."""
    names = []
    for path in sorted(INSIDE.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.append(f"{path.stem}::{node.name}")
    return names


@dataclass(frozen=True)
class InnerCase:
    """One inner test case as JUnit reported it: passed, failed, error or skipped, with the message."""

    name: str
    outcome: str
    message: str


@dataclass(frozen=True)
class GuestRun:
    """The inner session: its cases by `module::function`, and the guest's console for when things went wrong."""

    cases: dict[str, list[InnerCase]]
    result: qemu.GuestResult

    def report(self) -> str:
        r = self.result
        return (
            f"guest exit {r.returncode}, boot {r.boot_seconds}s, whole run {r.seconds:.1f}s; console tail:\n"
            f"{r.tail(60)}"
        )


def parse_junit(path: Path) -> dict[str, list[InnerCase]]:
    cases: dict[str, list[InnerCase]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "")
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            child = case.find(kind)
            if child is not None:
                outcome = "failed" if kind == "failure" else kind
                message = f"{child.get('message', '')}\n{child.text or ''}".strip()
                break
        cases.setdefault(f"{module}::{name.split('[', 1)[0]}", []).append(InnerCase(name, outcome, message))
    return cases


@pytest.fixture(scope="session")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """Boot the guest once and run every inner test in it."""
    reason = qemu.missing()
    if reason:
        if os.environ.get("CI") or os.environ.get("DABCTL_REQUIRE_GUEST"):
            # The test command (.ci/run) installs what the guest needs: a skip there would hide a broken set-up.
            pytest.fail(f"the IPVS guest tests cannot run here: {reason}")
        pytest.skip(reason)
    kernel = qemu.find_kernel()
    assert kernel is not None
    guest = qemu.Guest(kernel, tmp_path_factory.mktemp("guest"))
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",  # its import alone is seconds of emulated CPU; nothing inside uses it
        "-o",
        "addopts=",
        "-q",
        "-rfEs",
        "--color=no",
        "--durations=0",
        "--timeout=60",
        "--junitxml=/tmp/out/junit.xml",
        str(INSIDE.relative_to(REPO)),
    ]
    env = {"DABCTL_GUEST": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = guest.run(argv, cwd=REPO, env=env, timeout=GUEST_TIMEOUT)
    junit = result.out / "junit.xml"
    cases = parse_junit(junit) if junit.is_file() else {}
    return GuestRun(cases, result)
