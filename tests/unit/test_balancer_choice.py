"""Which balancer backend a node gets, and what it listens on already (pure reads of /proc)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.drivers import balancer as choice
from agent.drivers.ipvs import IpvsRuleset
from agent.drivers.nftables import NftRuleset


@pytest.mark.parametrize(
    ("kind", "kernel_has_ipvs", "expected"),
    [
        ("nftables", True, NftRuleset),
        ("ipvs", False, IpvsRuleset),
        ("auto", True, IpvsRuleset),
        ("auto", False, NftRuleset),
    ],
)
def test_the_backend_follows_the_config_and_auto_the_kernel(
    monkeypatch: pytest.MonkeyPatch, kind: str, kernel_has_ipvs: bool, expected: type
) -> None:
    probes: list[bool] = []
    monkeypatch.setattr(choice, "ipvs_available", lambda: probes.append(True) or kernel_has_ipvs)
    balancer = choice.open_balancer(kind, "own1")
    assert balancer is not None
    assert probes == []  # nothing is probed (no module loaded) before a port is read or written
    ruleset = balancer.ruleset.chosen if isinstance(balancer.ruleset, choice.Auto) else balancer.ruleset
    assert isinstance(ruleset, expected)
    assert balancer.ruleset.name == ("ipvs" if expected is IpvsRuleset else "nftables")


def test_none_publishes_nothing() -> None:
    assert choice.open_balancer("none", "own1") is None


def test_listening_ports_come_from_every_proc_net_table(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(
        header
        + "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n"
        + "   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2\n"
    )
    (tmp_path / "tcp6").write_text(
        header + "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0 3\n"
    )
    (tmp_path / "udp").write_text(header + "   0: 00000000:0035 00000000:0000 07 00000000:00000000 0 0 0 0 0 4\n")
    # udp6 missing: skipped
    assert choice.listening_ports(tmp_path) == {("tcp", 8080), ("tcp", 80), ("udp", 53)}
