"""The nftables ruleset against the real `nft` and kernel, in a throw-away network namespace (no Docker needed):
what is written reads back the same, node settings come and go with the last port, others' rules stay."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from agent.drivers.nftables import TABLE, Nft, NftRuleset
from reconcilers.loadbalancer import Backend, BalancerUnavailable, Frontend, plan
from tests.support.netns import entered, run_in

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WEB = Frontend(protocol="tcp", port=30000, stack="shop", service="web", target=8080)
DNS = Frontend(protocol="udp", port=30053, stack="shop", service="dns", target=53)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"dabctl-nft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # A new namespace copies the host's IPv4 settings: start from the kernel's default whatever the host has.
        run_in(name, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=0")
        with entered(name):
            yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def backends(n: int) -> tuple[Backend, ...]:
    return tuple(sorted(Backend(f"10.250.{i // 250}.{i % 250 + 1}", 8080) for i in range(n)))


def sh(netns: str, *argv: str) -> str:
    proc = run_in(netns, *argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "balance",
    [
        {WEB: ()},
        {WEB: backends(1)},
        {WEB: backends(3), DNS: (Backend("10.250.9.9", 53),)},
        {WEB: backends(1000)},
    ],
    ids=["no-backend-yet", "one", "tcp-and-udp", "a-thousand"],
)
def test_what_is_written_reads_back_the_same(netns: str, balance: dict[Frontend, tuple[Backend, ...]]) -> None:
    rules = NftRuleset("owner-1")
    assert rules.read() == {}
    rules.write(balance, plan(balance, {}))
    assert rules.read() == balance


def test_node_settings_exist_exactly_while_a_port_is_published(netns: str) -> None:
    sh(netns, "iptables", "-N", "DOCKER-USER")  # as Docker makes it
    rules = NftRuleset("owner-1")
    assert sh(netns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip() == "0"
    for _ in range(2):  # a second write adds nothing twice
        rules.write({WEB: backends(2)}, [])
        assert sh(netns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip() == "1"
        assert sh(netns, "iptables", "-S", "DOCKER-USER").count("dabctl routing mesh") == 1
    assert 'iifname != "lo" ip daddr 127.0.0.0/8 drop' in sh(netns, "nft", "list", "table", "ip", TABLE)

    rules.write({}, [])
    assert run_in(netns, "nft", "list", "table", "ip", TABLE).returncode != 0
    assert sh(netns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip() == "0"
    assert "dabctl" not in sh(netns, "iptables", "-S", "DOCKER-USER")


def test_route_localnet_that_was_on_before_stays_on(netns: str) -> None:
    sh(netns, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1")
    rules = NftRuleset("owner-1")
    rules.write({WEB: ()}, [])
    rules.write({}, [])
    assert sh(netns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip() == "1"


def test_without_docker_user_there_is_nothing_to_open(netns: str) -> None:
    rules = NftRuleset("owner-1")
    rules.write({WEB: backends(1)}, [])
    assert rules.read() == {WEB: backends(1)}
    assert run_in(netns, "iptables", "-S", "DOCKER-USER").returncode != 0


def test_others_tables_are_untouched(netns: str) -> None:
    sh(netns, "nft", "add table inet mine; add chain inet mine c { type nat hook prerouting priority -100; }; "
       "add rule inet mine c tcp dport 30000 counter")  # fmt: skip
    sh(netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "1", "-j", "RETURN")
    before = sh(netns, "nft", "list", "ruleset")
    rules = NftRuleset("owner-1")
    rules.write({WEB: backends(2)}, [])
    rules.write({}, [])
    assert sh(netns, "nft", "list", "ruleset") == before


def test_a_table_of_another_state_is_refused_not_overwritten(netns: str) -> None:
    NftRuleset("owner-1").write({WEB: backends(1)}, [])
    other = NftRuleset("owner-2")
    with pytest.raises(BalancerUnavailable, match="belongs to another dabctl state"):
        other.read()
    with pytest.raises(BalancerUnavailable, match="belongs to another dabctl state"):
        other.write({DNS: ()}, [])
    assert NftRuleset("owner-1").read() == {WEB: backends(1)}


def test_a_missing_nft_is_one_clear_error(netns: str) -> None:
    rules = NftRuleset("owner-1", Nft(nft="nft-not-installed"))
    with pytest.raises(BalancerUnavailable, match="nft-not-installed not found; install nftables"):
        rules.read()


def test_a_table_named_dabctl_that_dabctl_did_not_write_is_refused(netns: str) -> None:
    sh(netns, "nft", f"add table ip {TABLE}; add chain ip {TABLE} mine {{ type filter hook input priority 0; }}")
    before = sh(netns, "nft", "list", "ruleset")
    rules = NftRuleset("owner-1")
    with pytest.raises(BalancerUnavailable, match="exists that dabctl did not write"):
        rules.read()
    with pytest.raises(BalancerUnavailable, match="exists that dabctl did not write"):
        rules.write({WEB: ()}, [])
    assert sh(netns, "nft", "list", "ruleset") == before
