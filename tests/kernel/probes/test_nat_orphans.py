"""Orphans of NAT'd connections, on a real kernel (lab guest only).

Clients connect to a virtual IP:port that an nft DNAT rule in the server
namespace sends to the server's real address:port. The server's accepted
socket then has the entry's *reply* tuple (server -> client), which is not the
original tuple in either orientation: ctrace finds it only through the index
of NAT'd entries by reply tuple (docs/PROBES.md, "Orphans").

One LiveSource for this module (one bcc compile), closed when the module ends
so that the probes of test_probes.py's own fixture run alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from lab_toolkit import Conn, Topology, conntrack_list, in_netns, nft_apply, run, sysctls
from test_probes import TEST_RING_PAGES, Collector, dump, ns_inode, tuple_of

from ctrace import abi

VIP_V4, VIP_V6, VPORT, RPORT = "198.18.1.100", "2001:db8:ff:1::100", 80, 8080

# DNAT VIP:80 -> server:8080; the ip/ip6 families, which nft 0.9.8 (bullseye) takes too.
NFT_DNAT = f"""
table ip ctlab_nat {{
    chain pre {{
        type nat hook prerouting priority -100; policy accept;
        ip daddr {VIP_V4} tcp dport {VPORT} counter dnat to {{server_v4}}:{RPORT}
    }}
}}
table ip6 ctlab_nat6 {{
    chain pre {{
        type nat hook prerouting priority -100; policy accept;
        ip6 daddr {VIP_V6} tcp dport {VPORT} counter dnat to [{{server_v6}}]:{RPORT}
    }}
}}
"""

# FIN/RST the server sends, dropped on output before conntrack (-200) sees them
# (Topology.drop_fin_rst covers the incoming direction).
NFT_DROP_OUT = """
table inet ctlab_dropout {
    chain drop_out {  # not "out": a keyword to nft 0.9.8 (Debian 11)
        type filter hook output priority -300; policy accept;
        tcp flags & (fin | rst) != 0 counter drop
    }
}
"""


@pytest.fixture(scope="module")
def live(lab_out: str) -> Iterator[Tuple[object, Collector]]:
    from ctrace.sources.live import LiveSource

    t0 = time.monotonic()
    with open(os.path.join(lab_out, "nat-compile.log"), "w") as log:
        src = LiveSource(interval=0.1, ring_pages=TEST_RING_PAGES, verbose=True, log=log)
    with open(os.path.join(lab_out, "nat-plan.json"), "w") as f:
        json.dump({"plan": src.plan.to_json(), "startup_s": time.monotonic() - t0,
                   "compile_s": src.compile_seconds, "attach_s": src.attach_seconds}, f, indent=1)
    col = Collector(src)
    try:
        yield src, col
    finally:
        col.close()
        src.close()


def connect_vip(topo: Topology, src: str, n: int, vip: str, server) -> List[Conn]:  # type: ignore[no-untyped-def]
    """``n`` connections from ``src`` to vip:VPORT, each accepted by ``server``."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    conns = []
    for _ in range(n):
        with in_netns(topo.client_ns):
            c = socket.socket(family, socket.SOCK_STREAM)
        c.settimeout(10)
        c.bind((src, 0))
        c.connect((vip, VPORT))
        sport = c.getsockname()[1]
        conn = Conn(c, None, src, sport, vip, VPORT)
        conn.server = server.take(src, sport)
        conns.append(conn)
    topo._conns.extend(conns)
    return conns


def abort(socks: List[socket.socket]) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def test_dnat_orphans(live) -> None:  # type: ignore[no-untyped-def]
    src, col = live
    with Topology.create(prefix="ctnat") as topo:
        srv = topo.server_ns
        ino = ns_inode(srv)
        run(["ip", "route", "add", f"{VIP_V4}/32", "via", topo.server_v4], ns=topo.client_ns)
        run(["ip", "-6", "route", "add", f"{VIP_V6}/128", "via", topo.server_v6], ns=topo.client_ns)
        nft_apply(srv, NFT_DNAT.replace("{server_v4}", topo.server_v4).replace("{server_v6}", topo.server_v6))
        server4 = topo.tcp_server(port=RPORT)
        server6 = topo.tcp_server(port=RPORT, v6=True)
        t0 = col.mark()
        with sysctls({"net.netfilter.nf_conntrack_tcp_timeout_established": 60}, ns=srv):
            # closed by the server (the NAT'd side), and by the client (original side)
            by_server = (connect_vip(topo, topo.client_v4[0], 5, VIP_V4, server4)
                         + connect_vip(topo, topo.client_v6[0], 3, VIP_V6, server6))
            by_client = connect_vip(topo, topo.client_v4[1], 3, VIP_V4, server4)
            conns = by_server + by_client

            # control: the test really exercises NAT. Every entry's original tuple is
            # client -> VIP, its reply tuple is not the original inverted, and the
            # server socket's tuple is neither orientation of the original tuple.
            entries = {e.tuple: e for e in conntrack_list(srv) if e.proto == "tcp"}
            for c in conns:
                e = entries[c.tuple]
                inverted = {"src": c.dst, "dst": c.src, "sport": str(c.dport), "dport": str(c.sport)}
                assert dict(e.reply) != inverted, (c.tuple, e.reply)
                assert e.reply == {"src": topo.server_addr(":" in c.src), "dst": c.src,
                                   "sport": str(RPORT), "dport": str(c.sport)}, e.reply
                assert e.state == "ESTABLISHED"
                local = c.server.getsockname()[:2]
                assert local == (topo.server_addr(":" in c.src), RPORT)
                assert local not in ((c.src, c.sport), (c.dst, c.dport))

            topo.drop_fin_rst()
            nft_apply(srv, NFT_DROP_OUT)
            lost0 = src.lost_counts().get(abi.LostCause.MAP_FULL, 0)
            closed_at = time.monotonic()
            abort([c.server for c in by_server])
            abort([c.client for c in by_client])

            def orphans() -> np.ndarray:
                return col.select(ino, abi.Kind.ORPHAN, since=t0)

            col.wait(lambda: len(orphans()) >= len(conns), 5, "ORPHAN events")
            took = time.monotonic() - closed_at
            time.sleep(0.5)  # nothing more may come
            o = orphans()
            dump("nat-orphans", col.select(ino, None, since=t0),
                 f"sock_stats={src.sock_stats()} by_server={[c.tuple for c in by_server]} "
                 f"by_client={[c.tuple for c in by_client]} took={took:.3f}")
            assert sorted(tuple_of(r) for r in o) == sorted(c.tuple for c in conns)
            assert len(o) == len(conns) == 11
            assert took < 2.0, took
            assert (o["ct_state"] == abi.TcpState.ESTABLISHED).all()
            assert (o["sk_newstate"] == 7).all()
            out = run(["nft", "list", "table", "inet", "ctlab_dropout"], ns=srv)
            assert sum(int(x) for x in re.findall(r"counter packets (\d+)", out)) >= len(by_server)
            assert topo.dropped_fin_rst() >= len(by_client)
            assert src.lost_counts().get(abi.LostCause.MAP_FULL, 0) == lost0
