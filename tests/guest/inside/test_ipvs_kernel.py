"""The IPVS backend against a real kernel (Debian's, in the qemu guest): what it applies is read back through
netlink, /proc/net/ip_vs and ipvsadm; changes are differences; rules it did not create stay; and two backends in
their namespaces answer requests sent to the published port, from elsewhere, from the node and from localhost
(which the table DNATs: IPVS does not forward loopback sources)."""

from __future__ import annotations

import re

import pytest

from agent.drivers.balancer import open_balancer
from agent.drivers.ipvs import Dest, Service, ipvs_available, mark_of
from agent.drivers.nftables import Nft, NftRuleset
from reconcilers.loadbalancer import Frontend
from tests.guest.inside.conftest import B1, B2, B3, NAMES, NODE, OWNER, Rig, ask, proc_ip_vs, services, sh

WEB = Frontend(protocol="tcp", port=30080, stack="shop", service="web", target=8080)
DNS = Frontend(protocol="udp", port=30053, stack="shop", service="dns", target=8080)
WEB_MARK, DNS_MARK = mark_of("tcp", 30080), mark_of("udp", 30053)


def answers(netns: str | None, address: str, frontend: Frontend, n: int = 4) -> set[str]:
    return {ask(netns, address, frontend.port, frontend.protocol) for _ in range(n)}


def test_the_guest_kernel_has_ipvs_and_auto_picks_it() -> None:
    assert ipvs_available()
    # The unit test fakes the kernel probe; here the real one decides.
    balancer = open_balancer("auto", "own1")
    assert balancer is not None and balancer.ruleset.name == "ipvs"


def test_apply_and_read_back_through_netlink_proc_and_ipvsadm(ipvs: Rig) -> None:
    ipvs.ruleset.write({WEB: (B1, B2), DNS: (B2,)}, [])
    assert ipvs.ruleset.read() == {WEB: (B1, B2), DNS: (B2,)}
    live = services()
    assert live[WEB_MARK] == Service(WEB_MARK, "rr", (Dest(B1.address, 8080, 1), Dest(B2.address, 8080, 1)))
    assert live[DNS_MARK] == Service(DNS_MARK, "rr", (Dest(B2.address, 8080, 1),))
    proc = proc_ip_vs()
    assert proc[WEB_MARK][0] == "rr"
    assert sorted(proc[WEB_MARK][1]) == [(B1.address, 8080, "Masq", 1), (B2.address, 8080, "Masq", 1)]
    assert proc[DNS_MARK] == ("rr", [(B2.address, 8080, "Masq", 1)])
    listing = sh("ipvsadm", "-Ln")
    assert re.search(rf"^FWM\s+{WEB_MARK}\s+rr\s*$", listing, re.M), listing
    assert re.search(rf"^\s+->\s+{B1.address}:8080\s+Masq\s+1\s", listing, re.M), listing
    table = sh("nft", "list", "table", "ip", "dabctl")
    assert f"meta mark set {WEB_MARK:#010x}" in table and f"meta mark set {DNS_MARK:#010x}" in table
    with open("/proc/sys/net/ipv4/vs/conntrack") as f:
        assert f.read().strip() == "1"


def test_a_second_apply_with_nothing_changed_sends_no_netlink_writes(ipvs: Rig) -> None:
    desired = {WEB: (B1, B2), DNS: (B2,)}
    ipvs.ruleset.write(desired, [])
    assert len(ipvs.netlink.writes) == 5 and len(ipvs.nft.scripts) == 1
    ipvs.netlink.writes.clear()
    ipvs.nft.scripts.clear()
    ipvs.ruleset.write(desired, [])
    assert ipvs.netlink.writes == []
    assert ipvs.nft.scripts == []
    assert ipvs.ruleset.read() == desired


def test_a_backend_change_rewrites_the_table_and_the_dests_and_an_unchanged_write_sends_nothing(
    ipvs: Rig, network: None
) -> None:
    ipvs.ruleset.write({WEB: (B1, B2)}, [])
    ipvs.netlink.writes.clear()
    ipvs.nft.scripts.clear()
    ipvs.ruleset.write({WEB: (B1, B3)}, [])
    assert ipvs.netlink.writes == [
        ("add_dest", WEB_MARK, Dest(B3.address, 8080)),
        ("del_dest", WEB_MARK, Dest(B2.address, 8080)),
    ]
    assert len(ipvs.nft.scripts) == 1, "the localhost chain holds the backends: the table is rewritten"
    assert sorted(proc_ip_vs()[WEB_MARK][1]) == [(B1.address, 8080, "Masq", 1), (B3.address, 8080, "Masq", 1)]
    table = sh("nft", "list", "table", "ip", "dabctl")
    assert B3.address in table and B2.address not in table, table
    assert answers("n3", NODE, WEB) == {NAMES[B1.address], NAMES[B3.address]}
    assert answers(None, "127.0.0.1", WEB) == {NAMES[B1.address], NAMES[B3.address]}
    ipvs.netlink.writes.clear()
    ipvs.nft.scripts.clear()
    ipvs.ruleset.write({WEB: (B1, B3)}, [])
    assert (ipvs.netlink.writes, ipvs.nft.scripts) == ([], [])
    assert ipvs.ruleset.read() == {WEB: (B1, B3)}


def test_removing_a_service(ipvs: Rig) -> None:
    ipvs.ruleset.write({WEB: (B1,), DNS: (B2,)}, [])
    ipvs.ruleset.write({WEB: (B1,)}, [])
    assert DNS_MARK not in proc_ip_vs() and WEB_MARK in proc_ip_vs()
    assert "30053" not in sh("nft", "list", "table", "ip", "dabctl")
    assert ipvs.ruleset.read() == {WEB: (B1,)}
    ipvs.ruleset.write({}, [])
    assert WEB_MARK not in proc_ip_vs()
    assert sh("nft", "list", "table", "ip", "dabctl", check=False) == ""


def test_draining_a_backend_gives_it_weight_zero(ipvs: Rig, network: None) -> None:
    ipvs.ruleset.write({WEB: (B1, B2)}, [])
    ipvs.ruleset.drain(WEB, [B2])
    assert sorted(proc_ip_vs()[WEB_MARK][1]) == [(B1.address, 8080, "Masq", 1), (B2.address, 8080, "Masq", 0)]
    assert re.search(rf"^\s+->\s+{B2.address}:8080\s+Masq\s+0\s", sh("ipvsadm", "-Ln"), re.M)
    assert ipvs.ruleset.read() == {WEB: (B1,)}
    assert answers("n3", NODE, WEB) == {NAMES[B1.address]}, "a drained backend takes no new connections"
    assert answers(None, "127.0.0.1", WEB) == {NAMES[B1.address]}, "not from localhost either"
    ipvs.ruleset.write({WEB: (B1,)}, [])
    assert proc_ip_vs()[WEB_MARK][1] == [(B1.address, 8080, "Masq", 1)]


def test_rules_the_backend_did_not_create_are_left_alone(ipvs: Rig) -> None:
    theirs = [
        ["-A", "-f", "16384", "-s", "rr"],  # kube-proxy's kind of mark
        ["-a", "-f", "16384", "-r", "10.99.1.2:9", "-m", "-w", "3"],
        ["-A", "-f", str(WEB_MARK + 0x00100000), "-s", "rr"],  # next to dabctl's range, not in it
        ["-A", "-t", f"{NODE}:80", "-s", "rr"],  # a service with a virtual address
        ["-a", "-t", f"{NODE}:80", "-r", "10.99.2.2:80", "-m"],
    ]
    for args in theirs:
        sh("ipvsadm", *args)
    sh("nft", "add table ip theirs; add chain ip theirs c { type filter hook prerouting priority 0; }")
    sh("nft", "add rule ip theirs c tcp dport 30080 counter")
    before = sh("ipvsadm", "-Sn")
    try:
        ipvs.ruleset.write({WEB: (B1, B2)}, [])
        ipvs.ruleset.write({WEB: (B3,), DNS: (B1,)}, [])
        assert ipvs.ruleset.read() == {WEB: (B3,), DNS: (B1,)}
        ipvs.ruleset.write({}, [])
        assert sh("ipvsadm", "-Sn") == before
        assert "tcp dport 30080 counter" in sh("nft", "list", "table", "ip", "theirs")
        assert ipvs.netlink.writes and all(w[1] in (WEB_MARK, DNS_MARK) for w in ipvs.netlink.writes)
    finally:
        sh("ipvsadm", "-D", "-f", "16384", check=False)
        sh("ipvsadm", "-D", "-f", str(WEB_MARK + 0x00100000), check=False)
        sh("ipvsadm", "-D", "-t", f"{NODE}:80", check=False)
        sh("nft", "delete table ip theirs", check=False)


def test_two_backends_answer_requests_to_the_published_port(ipvs: Rig, network: None) -> None:
    ipvs.ruleset.write({WEB: (B1, B2), DNS: (B1, B2)}, [])
    both = {NAMES[B1.address], NAMES[B2.address]}
    assert answers("n3", NODE, WEB) == both, "from a host elsewhere"
    assert answers(None, NODE, WEB) == both, "from the node itself"
    assert answers("n1", "10.99.1.1", WEB) == both, "from a backend, through the node (hairpin)"
    assert answers("n3", NODE, DNS) == both, "over UDP"


def test_localhost_is_answered_by_both_backends(ipvs: Rig, network: None) -> None:
    # IPVS will not send a loopback source to a backend elsewhere: the table DNATs localhost (agent/drivers/ipvs.py).
    ipvs.ruleset.write({WEB: (B1, B2), DNS: (B1, B2)}, [])
    both = {NAMES[B1.address], NAMES[B2.address]}
    assert route_localnet() == "1"
    assert answers(None, "127.0.0.1", WEB) == both
    assert answers(None, "127.0.0.1", DNS) == both, "over UDP"
    assert answers(None, "127.1.2.3", WEB) == both, "anywhere in 127.0.0.0/8"
    ipvs.ruleset.write({}, [])
    assert route_localnet() == "0", "the value found before dabctl comes back with the last port"
    with pytest.raises(ConnectionRefusedError):
        ask(None, "127.0.0.1", WEB.port)


def test_answers_forwarded_past_dockers_drop_need_the_docker_user_accept(ipvs: Rig, network: None) -> None:
    ipvs.ruleset.write({WEB: (B1,)}, [])
    rule = ["DOCKER-USER", "-m", "connmark", "--mark", "0x100000/0x100000"]
    rule += ["-m", "comment", "--comment", "dabctl routing mesh", "-j", "ACCEPT"]
    sh("iptables", "-C", *rule)
    sh("iptables", "-D", *rule)
    with pytest.raises(TimeoutError):
        ask("n3", NODE, WEB.port, timeout=1)
    ipvs.ruleset.write({WEB: (B1,)}, [])  # the write puts the accept back, sending IPVS nothing
    assert answers("n3", NODE, WEB, n=2) == {NAMES[B1.address]}
    ipvs.ruleset.write({}, [])
    assert "dabctl" not in sh("iptables", "-S", "DOCKER-USER")


def test_taking_over_from_the_nftables_backend(ipvs: Rig, network: None) -> None:
    nft_backend = NftRuleset(OWNER, runner=Nft())
    nft_backend.write({WEB: (B1,)}, [])
    assert answers("n3", NODE, WEB, n=2) == {NAMES[B1.address]}, "the nftables backend on this kernel"
    assert route_localnet() == "1"
    assert ipvs.ruleset.read() == {}
    ipvs.ruleset.write({WEB: (B2,)}, [])
    table = sh("nft", "list", "table", "ip", "dabctl")
    assert f"meta mark set {WEB_MARK:#010x}" in table and "chain lo_tcp_30080" in table, table
    assert route_localnet() == "1"
    assert answers("n3", NODE, WEB, n=2) == {NAMES[B2.address]}
    assert answers(None, "127.0.0.1", WEB, n=2) == {NAMES[B2.address]}
    ipvs.ruleset.write({}, [])
    assert route_localnet() == "0", "the value the nftables backend found"


def route_localnet() -> str:
    with open("/proc/sys/net/ipv4/conf/all/route_localnet") as f:
        return f.read().strip()
