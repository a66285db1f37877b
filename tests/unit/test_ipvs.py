"""The IPVS backend over a fake netlink layer that records what it would send, and a fake `nft` that keeps the
table it was given: desired sets applied, one backend changed (IPVS dests and the localhost chain), a service
removed, a second apply that sends nothing, drains, IPVS services outside dabctl's mark range left alone, and
either backend taking the other's table over. The same backend against a real kernel:
tests/guest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.drivers.ipvs import (
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
from agent.drivers.nftables import CT_MARK, NftError, NftRuleset, Programmed, parse, render
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

WEB = Frontend(protocol="tcp", port=30080, stack="shop", service="web", target=8080)
DNS = Frontend(protocol="udp", port=30053, stack="shop", service="dns", target=53)
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


_MAP = re.compile(r"map (\w+) \{[^}]*elements = \{ ([^}]*) \}")
_ELEMENT = re.compile(r"(\w+) \. (\d+) : jump (\w+)")
_CHAIN = re.compile(r"chain (\S+) \{\n(.*?)\n    \}", re.S)
_MARK = re.compile(r"meta mark set (0x[0-9a-f]+)")
_DNAT = re.compile(r"dnat ip addr \. port to numgen inc mod (\d+) map \{ ([^}]*) \}")
_TARGET = re.compile(r"(\d+) : ([\d.]+) \. (\d+)")
_COMMENT = re.compile(r'comment "([^"]+)"')


class FakeNft:
    """`nft -f` keeps the script's table; `nft -j list` answers in nft 1.0.6's JSON shape for the parts dabctl
    reads. `iptables` answers as where Docker is not installed (no DOCKER-USER chain)."""

    def __init__(self, script: str | None = None) -> None:
        self.script: str | None = None
        self.scripts: list[str] = []
        self.listed = 0
        self.iptables_calls: list[tuple[str, ...]] = []
        if script:
            self._keep(script)

    def nft(self, *args: str, script: str | None = None) -> str:
        if args[:2] == ("-f", "-"):
            assert script is not None
            if self.script is None:
                assert not script.startswith("delete table"), "nft: No such file or directory (delete table)"
            else:
                assert script.startswith("delete table"), "nft would add to the table there, not replace it"
            self.scripts.append(script)
            self._keep(script)
            return ""
        assert args == ("-j", "list", "table", "ip", "dabctl"), args
        self.listed += 1
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
        for name, elements in _MAP.findall(script):
            elem = [
                [{"concat": [proto, int(port)]}, {"jump": {"target": chain}}]
                for proto, port, chain in _ELEMENT.findall(elements)
            ]
            items.append({"map": {"family": "ip", "name": name, "table": "dabctl", "elem": elem}})
        for name, body in _CHAIN.findall(script):
            items.append({"chain": {"family": "ip", "table": "dabctl", "name": name}})
            for line in body.splitlines()[1 if "hook" in body else 0 :]:
                expr: list[dict[str, Any]] = []
                if m := _MARK.search(line):
                    expr.append({"mangle": {"key": {"meta": {"key": "mark"}}, "value": int(m.group(1), 16)}})
                if m := _DNAT.search(line):
                    pairs = [[int(i), {"concat": [a, int(p)]}] for i, a, p in _TARGET.findall(m.group(2))]
                    numgen = {"numgen": {"mode": "inc", "mod": int(m.group(1)), "offset": 0}}
                    expr.append({"dnat": {"family": "ip", "addr": {"map": {"key": numgen, "data": {"set": pairs}}}}})
                rule: dict[str, Any] = {"chain": name, "expr": expr}
                if m := _COMMENT.search(line):
                    rule["comment"] = m.group(1)
                items.append({"rule": rule})
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
    assert "numgen inc mod 2 map { 0 : 10.0.0.2 . 8080, 1 : 10.0.0.3 . 8080 }" in nft.scripts[0], "localhost"
    assert not nft.scripts[0].startswith("delete table"), "there was no table to delete"
    assert r.read() == {WEB: (A, B), DNS: (D1,)}
    assert sysctls["vs_conntrack"].read_text().strip() == "1"
    assert sysctls["sysctl"].read_text().strip() == "1", "localhost is DNATed, as in the nftables backend"


def test_a_second_apply_with_nothing_changed_sends_nothing(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B)}, [])
    netlink.sent.clear()
    r.write({WEB: (A, B)}, [])
    assert netlink.sent == []
    assert len(nft.scripts) == 1
    # Through the reconciler: observe, then a write with nothing changed, which needs no second read of the table.
    assert r.read() == {WEB: (A, B)}
    listed = nft.listed
    r.write({WEB: (A, B)}, [])
    assert (netlink.sent, len(nft.scripts), nft.listed) == ([], 1, listed)


def test_changing_one_backend_sends_that_change_and_rewrites_the_localhost_chain(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft()
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: (A, B), DNS: (D1,)}, [])
    netlink.sent.clear()
    r.write({WEB: (A, C), DNS: (D1,)}, [])
    web = mark_of("tcp", 30080)
    # The new backend is in before the old one goes.
    assert netlink.sent == [("add_dest", web, Dest("10.0.0.4", 8080)), ("del_dest", web, Dest("10.0.0.3", 8080))]
    assert len(nft.scripts) == 2, "the localhost chain holds the backends: the table is rewritten"
    assert nft.scripts[1].startswith("delete table ip dabctl\n")
    assert "0 : 10.0.0.2 . 8080, 1 : 10.0.0.4 . 8080" in nft.scripts[1] and "10.0.0.3" not in nft.scripts[1]
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
    netlink, nft = FakeNetlink(), FakeNft(render_marks({WEB: (A,)}, "own1", 0, exists=False))
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
    assert "10.0.0.3" not in (nft.script or ""), "nor from localhost"
    assert r.read() == {WEB: (A,)}, "a drained backend takes no new connections"
    netlink.sent.clear()
    scripts = len(nft.scripts)
    r.drain(WEB, [B])
    assert (netlink.sent, len(nft.scripts)) == ([], scripts), "draining twice sends nothing"
    # Wanted again: the plan adds it back, and the write restores its weight.
    actions = plan({WEB: (A, B)}, r.read())
    assert actions == [Rebalance(WEB, (A, B), (B,), ())]
    r.write({WEB: (A, B)}, actions)
    assert netlink.sent == [("set_dest", web, Dest("10.0.0.3", 8080, 1))]
    assert "1 : 10.0.0.3 . 8080" in (nft.script or "")
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
    moved = Frontend(protocol="tcp", port=30080, stack="shop", service="api", target=9090)
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


def test_taking_over_the_nftables_layout_keeps_the_route_localnet_value_it_recorded(sysctls: dict[str, Path]) -> None:
    sysctls["sysctl"].write_text("1\n")  # the nftables backend turned it on, having found 0
    netlink, nft = FakeNetlink(), FakeNft(render({WEB: (A,)}, "own1", 0, exists=False))
    r = ruleset(sysctls, netlink, nft)
    assert r.read() == {}, "DNAT rules are not marks"
    r.write({WEB: (A,)}, [Publish(WEB, (A,))])
    assert nft.scripts[0].startswith("delete table ip dabctl\n")
    assert f"meta mark set {mark_of('tcp', 30080):#010x}" in nft.scripts[0]
    assert 'drop comment "dabctl owner=own1 route_localnet_was=0"' in nft.scripts[0]
    assert sysctls["sysctl"].read_text().strip() == "1"
    assert r.read() == {WEB: (A,)}
    r.write({}, [Unpublish(WEB)])
    assert sysctls["sysctl"].read_text().strip() == "0", "the value found before either backend"
    assert nft.script is None


def test_an_ipvs_table_without_the_guard_gets_it_before_route_localnet_goes_on(sysctls: dict[str, Path]) -> None:
    # As an earlier release wrote it: no guard, the owner on the masquerade, route_localnet left alone.
    unguarded = re.sub(r"    chain guard \{.*?\n    \}\n", "", render_marks({WEB: ()}, "own1", 0), flags=re.S)
    unguarded = unguarded.replace(" masquerade", ' masquerade comment "dabctl owner=own1 route_localnet_was=0"')
    netlink, nft = FakeNetlink(), FakeNft(unguarded)
    r = ruleset(sysctls, netlink, nft)
    r.write({WEB: ()}, [])
    assert len(nft.scripts) == 1 and "chain guard" in nft.scripts[0]
    assert sysctls["sysctl"].read_text().strip() == "1"


def test_a_localhost_chain_that_disagrees_with_ipvs_is_not_read_and_the_write_mends_it(
    sysctls: dict[str, Path],
) -> None:
    # A crash after the netlink changes and before the table: IPVS balances to (A, C), localhost still to (A, B).
    web = mark_of("tcp", 30080)
    live = Service(web, "rr", (Dest("10.0.0.2", 8080), Dest("10.0.0.4", 8080)))
    netlink, nft = FakeNetlink([live]), FakeNft(render_marks({WEB: (A, B)}, "own1", 0, exists=False))
    r = ruleset(sysctls, netlink, nft)
    actual = r.read()
    assert actual == {}
    r.write({WEB: (A, C)}, plan({WEB: (A, C)}, actual))
    assert netlink.sent == []
    assert len(nft.scripts) == 1 and "10.0.0.3" not in nft.scripts[0]
    assert r.read() == {WEB: (A, C)}


def test_a_table_of_another_owner_is_refused(sysctls: dict[str, Path]) -> None:
    netlink, nft = FakeNetlink(), FakeNft(render_marks({WEB: (A,)}, "someone-else", 0))
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
    script = render_marks({WEB: (A, B), DNS: ()}, "own1", 0)
    assert script.startswith("delete table ip dabctl\ntable ip dabctl {"), "no `add table` first: it costs ~10 ms"
    assert script.count("fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @frontends") == 2
    assert "type filter hook prerouting priority -150" in script
    assert "type route hook output priority -150" in script
    assert f"ct mark and {CT_MARK:#x} == {CT_MARK:#x} masquerade" in script
    assert 'comment "dabctl stack=shop service=web target=8080"' in script
    assert render_marks({}, "own1", 0) == "delete table ip dabctl\n"
    assert not render_marks({WEB: (A,)}, "own1", 0, exists=False).startswith("delete")


def test_the_rendered_table_dnats_loopback_to_the_same_backends_behind_a_guard() -> None:
    script = render_marks({WEB: (A, B), DNS: ()}, "own1", 1)
    chains = dict(_CHAIN.findall(script))
    assert chains["localhost"].split("\n") == [
        "        type nat hook output priority -100; policy accept;",
        "        ip daddr 127.0.0.0/8 meta l4proto . th dport vmap @local",
    ]
    assert chains["lo_tcp_30080"].split("\n") == [
        f"        ct mark set ct mark or {CT_MARK:#x}",
        "        meta l4proto tcp dnat ip addr . port to numgen inc mod 2 map { 0 : 10.0.0.2 . 8080, 1 : 10.0.0.3 . 8080 }",
    ]
    assert chains["lo_udp_30053"].strip() == f"ct mark set ct mark or {CT_MARK:#x}", "no backends, no dnat"
    assert chains["guard"] == render({WEB: (A,)}, "own1", 1).split("chain guard {\n")[1].split("\n    }")[0]
    assert "comment" not in chains["lo_tcp_30080"], "identities are the mark rules' alone"


def test_marked_reads_frontends_localhost_backends_owner_and_guard_from_a_listing() -> None:
    table = marked(FakeNft.listing(render_marks({WEB: (A, B), DNS: ()}, "own1", 1)))
    assert table.programmed.balance == {WEB: (A, B), DNS: ()}
    assert (table.programmed.owner, table.programmed.route_localnet_was) == ("own1", 1)
    assert table.guarded and table.exists
    nft_layout = marked(FakeNft.listing(render({WEB: (A,)}, "own1", 0)))
    assert nft_layout.programmed.balance == {}, "DNAT without marks is the nftables layout"
    assert nft_layout.guarded


def test_the_nftables_backend_takes_the_ipvs_layout_over(sysctls: dict[str, Path]) -> None:
    # Its map names the frontends (not the localhost chains), without backends: it rebalances them, which
    # rewrites the table in its own layout and keeps the route_localnet value recorded before dabctl.
    sysctls["sysctl"].write_text("1\n")
    nft = FakeNft(render_marks({WEB: (A, B)}, "own1", 0, exists=False))
    assert parse(FakeNft.listing(nft.script or "")) == Programmed({WEB: ()}, "own1", 0)
    back = NftRuleset("own1", runner=nft, sysctl=sysctls["sysctl"])  # type: ignore[arg-type]
    assert back.read() == {WEB: ()}
    back.write({WEB: (A, B)}, [])
    assert "meta mark" not in nft.scripts[0] and "chain lo_" not in nft.scripts[0]
    assert back.read() == {WEB: (A, B)}
    back.write({}, [])
    assert sysctls["sysctl"].read_text().strip() == "0"


def test_ipvs_available_follows_the_proc_file(tmp_path: Path) -> None:
    proc = tmp_path / "ip_vs"
    proc.write_text("IP Virtual Server version 1.2.1 (size=4096)\n")
    assert ipvs_available(proc)
