"""Make ctrace's bundled real recording (ctrace/data/incident-6.1.ctr) in a lab guest.

Not a test (its name keeps it out of the kernel suite): the lab runs it on request,

    python3 tests/vm/lab.py run -s bookworm --results /var/tmp/incident -- tests/kernel/incident/make_incident.py
    cp /var/tmp/incident/bookworm/incident.ctr ctrace/data/incident-6.1.ctr

and it reproduces the incident ctrace is for, while the real `ctrace record` runs
(inside the web server's network namespace, so its kernel counters and its listing of
existing entries are that table's):

- a web server (198.18.0.1:80) whose clients in 198.51.100.0/24 abort their
  connections, and whose FIN/RST are dropped before conntrack sees them: the entries
  stay ESTABLISHED (orphans) for the 5-day default timeout;
- healthy clients in 192.0.2.0/24 that close cleanly (FIN, TIME_WAIT);
- a flooding /24, 203.0.113.0/24, opening many connections at once;
- nf_conntrack_max = 200, so the table fills and new connections' SYNs are dropped
  (conntrack -S drop), the web clients' included.

It writes $CTRACE_LAB_OUT/incident.ctr, incident-truth.json (the ground truth it
generated and read from conntrack-tools) and incident-record.log (the recorder's stderr).
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List

from lab_toolkit import (
    PATH,
    Conn,
    Topology,
    abort_pending,
    close_client_only,
    close_fin,
    conntrack_count,
    conntrack_list,
    conntrack_stats,
    in_netns,
    nft_apply,
    run,
    sysctls,
)

TABLE_MAX = 200
WEB_PORT = 80
WEB_NET, FLOOD_NET, HEALTHY_NET = 0, 1, 2  # indexes into lab_toolkit.CLIENT_NETS_V4

# Only the web clients' FIN and RST are lost (a middlebox eats them), before conntrack (-200).
NFT_LOSE_WEB_FIN_RST = """
table inet incident_drop {
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        ip saddr 198.51.100.0/24 tcp flags & (fin | rst) != 0 counter drop
    }
}
"""


def prefix24(ip: str) -> str:
    return ip.rsplit(".", 1)[0] + ".0/24"


def start_recorder(ns: str, out: str, ready: str, log) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    """`ctrace record` as its own process in the server's netns (nsenter: the mount
    namespace, and so tracefs, stays the guest's)."""
    cmd = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "ctrace", "record",
           "-o", out, "--ready-file", ready]
    p = subprocess.Popen(cmd, stdout=log, stderr=log, env=dict(os.environ, PATH=PATH))
    deadline = time.monotonic() + 600
    while not os.path.exists(ready):
        assert p.poll() is None, f"ctrace record exited {p.returncode} before it was ready"
        assert time.monotonic() < deadline, "ctrace record never became ready"
        time.sleep(0.5)
    return p


def flood(topo: Topology, server, ips: List[str], n: int, wait: float = 1.5):  # type: ignore[no-untyped-def]
    """Start ``n`` connects from each of ``ips`` at once; after ``wait`` s return
    (established conns, sockets still in SYN_SENT). Unlike ``try_connect`` per
    address, every SYN leaves before anyone waits."""
    pending = []
    for ip in ips:
        for _ in range(n):
            with in_netns(topo.client_ns):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            c.bind((ip, 0))
            err = c.connect_ex((server.addr, server.port))
            assert err in (0, errno.EINPROGRESS), os.strerror(err)
            pending.append((ip, c))
    time.sleep(wait)
    _, writable, _ = select.select([], [c for _, c in pending], [], 0)
    done, stuck = [], []
    for ip, c in pending:
        if c in writable and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            sport = c.getsockname()[1]
            done.append(Conn(c, server.take(ip, sport), ip, sport, server.addr, server.port))
        else:
            stuck.append((ip, c))
    topo._conns.extend(done)  # closed with the topology
    return done, stuck


def test_make_incident(lab_out: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    tmp = "/tmp/incident"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rec_path = os.path.join(tmp, "incident.ctr")
    truth: Dict[str, object] = {"table_max": TABLE_MAX}
    generated: Counter = Counter()  # connections established, per /24
    orphaned: Counter = Counter()   # closed by the client with its RST lost, per /24
    refused: Counter = Counter()    # connects that never completed (table full), per /24
    # topology first: its names and routes; conntrack sees nothing before the server listens
    with Topology.create(prefix="incident") as topo:
        ns = topo.server_ns
        web = topo.client_ips(WEB_NET, 6)
        flooders = topo.client_ips(FLOOD_NET, 24)
        healthy = topo.client_ips(HEALTHY_NET, 2)
        server = topo.tcp_server(port=WEB_PORT)
        nft_apply(ns, NFT_LOSE_WEB_FIN_RST)
        # entries that exist before recording begins (the recording's initial listing)
        before_rec = topo.connect(healthy[0], 6, server)
        generated[prefix24(healthy[0])] += len(before_rec)
        with sysctls({"net.netfilter.nf_conntrack_max": TABLE_MAX}):
            stats0 = conntrack_stats(ns)
            with open(os.path.join(lab_out, "incident-record.log"), "w") as log:
                rec = start_recorder(ns, rec_path, os.path.join(tmp, "ready"), log)
                t_ready = time.monotonic()
                try:
                    time.sleep(2)
                    # 1. the web clients: requests whose closes conntrack never sees
                    for rnd in range(3):
                        for ip in web:
                            conns = topo.connect(ip, 5, server)
                            for c in conns:
                                c.client.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                            close_client_only(conns, rst=True)
                            generated[prefix24(ip)] += len(conns)
                            orphaned[prefix24(ip)] += len(conns)
                        # healthy clients close cleanly (FIN both ways, TIME_WAIT)
                        ok = topo.connect(healthy[1], 4, server)
                        close_fin(ok)
                        generated[prefix24(healthy[1])] += len(ok)
                        time.sleep(2)
                    count_before_flood = conntrack_count(ns)
                    # 2. the flood: every address of the /24 opens connections at once
                    stuck_all = []
                    for ips, n in ((flooders, 4), (flooders, 4), (web[:3], 2)):
                        # the last round: the table is full, web clients are refused too
                        done, stuck = flood(topo, server, ips, n)
                        for c in done:
                            generated[prefix24(c.src)] += 1
                        for ip, _ in stuck:
                            refused[prefix24(ip)] += 1
                        stuck_all += [c for _, c in stuck]
                    time.sleep(2.5)  # SYN retransmissions (1 s, 3 s) are dropped again
                    abort_pending(stuck_all)
                    time.sleep(1.5)
                finally:
                    rec.send_signal(signal.SIGTERM)
                    rec.wait(timeout=120)
                truth["recorded_s"] = round(time.monotonic() - t_ready, 1)
            stats1 = conntrack_stats(ns)
            entries = conntrack_list(ns, "ipv4")
            truth["conntrack_C"] = conntrack_count(ns)
        assert rec.returncode == 0, open(os.path.join(lab_out, "incident-record.log")).read()
        truth["count_before_flood"] = count_before_flood
        truth["existing_at_start"] = len(before_rec)
        truth["generated_per_24"] = dict(generated)
        truth["orphaned_per_24"] = dict(orphaned)
        truth["refused_connects_per_24"] = dict(refused)
        truth["conntrack_S_delta"] = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1}
        truth["conntrack_L_per_24"] = dict(Counter(prefix24(e.orig["src"]) for e in entries))
        truth["conntrack_L_states"] = dict(Counter(e.state for e in entries))
        truth["conntrack_L"] = len(entries)
        truth["nft_lost_fin_rst"] = sum(int(x) for x in re.findall(
            r"counter packets (\d+)", run(["nft", "list", "table", "inet", "incident_drop"], ns=ns)))
        truth["kernel"] = os.uname().release
    shutil.copy(rec_path, os.path.join(lab_out, "incident.ctr"))
    with open(os.path.join(lab_out, "incident-truth.json"), "w") as f:
        json.dump(truth, f, indent=1, sort_keys=True)
    report = subprocess.run([sys.executable, "-m", "ctrace", "report", "--json", "--top", "50", rec_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(os.path.join(lab_out, "incident-report.json"), "w") as f:
        f.write(report.stdout)
    print(json.dumps(truth, indent=1, sort_keys=True))
    assert report.returncode == 0, report.stderr
    assert truth["conntrack_L"] >= TABLE_MAX - 20
    assert truth["conntrack_S_delta"].get("drop", 0) > 0
