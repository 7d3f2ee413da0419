"""`ctrace doctor` on a real kernel (lab guest only; skipped elsewhere).

Each test builds the scenario in the toolkit's server namespace, runs doctor there
as a separate process (`ip netns exec NS python3 -m ctrace doctor --json`), checks
its findings against ground truth from conntrack-tools and ss, then collects a
bundle in the guest and checks that `--root BUNDLE` gives the same findings. The
bundles and the live JSON are left in $CTRACE_LAB_OUT/doctor/ so the host can
analyse them too (tests/unit/doctor/test_lab_bundles.py).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Dict, Optional, Tuple

from lab_toolkit import (
    PATH,
    Topology,
    abort_pending,
    conntrack_count,
    conntrack_list,
    conntrack_stats,
    nft_apply,
    run,
    sockets,
    sysctls,
)

# FIN and RST are dropped in both directions before conntrack (-200) sees them.
NFT_LOSE_FIN_RST = """
table inet ctdoc_drop {
    chain prerouting {
        type filter hook prerouting priority -300; policy accept;
        tcp flags & (fin | rst) != 0 counter drop
    }
    chain output {
        type filter hook output priority -300; policy accept;
        tcp flags & (fin | rst) != 0 counter drop
    }
}
"""

# A stateless filter: counts and accepts, nothing that needs conntrack.
NFT_STATELESS = """
table inet ctdoc_filter {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 8080 counter accept
        tcp dport 22 counter accept
    }
}
"""


def doctor(ns: str, *args: str, user: Optional[str] = None) -> Tuple[int, Dict[str, Any], str]:
    argv = ["ip", "netns", "exec", ns]
    if user:
        argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    argv += [sys.executable, "-m", "ctrace", "doctor", *args]
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
                         env=dict(os.environ, PATH=PATH))
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout) if "--json" in args else {}
    return res.returncode, doc, res.stdout + res.stderr


def found(doc: Dict[str, Any]) -> Dict[str, str]:
    return {f["id"]: f["severity"] for f in doc["findings"]}


def evidence(doc: Dict[str, Any], fid: str) -> Dict[str, Any]:
    return next(f["evidence"] for f in doc["findings"] if f["id"] == fid)


def out_dir(lab_out: str) -> str:
    path = os.path.join(lab_out, "doctor")
    os.makedirs(path, exist_ok=True)
    return path


def collect_and_compare(ns: str, lab_out: str, name: str, live: Dict[str, Any]) -> Dict[str, Any]:
    """Collect a bundle in `ns`, analyse it with --root, compare with the live run."""
    base = os.path.join(out_dir(lab_out), name)
    for suffix in (".tgz", ".live.json", ".bundle.json"):
        if os.path.exists(base + suffix):
            os.unlink(base + suffix)
    rc, _, text = doctor(ns, "--collect", base + ".tgz")
    assert rc == 0, text
    assert os.stat(base + ".tgz").st_mode & 0o777 == 0o600
    rc2, doc, _ = doctor(ns, "--json", "--root", base + ".tgz")
    assert rc2 == live["exit_code"], (rc2, live["exit_code"])
    assert found(doc) == found(live)
    with open(base + ".live.json", "w") as f:
        json.dump(live, f, indent=2)
    with open(base + ".bundle.json", "w") as f:
        json.dump(doc, f, indent=2)
    return doc


def _abort(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_lost_fin_rst_is_orphaned_established(topo: Topology, lab_out: str) -> None:
    srv = topo.server_ns
    lost_ip, live_ip = topo.client_v4[0], topo.client_v4[1]
    server = topo.tcp_server(8080)
    live = topo.connect(live_ip, 5, server)
    lost = topo.connect(lost_ip, 30, server)
    nft_apply(srv, NFT_LOSE_FIN_RST)
    for c in lost:  # both ends abort; both RSTs are dropped before conntrack
        _abort(c.client)
        assert c.server is not None
        _abort(c.server)
    time.sleep(1)
    run(["nft", "delete", "table", "inet", "ctdoc_drop"], ns=srv)

    # ground truth: conntrack still says ESTABLISHED, no socket is left
    est = [e for e in conntrack_list(srv, "ipv4") if e.proto == "tcp" and e.state == "ESTABLISHED"]
    assert sum(1 for e in est if e.orig["src"] == lost_ip) == 30
    ss = [s for s in sockets(srv) if s.state == "ESTAB"]
    assert sum(1 for s in ss if s.peer == lost_ip) == 0 and sum(1 for s in ss if s.peer == live_ip) == 5
    time.sleep(6)  # older than doctor's read window, so none is mistaken for a new connection

    rc, doc, text = doctor(srv, "--json")
    assert found(doc) == {"orphaned-established": "warning", "established-timeout-long": "info"}, text
    assert rc == 20 and doc["status"] == "warning"
    ev = evidence(doc, "orphaned-established")
    assert ev["orphaned_total"] == 30
    (addr,) = ev["addresses"]
    assert (addr["ip"], addr["conntrack_established"], addr["sockets_established"], addr["orphaned"]) == (
        topo.server_v4, 35, 5, 30)
    assert addr["peers"] == [{"peer": lost_ip, "orphaned": 30, "local_is": "server", "sockets_to_peer": 0}]
    assert "proc/net/nf_conntrack" not in {m["input"] for m in doc["missing"]}

    bundle = collect_and_compare(srv, lab_out, "orphans", doc)
    assert evidence(bundle, "orphaned-established")["addresses"][0]["orphaned"] == 30
    assert len(live) == 5


def test_small_max_under_load_is_table_near_full(topo: Topology, lab_out: str) -> None:
    srv = topo.server_ns
    server = topo.tcp_server(8080)
    with sysctls({"net.netfilter.nf_conntrack_max": 40}):
        done, stuck = topo.try_connect(topo.client_v4[0], 60, server, wait=3)
        assert stuck, "the table never filled"
        before = conntrack_stats(srv)
        rc, doc, text = doctor(srv, "--json")
        after = conntrack_stats(srv)
        count = conntrack_count(srv)
        bundle = collect_and_compare(srv, lab_out, "table-full", doc)
        # read twice: the SYNs still being retransmitted are still being dropped
        rc3, twice, _ = doctor(srv, "--json", "--interval", "3")
        abort_pending(stuck)
    got = found(doc)
    assert got["table-near-full"] == "critical", text
    assert rc == 21 and doc["status"] == "critical"
    allowed = {"table-near-full", "packets-dropped", "early-drop", "insert-failed", "established-timeout-long"}
    assert set(got) <= allowed, got
    ev = evidence(doc, "table-near-full")
    assert ev["max"] == 40 and ev["count"] >= 36 and abs(ev["count"] - count) <= 5
    totals = doc["tables"]["stats"]["totals"]
    assert before.get("drop", 0) <= totals["drop"] <= after.get("drop", 0)
    if totals["drop"]:  # the kernel counts a refused packet in `drop`
        assert got["packets-dropped"] == "critical"
        assert evidence(doc, "packets-dropped")["drop"] == totals["drop"]
    if totals.get("early_drop"):
        assert got["early-drop"] == "critical"
    if totals.get("insert_failed"):
        assert "insert-failed" in got
    assert found(bundle)["table-near-full"] == "critical"
    assert twice["tables"]["stats"]["interval_s"] >= 3 and rc3 == 21
    if "packets-dropped" in found(twice):
        ev2 = evidence(twice, "packets-dropped")
        assert ev2["grew_by"] == twice["tables"]["stats"]["growth"]["drop"] >= 0


def test_stateless_ruleset_is_conntrack_unneeded(lab_out: str) -> None:
    topo = Topology.create(prefix="ctd", conntrack=False)
    try:
        srv = topo.server_ns
        nft_apply(srv, NFT_STATELESS)
        server = topo.tcp_server(8080)
        topo.connect(topo.client_v4[0], 3, server)
        rc, doc, text = doctor(srv, "--json")
        got = found(doc)
        assert got.get("conntrack-unneeded") == "info", text
        assert set(got) <= {"conntrack-unneeded", "established-timeout-long"}
        assert rc == 0 and doc["status"] == "ok"
        ev = evidence(doc, "conntrack-unneeded")
        assert ev["count"] == 0  # nothing asked for tracking, so this namespace tracks nothing
        assert "ruleset/nft.txt" in ev["ruleset_sources"] and ev["rules_examined"] == 2
        collect_and_compare(srv, lab_out, "unneeded", doc)

        # the recommended commands work as printed (this suite's nft included)
        rec = next(f["recommendation"] for f in doc["findings"] if f["id"] == "conntrack-unneeded")
        for cmd in rec["commands"]:
            run(["sh", "-c", cmd], ns=srv)
        assert "notrack" in run(["nft", "list", "table", "inet", "notrack_all"], ns=srv)
        run(["nft", "delete", "table", "inet", "notrack_all"], ns=srv)

        # the same namespace with a stateful rule: conntrack is needed again
        nft_apply(srv, "table inet ctdoc_state {\n chain input {\n  type filter hook input priority 0;\n"
                       "  ct state established accept\n }\n}\n")
        rc, doc, _ = doctor(srv, "--json")
        assert "conntrack-unneeded" not in found(doc)
        assert doc["tables"]["rules"]["needs_conntrack_total"] >= 1
    finally:
        topo.destroy()


def test_without_root_names_what_it_could_not_read(topo: Topology) -> None:
    srv = topo.server_ns
    server = topo.tcp_server(8080)
    topo.connect(topo.client_v4[0], 3, server)
    rc, doc, text = doctor(srv, "--json", user="65534")
    missing = {m["input"]: m["reason"] for m in doc["missing"]}
    assert missing["proc/net/nf_conntrack"].startswith("permission denied"), text
    assert "proc/net/nf_conntrack" in missing and doc["tables"]["table"]["count"] >= 3
    checks = {c["name"]: c["ran"] for c in doc["checks"]}
    assert checks["table-size"] and not checks["orphans"] and not checks["table-contents"]
    assert rc in (0, 20)
    rc, _, text = doctor(srv, user="65534")
    assert "Could not read:" in text and "proc/net/nf_conntrack: permission denied" in text
