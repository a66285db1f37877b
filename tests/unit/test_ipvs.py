"""The IPVS backend over a fake netlink layer that records what it would send, and a fake `nft` that keeps the
table it was given: desired sets applied, one backend changed, a service removed, a second apply that sends
nothing, drains, and IPVS services outside dabctl's mark range left alone. The same backend against a real kernel:
tests/guest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.ipvs import (
    MARK_BASE,
    Dest,
    IpvsRuleset,
    Service,
    address_of,
    ipvs_available,
    mark_of,
    marked,
    render_marks,
)
from agent.nftables import CT_MARK, NftError, render
from reconcilers.loadbalancer import (
    Backend,
    BalancerUnavailable,
    Frontend,
    LoadBalancerReconciler,
    Publish,
    Rebalance,
    Unpublish,
    plan,
)
from reconcilers.outcome import Outcome

WEB = Frontend("tcp", 30080, "shop", "web", 8080)
DNS = Frontend("udp", 30053, "shop", "dns", 53)
A, B, C = Backend("10.0.0.2", 8080), Backend("10.0.0.3", 8080), Backend("10.0.0.4", 8080)
D1 = Backend("10.0.0.5", 53)
FOREIGN = 0x00004000  # kube-proxy's kind of mark: not dabctl's


class FakeNetlink:
    """IPVS as a dict of fwmark services; every call that would change the kernel is recorded."""

    def __init__(self, services: list[Service] | None = None, fail: str | None = None) -> None:
        self.table: dict[int, Service] = {s.mark: s for s in services or []}
        self.sent: list[tuple[Any, ...]] = []
        self.fail = fail

    def services(self) -> list[Service]:
        return list(self.table.values())

    def _record(self, *call: Any) -> None:
        if self.fail == call[0]:
            raise OSError(f"[Errno 22] Invalid argument ({call[0]})")
        self.sent.append(call)

    def add_service(self, mark: int, scheduler: str) -> None:
        self._record("add_service", mark, scheduler)
        assert mark not in self.table, "service exists"
        self.table[mark] = Service(mark, scheduler, ())

    def set_service(self, mark: int, scheduler: str) -> None:
        self._record("set_service", mark, scheduler)
        self.table[mark] = Service(mark, scheduler, self.table[mark].dests)

    def del_service(self, mark: int) -> None:
        self._record("del_service", mark)
        del self.table[mark]

    def _dests(self, mark: int, dests: list[Dest]) -> None:
        s = self.table[mark]
        self.table[mark] = Service(mark, s.scheduler, tuple(sorted(dests)))

    def add_dest(self, mark: int, dest: Dest) -> None:
        self._record("add_dest", mark, dest)
        assert all((d.address, d.port) != (dest.address, dest.port) for d in self.table[mark].dests)
        self._dests(mark, [*self.table[mark].dests, dest])

    def set_dest(self, mark: int, dest: Dest) -> None:
        self._record("set_dest", mark, dest)
        others = [d for d in self.table[mark].dests if (d.address, d.port) != (dest.address, dest.port)]
        self._dests(mark, [*others, dest])

    def del_dest(self, mark: int, dest: Dest) -> None:
        self._record("del_dest", mark, dest)
        self._dests(mark, [d for d in self.table[mark].dests if (d.address, d.port) != (dest.address, dest.port)])


_ELEMENT = re.compile(r"(\w+) \. (\d+) : jump (\w+)")
_MARK_RULE = re.compile(r'chain (fe_\S+) \{\s+meta mark set (0x[0-9a-f]+) .*comment "([^"]+)"')
_OWNER = re.compile(r'(masquerade|drop) comment "(dabctl owner=[^"]+)"')
_DNAT = re.compile(r"chain (fe_\S+) \{\s+ct mark set .*comment \"([^\"]+)\"")


class FakeNft:
    """`nft -f` keeps the script's table; `nft -j list` answers in nft 1.0.6's JSON shape for the parts dabctl
    reads. `iptables` answers as where Docker is not installed (no DOCKER-USER chain)."""

    def __init__(self, script: str | None = None) -> None:
        self.script: str | None = None
        self.scripts: list[str] = []
        self.iptables_calls: list[tuple[str, ...]] = []
        if script:
            self._keep(script)

    def nft(self, *args: str, script: str | None = None) -> str:
        if args[:2] == ("-f", "-"):
            assert script is not None
            self.scripts.append(script)
            self._keep(script)
            return ""
        assert args == ("-j", "list", "table", "ip", "dabctl"), args
        if self.script is None:
            raise NftError("Error: No such file or directory; did you mean table 'filter' in family ip?")
        return json.dumps(self.listing(self.script))

    def _keep(self, script: str) -> None:
        self.script = script if "table ip dabctl {" in script else None

    def iptables(self, *args: str) -> tuple[int, str]:
        self.iptables_calls.append(args)
        return 1, "iptables: No chain/target/match by that name."

    @staticmethod
    def listing(script: str) -> dict[str, Any]:
        items: list[dict[str, Any]] = [{"table": {"family": "ip", "name": "dabctl"}}]
        elements = [
            [{"concat": [proto, int(port)]}, {"jump": {"target": chain}}]
            for proto, port, chain in _ELEMENT.findall(script)
        ]
        items.append({"map": {"family": "ip", "name": "frontends", "table": "dabctl", "elem": elements}})
        for name in re.findall(r"chain (\S+) \{", script):
            items.append({"chain": {"family": "ip", "table": "dabctl", "name": name}})
        for kind, comment in _OWNER.findall(script):
            chain = "postrouting" if kind == "masquerade" else "guard"
            items.append({"rule": {"chain": chain, "expr": [], "comment": comment}})
        for chain, mark, comment in _MARK_RULE.findall(script):
            mangle = {"mangle": {"key": {"meta": {"key": "mark"}}, "value": int(mark, 16)}}
            items.append({"rule": {"chain": chain, "expr": [mangle], "comment": comment}})
        for chain, comment in _DNAT.findall(script):
            items.append({"rule": {"chain": chain, "expr": [], "comment": comment}})
        return {"nftables": items}


@pytest.fixture()
def sysctls(tmp_path: Path) -> dict[str, Path]:
    localnet, conntrack = tmp_path / "route_localnet", tmp_path / "vs_conntrack"
    localnet.write_text("0\n")
    conntrack.write_text("0\n")
    return {"sysctl": localnet, "vs_conntrack": conntrack}


def ruleset(sysctls: dict[str, Path], netlink: FakeNetlink, nft: FakeNft, owner: str = "own1") -> IpvsRuleset:
    return IpvsRuleset(owner, netlink=netlink, runner=nft, **sysctls)  # type: ignore[arg-type]


# --- marks ------------------------------------------------------------------------------------------------------

MARKS = {
    "tcp-30080": ("tcp", 30080, 0x0DA17580),
    "udp-53": ("udp", 53, 0x0DA20035),
    "sctp-max": ("sctp", 65535, 0x0DA3FFFF),
    "tcp-1": ("tcp", 1, 0x0DA10001),
}


@pytest.mark.parametrize(("protocol", "port", "mark"), MARKS.values(), ids=MARKS.keys())
def test_a_mark_is_its_protocol_and_port_in_dabctls_range(protocol: str, port: int, mark: int) -> None:
    assert mark_of(protocol, port) == mark
    assert address_of(mark) == (protocol, port)


@pytest.mark.parametrize("mark", [0, FOREIGN, 0x0DB17580, 0x0DA00050, 0x0DA40050, MARK_BASE, 0x0DA10000, 0x1DA17580])
def test_marks_outside_the_range_or_shape_are_not_dabctls(mark: int) -> None:
    assert address_of(mark) is None


# --- applying ---------------------------------------------------------------------------------------------------


def test_applying_a_desired_set_adds_services_dests_then_marks(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B), DNS: (D1,)}, [])
    web, dns = mark_of("tcp", 30080), mark_of("udp", 30053)
    assert netlink.sent == [
        ("add_service", web, "rr"),
        ("add_dest", web, Dest("10.0.0.2", 8080, 1)),
        ("add_dest", web, Dest("10.0.0.3", 8080, 1)),
        ("add_service", dns, "rr"),
        ("add_dest", dns, Dest("10.0.0.5", 53, 1)),
    ]
    assert len(nft.scripts) == 1
    assert f"meta mark set {web:#010x}" in nft.scripts[0] and f"meta mark set {dns:#010x}" in nft.scripts[0]
    assert r.read() == {WEB: (A, B), DNS: (D1,)}
    assert sysctls["vs_conntrack"].read_text().strip() == "1"
    assert sysctls["sysctl"].read_text().strip() == "0", "IPVS cannot serve loopback clients: route_localnet stays"


def test_a_second_apply_with_nothing_changed_sends_nothing(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B)}, [])
    netlink.sent.clear()
    r.write({WEB: (A, B)}, [])
    assert netlink.sent == []
    assert len(nft.scripts) == 1


def test_changing_one_backend_sends_only_that_change(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B), DNS: (D1,)}, [])
    netlink.sent.clear()
    r.write({WEB: (A, C), DNS: (D1,)}, [])
    web = mark_of("tcp", 30080)
    # The new backend is in before the old one goes.
    assert netlink.sent == [("add_dest", web, Dest("10.0.0.4", 8080)), ("del_dest", web, Dest("10.0.0.3", 8080))]
    assert len(nft.scripts) == 1, "the frontends did not change: the table is not rewritten"
    assert r.read() == {WEB: (A, C), DNS: (D1,)}


def test_removing_a_service_unmarks_first_then_deletes_it(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B), DNS: (D1,)}, [])
    netlink.sent.clear()
    order: list[str] = []
    nft_f = nft.nft

    def spy(*args: str, script: str | None = None) -> str:
        if args[0] == "-f":
            order.append("nft")
        return nft_f(*args, script=script)

    nft.nft = spy  # type: ignore[method-assign]
    netlink_del = netlink.del_service
    netlink.del_service = lambda mark: (order.append("del_service"), netlink_del(mark))[1]  # type: ignore[method-assign]
    r.write({WEB: (A, B)}, [])
    assert order == ["nft", "del_service"], "packets must stop being marked before their service goes"
    assert netlink.sent == [("del_service", mark_of("udp", 30053))]
    assert "30053" not in (nft.script or "")
    assert r.read() == {WEB: (A, B)}


def test_removing_the_last_service_deletes_the_table(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A,)}, [])
    r.write({}, [])
    assert nft.script is None
    assert netlink.table == {}
    assert r.read() == {}
    netlink.sent.clear()
    scripts = len(nft.scripts)
    r.write({}, [])
    assert (netlink.sent, len(nft.scripts)) == ([], scripts), "nothing there, nothing sent"


def test_services_outside_dabctls_mark_range_are_never_touched(sysctls: dict[str, Path]) -> None:
    theirs = [
        Service(FOREIGN, "wlc", (Dest("192.168.1.9", 80, 3),)),
        Service(0x0DB17580, "rr", (Dest("192.168.1.8", 80),)),  # next to the range, not in it
    ]
    netlink, nft = FakeNetlink(theirs), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A,)}, [])
    r.write({WEB: (B,)}, [])
    assert r.read() == {WEB: (B,)}
    r.write({}, [])
    touched = {call[1] for call in netlink.sent}
    assert touched == {mark_of("tcp", 30080)}
    assert [netlink.table[s.mark] for s in theirs] == theirs


def test_a_service_in_the_range_that_the_table_does_not_name_is_not_read_and_goes_on_write(
    sysctls: dict[str, Path],
) -> None:
    stray = Service(mark_of("tcp", 31000), "rr", (Dest("10.0.0.9", 80),))  # e.g. a crash between the two steps
    netlink, nft = FakeNetlink([stray]), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    assert r.read() == {}
    r.write({WEB: (A,)}, [])
    assert ("del_service", stray.mark) in netlink.sent
    assert set(netlink.table) == {mark_of("tcp", 30080)}


def test_a_marked_frontend_without_its_service_is_not_read(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft(render_marks([WEB], "own1", 0))
    r = ruleset(sysctls, netlink, nft)
    assert r.read() == {}
    actions = plan({WEB: (A,)}, r.read())
    assert actions == [Publish(WEB, (A,))]
    r.write({WEB: (A,)}, actions)
    assert r.read() == {WEB: (A,)}


def test_drain_is_weight_zero_and_the_next_write_decides(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B)}, [])
    netlink.sent.clear()
    r.drain(WEB, [B])
    web = mark_of("tcp", 30080)
    assert netlink.sent == [("set_dest", web, Dest("10.0.0.3", 8080, 0))]
    assert r.read() == {WEB: (A,)}, "a drained backend takes no new connections"
    netlink.sent.clear()
    r.drain(WEB, [B])
    assert netlink.sent == [], "draining twice sends nothing"
    # Wanted again: the plan adds it back, and the write restores its weight.
    actions = plan({WEB: (A, B)}, r.read())
    assert actions == [Rebalance(WEB, (A, B), (B,), ())]
    r.write({WEB: (A, B)}, actions)
    assert netlink.sent == [("set_dest", web, Dest("10.0.0.3", 8080, 1))]
    # Drained and then not wanted: the write removes it.
    r.drain(WEB, [B])
    netlink.sent.clear()
    r.write({WEB: (A,)}, [])
    assert netlink.sent == [("del_dest", web, Dest("10.0.0.3", 8080, 0))]


def test_a_changed_scheduler_is_set_back(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A,)}, [])
    web = mark_of("tcp", 30080)
    netlink.table[web] = Service(web, "wlc", netlink.table[web].dests)
    netlink.sent.clear()
    r.write({WEB: (A,)}, [])
    assert netlink.sent == [("set_service", web, "rr")]


def test_a_frontend_that_leads_elsewhere_keeps_its_service_and_gets_a_new_identity(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A,)}, [])
    moved = Frontend("tcp", 30080, "shop", "api", 9090)
    api = Backend("10.0.0.7", 9090)
    netlink.sent.clear()
    r.write({moved: (api,)}, [Unpublish(WEB), Publish(moved, (api,))])
    web = mark_of("tcp", 30080)
    assert netlink.sent == [("add_dest", web, Dest("10.0.0.7", 9090)), ("del_dest", web, Dest("10.0.0.2", 8080))]
    assert r.read() == {moved: (api,)}


def test_observe_plan_apply_converges_through_the_reconciler(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    lb = LoadBalancerReconciler(ruleset(sysctls, netlink, nft))
    for desired in ({WEB: (A, B), DNS: (D1,)}, {WEB: (B, C)}, {DNS: (D1,)}, {}):
        actual = lb.observe()
        results = lb.apply(actual, plan(desired, actual))
        assert all(res.outcome is not Outcome.FAILED for res in results)
        assert lb.observe() == desired
        assert plan(desired, lb.observe()) == []


# --- taking over, owners, errors ---------------------------------------------------------------------------------


def test_taking_over_the_nftables_layout_restores_route_localnet(sysctls: dict[str, Path]) -> None:
    sysctls["sysctl"].write_text("1\n")  # the nftables backend turned it on, having found 0
    netlink, nft = FakeNetlink(), FakeNft(render({WEB: (A,)}, "own1", 0))
    r = ruleset(sysctls, netlink, nft)
    assert r.read() == {}, "DNAT rules are not marks"
    r.write({WEB: (A,)}, [Publish(WEB, (A,))])
    assert sysctls["sysctl"].read_text().strip() == "0"
    assert "dnat" not in (nft.script or "") and "chain guard" not in (nft.script or "")
    assert r.read() == {WEB: (A,)}


def test_a_table_of_another_owner_is_refused(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft(render_marks([WEB], "someone-else", 0))
    r = ruleset(sysctls, netlink, nft)
    with pytest.raises(BalancerUnavailable, match="another dabctl state"):
        r.read()
    with pytest.raises(BalancerUnavailable, match="another dabctl state"):
        r.write({WEB: (A,)}, [])
    assert netlink.sent == []


def test_a_netlink_refusal_is_balancer_unavailable_and_fails_the_actions(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(fail="add_dest"), FakeNft()
    lb = LoadBalancerReconciler(ruleset(sysctls, netlink, nft))
    results = lb.apply({}, [Publish(WEB, (A,))])
    assert [(r.outcome, r.error) for r in results] == [
        (Outcome.FAILED, "IPVS refused a change: [Errno 22] Invalid argument (add_dest)")
    ]


def test_the_rendered_table_marks_every_packet_to_local_addresses_but_loopback() -> None:
    script = render_marks([WEB], "own1", 0)
    assert script.count("fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @frontends") == 2
    assert "type filter hook prerouting priority -150" in script
    assert "type route hook output priority -150" in script
    assert f"ct mark and {CT_MARK:#x} == {CT_MARK:#x} masquerade" in script
    assert 'comment "dabctl stack=shop service=web target=8080"' in script
    assert render_marks([], "own1", 0) == "add table ip dabctl\ndelete table ip dabctl\n"


def test_marked_reads_frontends_owner_and_guard_from_a_listing() -> None:
    table = marked(FakeNft.listing(render_marks([WEB, DNS], "own1", 1)))
    assert table.programmed.balance == {WEB: (), DNS: ()}
    assert (table.programmed.owner, table.programmed.route_localnet_was, table.guarded) == ("own1", 1, False)
    assert marked(FakeNft.listing(render({WEB: (A,)}, "own1", 0))).guarded


def test_ipvs_available_follows_the_proc_file(tmp_path: Path) -> None:
    proc = tmp_path / "ip_vs"
    proc.write_text("IP Virtual Server version 1.2.1 (size=4096)\n")
    assert ipvs_available(proc)
