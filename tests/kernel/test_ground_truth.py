"""Ground truth: the toolkit's readings agree exactly with the workload.

Every later ctrace probe test compares its events with these readers, so
they must be exact on every lab kernel first.  Conntrack runs in the
server namespace only; the client namespace has no rules and no entries.
"""

from __future__ import annotations

from collections import Counter
from typing import List, Tuple

from lab_toolkit import (
    Conn,
    Topology,
    abort_pending,
    close_client_only,
    close_fin,
    close_rst,
    conntrack_count,
    conntrack_flush,
    conntrack_list,
    conntrack_stats,
    run,
    sockets,
    sysctls,
    wait_for,
)

PORT = 8080


def tcp_entries(topo: Topology, family: str = "ipv4"):  # type: ignore[no-untyped-def]
    return [e for e in conntrack_list(topo.server_ns, family) if e.proto == "tcp"]


def tuples(conns: List[Conn]) -> List[Tuple[str, str, int, int]]:
    return sorted(c.tuple for c in conns)


def test_established_from_three_networks(topo: Topology) -> None:
    """23 connections from 3 IPs in 3 /24s: exactly those tuples, ESTABLISHED."""
    server = topo.tcp_server(PORT)
    conns = []
    for ip, n in zip(topo.client_v4, (8, 8, 7)):
        conns += topo.connect(ip, n, server)
    assert len(conns) == 23

    entries = tcp_entries(topo)
    assert sorted(e.tuple for e in entries) == tuples(conns)
    assert {e.state for e in entries} == {"ESTABLISHED"}
    assert all("ASSURED" in e.flags for e in entries)
    # reply direction is the mirror image (no NAT)
    assert all(e.reply["src"] == e.orig["dst"] and e.reply["dport"] == e.orig["sport"]
               for e in entries)
    assert conntrack_count(topo.server_ns) == 23
    assert Counter(e.orig["src"] for e in entries) == Counter(
        {topo.client_v4[0]: 8, topo.client_v4[1]: 8, topo.client_v4[2]: 7})

    cli = [s for s in sockets(topo.client_ns) if s.pport == PORT]
    assert len(cli) == 23 and {s.state for s in cli} == {"ESTAB"}
    assert sorted((s.local, s.peer, s.lport, s.pport) for s in cli) == tuples(conns)
    srv = sockets(topo.server_ns)
    assert Counter(s.state for s in srv) == Counter({"ESTAB": 23, "LISTEN": 1})
    # the client namespace has no conntrack hooks, so no entries
    assert conntrack_count(topo.client_ns) == 0


def test_ipv6_established(topo: Topology) -> None:
    """IPv6 from two /64s: exact tuples in the ipv6 table, none in ipv4."""
    server = topo.tcp_server(PORT, v6=True)
    conns = topo.connect(topo.client_v6[0], 6, server) + topo.connect(topo.client_v6[1], 5, server)
    entries = tcp_entries(topo, "ipv6")
    assert sorted(e.tuple for e in entries) == tuples(conns)
    assert {e.state for e in entries} == {"ESTABLISHED"}
    assert tcp_entries(topo, "ipv4") == []
    assert conntrack_count(topo.server_ns) == 11


def test_many_client_ips_per_network(topo: Topology) -> None:
    """Several addresses in each /24: per-source counts match exactly."""
    server = topo.tcp_server(PORT)
    expected: Counter = Counter()
    for net in range(3):
        for ip in topo.client_ips(net, 4, first=20):
            topo.connect(ip, 2, server)
            expected[ip] += 2
    entries = tcp_entries(topo)
    assert Counter(e.orig["src"] for e in entries) == expected
    assert conntrack_count(topo.server_ns) == 24


def test_clean_close_time_wait(topo: Topology) -> None:
    """FIN both ways: every entry goes TIME_WAIT, client sockets TIME-WAIT."""
    server = topo.tcp_server(PORT)
    conns = topo.connect(topo.client_v4[0], 7, server) + topo.connect(topo.client_v4[1], 5, server)
    close_fin(conns)
    entries = wait_for(lambda: [e for e in tcp_entries(topo) if e.state == "TIME_WAIT"]
                       if len(tcp_entries(topo)) == 12 and
                       all(e.state == "TIME_WAIT" for e in tcp_entries(topo)) else None,
                       what="12 TIME_WAIT entries")
    assert sorted(e.tuple for e in entries) == tuples(conns)
    cli = [s for s in sockets(topo.client_ns) if s.pport == PORT]
    assert Counter(s.state for s in cli) == Counter({"TIME-WAIT": 12})
    assert [s.state for s in sockets(topo.server_ns)] == ["LISTEN"]


def test_rst_close(topo: Topology) -> None:
    """SO_LINGER 0: RST, entries become CLOSE, no sockets left."""
    server = topo.tcp_server(PORT)
    conns = topo.connect(topo.client_v4[2], 9, server)
    close_rst(conns)
    wait_for(lambda: all(e.state == "CLOSE" for e in tcp_entries(topo)), what="CLOSE")
    entries = tcp_entries(topo)
    assert sorted(e.tuple for e in entries) == tuples(conns)
    assert {e.state for e in entries} == {"CLOSE"}
    assert all(e.timeout <= 10 for e in entries)  # nf_conntrack_tcp_timeout_close
    assert [s for s in sockets(topo.client_ns) if s.pport == PORT] == []
    assert [s.state for s in sockets(topo.server_ns)] == ["LISTEN"]


def test_fin_and_rst_dropped_before_conntrack(topo: Topology) -> None:
    """FIN/RST dropped at raw priority: conntrack keeps ESTABLISHED entries."""
    server = topo.tcp_server(PORT)
    fin = topo.connect(topo.client_v4[0], 5, server)
    rst = topo.connect(topo.client_v4[1], 4, server)
    topo.drop_fin_rst()
    close_client_only(fin)
    close_client_only(rst, rst=True)
    wait_for(lambda: topo.dropped_fin_rst() >= 9, what="9 dropped FIN/RST")

    entries = tcp_entries(topo)
    assert sorted(e.tuple for e in entries) == tuples(fin + rst)
    assert {e.state for e in entries} == {"ESTABLISHED"}
    srv = sockets(topo.server_ns)
    assert Counter(s.state for s in srv) == Counter({"ESTAB": 9, "LISTEN": 1})
    cli = [s for s in sockets(topo.client_ns) if s.pport == PORT]
    # RST-closed sockets are gone; FIN-closed ones wait for an ACK that
    # never comes
    assert sorted((s.local, s.peer, s.lport, s.pport) for s in cli) == tuples(fin)
    assert {s.state for s in cli} <= {"FIN-WAIT-1"}


def test_udp_unreplied(topo: Topology) -> None:
    """One datagram per source port to a silent sink: UNREPLIED udp entries."""
    sink = topo.udp_sink(5353)
    sent = topo.send_udp(topo.client_v4[0], 4, sink) + topo.send_udp(topo.client_v4[2], 3, sink)
    entries = wait_for(lambda: (lambda es: es if len(es) == 7 else None)(
        [e for e in conntrack_list(topo.server_ns, "ipv4") if e.proto == "udp"]),
        what="7 udp entries")
    assert sorted(e.tuple for e in entries) == sorted(sent)
    assert all("UNREPLIED" in e.flags and e.state is None for e in entries)
    assert conntrack_count(topo.server_ns) == 7


def test_short_timeouts(topo: Topology) -> None:
    """Per-namespace timeout sysctls show up in the entries' TTL."""
    with sysctls({"net.netfilter.nf_conntrack_tcp_timeout_established": 37,
                  "net.netfilter.nf_conntrack_udp_timeout": 11}, ns=topo.server_ns):
        server = topo.tcp_server(PORT)
        sink = topo.udp_sink(5353)
        topo.connect(topo.client_v4[0], 3, server)
        topo.send_udp(topo.client_v4[1], 2, sink)
        entries = conntrack_list(topo.server_ns, "ipv4")
        tcp = [e for e in entries if e.proto == "tcp"]
        udp = [e for e in entries if e.proto == "udp"]
        assert len(tcp) == 3 and all(25 <= e.timeout <= 37 for e in tcp)
        assert len(udp) == 2 and all(0 <= e.timeout <= 11 for e in udp)
    assert run(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_timeout_established"],
               ns=topo.server_ns).strip() == "432000"


def test_table_full_counts_drops(topo: Topology) -> None:
    """nf_conntrack_max=16 filled with ASSURED entries: new flows are dropped.

    Each refused UDP flow is one dropped packet: ``drop`` grows by exactly
    the number sent, nothing is inserted, nothing early-dropped.  Refused TCP
    connects never complete and add at least one drop each (SYN retries may
    add more).
    """
    server = topo.tcp_server(PORT)
    sink = topo.udp_sink(5353)
    with sysctls({"net.netfilter.nf_conntrack_max": 16}):
        held = topo.connect(topo.client_v4[0], 16, server)
        before = conntrack_stats(topo.server_ns)

        done, stuck = topo.try_connect(topo.client_v4[1], 7, server, wait=0.5)
        abort_pending(stuck)
        assert done == [] and len(stuck) == 7
        mid = conntrack_stats(topo.server_ns)
        assert mid["drop"] - before["drop"] >= 7

        topo.send_udp(topo.client_v4[2], 5, sink)
        after = wait_for(lambda: (lambda s: s if s["drop"] - mid["drop"] >= 5 else None)(
            conntrack_stats(topo.server_ns)), what="5 drops")
        assert after["drop"] - mid["drop"] == 5
        assert after["early_drop"] == before["early_drop"]
        assert after["insert_failed"] == before["insert_failed"]
        assert conntrack_count(topo.server_ns) == 16
        assert sorted(e.tuple for e in conntrack_list(topo.server_ns)) == tuples(held)


def test_delete_and_flush(topo: Topology) -> None:
    """``conntrack -D`` removes exactly one tuple, ``-F`` the rest."""
    server = topo.tcp_server(PORT)
    conns = topo.connect(topo.client_v4[0], 5, server)
    victim = conns[2]
    run(["conntrack", "-D", "-p", "tcp", "--orig-src", victim.src, "--orig-dst", victim.dst,
         "--sport", str(victim.sport), "--dport", str(victim.dport)], ns=topo.server_ns)
    assert sorted(e.tuple for e in tcp_entries(topo)) == tuples(
        [c for c in conns if c is not victim])
    conntrack_flush(topo.server_ns)
    assert conntrack_count(topo.server_ns) == 0
