"""ctrace's probes against ground truth, on a real kernel (lab guest only).

One LiveSource per boot (a bcc compile costs ~35 s under emulation): the
session fixture starts it after creating some connections (they must come
back as EXISTING), and a poller thread drains it every 100 ms. Each test
builds its own namespaces, so its events are picked out by netns inode.

Expiry. The kernel's gc worker decides when an expired entry leaves the table: with
the reworked gc (backported to 5.10 stable) it rescans only every 120 s when little
expires (GC_SCAN_INTERVAL), so tests that wait for expiry run a `table_reader`: it
reads the table every 150 ms, and a dump kills the expired entries it meets
(`cat /proc/net/nf_conntrack`: ct_seq_show -> nf_ct_should_gc -> nf_ct_kill, since
"netfilter: evict stale entries when user reads /proc/net/nf_conntrack", 4.9;
`conntrack -L`: ctnetlink_dump_table does the same), as a busy machine's lookups and
monitoring do anyway. Those removals pass no delete/early-drop/netns path and the entry's
timeout has passed, so ctrace reports them as TIMEOUT, like the gc worker's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

from lab_toolkit import (
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
    sysctls,
    wait_for,
)

from ctrace import abi
from ctrace.sources.live import RINGBUF_RECORD_BYTES

TEST_RING_PAGES = 256  # 1 MiB: small enough that the loss test can overflow it


# With a table_reader running, an expired entry leaves within ~0.2 s of its timeout;
# this is the slack for emulation (without the reader the gc worker may take 120 s+).
EXPIRY_WAIT_S = 30

# Runs in a namespace: read the conntrack table every PERIOD s for at most LIMIT s.
_READER = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
period, limit = float(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + limit
proc = os.path.exists("/proc/net/nf_conntrack")
reads = 0
try:
    while time.monotonic() < end:
        if proc:
            with open("/proc/net/nf_conntrack") as f:
                f.read()
        else:
            subprocess.run(["conntrack", "-L"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reads += 1
        time.sleep(period)
finally:
    print(("proc" if proc else "conntrack -L"), reads, flush=True)
"""


@contextlib.contextmanager
def table_reader(ns: str, period: float = 0.15, limit: float = 600) -> Iterator[dict]:
    """Read `ns`'s conntrack table every `period` s while the body runs (see the module
    docstring): expired entries leave at once instead of at the gc worker's next scan.
    Yields a dict that gets "how" (/proc or conntrack -L) and "reads" at the end."""
    info: dict = {}
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _READER, str(period), str(limit)],
                         stdout=subprocess.PIPE, text=True)
    try:
        yield info
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=30)
        how, _, reads = out.strip().rpartition(" ")
        info.update(how=how, reads=int(reads or 0))


def ns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def ip16(ip: str) -> bytes:
    b = ipaddress.ip_address(ip).packed
    return b + bytes(16 - len(b))


def tuple_of(rec: np.void) -> Tuple[str, str, int, int]:
    fam = int(rec["family"])
    n = 4 if fam == abi.AF_INET else 16
    src = str(ipaddress.ip_address(bytes(rec["orig_src"][:n])))
    dst = str(ipaddress.ip_address(bytes(rec["orig_dst"][:n])))
    return (src, dst, int(rec["orig_sport_be"]), int(rec["orig_dport_be"]))


class Collector:
    """Drains the live source in a thread; `pause()` stands in for a stopped consumer."""

    def __init__(self, src) -> None:  # type: ignore[no-untyped-def]
        self.src = src
        self.lock = threading.Lock()
        self.parts: List[np.ndarray] = []
        self.paused = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            time.sleep(0.1)
            if self.paused.is_set():
                continue
            with self.lock:
                arr = self.src.poll()
                if len(arr):
                    self.parts.append(arr)

    def events(self) -> np.ndarray:
        with self.lock:
            if not self.parts:
                return abi.empty(0)
            if len(self.parts) > 1:  # copy the history only when it grew (the poller waits meanwhile)
                self.parts = [np.concatenate(self.parts)]
            return self.parts[0]

    def select(self, netns: int, kind: Optional[int] = None, since: int = 0) -> np.ndarray:
        """Events of one netns (inode numbers are reused: pass since=mark())."""
        ev = self.events()
        m = (ev["netns_ino"] == netns) & (ev["ts_boot_ns"] >= since)
        if kind is not None:
            m &= ev["kind"] == kind
        return ev[m]

    @staticmethod
    def mark() -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def wait(self, pred: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture(scope="session")
def live(lab_out: str) -> Iterator[Tuple[object, Collector, dict]]:
    from ctrace.sources.live import LiveSource

    pre = Topology.create(prefix="ctpre")
    server = pre.tcp_server(port=7000)
    server6 = pre.tcp_server(port=7000, v6=True)
    pre_conns = pre.connect(pre.client_v4[0], 5, server) + pre.connect(pre.client_v6[0], 3, server6)
    t0 = time.monotonic()
    with open(os.path.join(lab_out, "probe-compile.log"), "w") as log:
        src = LiveSource(interval=0.1, ring_pages=TEST_RING_PAGES, verbose=True, log=log)
    startup = time.monotonic() - t0
    with open(os.path.join(lab_out, "probe-plan.json"), "w") as f:
        json.dump({"plan": src.plan.to_json(), "startup_s": startup,
                   "compile_s": src.compile_seconds, "attach_s": src.attach_seconds,
                   "fentry_fallbacks": src.fentry_fallbacks}, f, indent=1)
    col = Collector(src)
    ctx = {"pre": pre, "pre_conns": pre_conns, "startup": startup}
    try:
        yield src, col, ctx
    finally:
        col.close()
        src.close()
        pre.destroy()


def dump(name: str, arr: np.ndarray, extra: str = "") -> None:
    """Write events as text to the guest's result directory (for post-mortems)."""
    out = os.environ.get("CTRACE_LAB_OUT", "/tmp")
    with open(os.path.join(out, f"events-{name}.txt"), "w") as f:
        f.write(extra + "\n")
        for r in arr:
            f.write(f"{int(r['ts_boot_ns'])} {abi.Kind(int(r['kind'])).name} ct={int(r['ct_id']):x} "
                    f"ns={int(r['netns_ino'])} {tuple_of(r)} proto={int(r['l4proto'])} "
                    f"state={int(r['ct_oldstate'])}->{int(r['ct_state'])} reason={int(r['reason'])} "
                    f"flags={int(r['flags'])} status={int(r['status_raw']):x} timeout={int(r['timeout_s'])}\n")


def per_ip(arr: np.ndarray) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in arr:
        ip = tuple_of(r)[0]
        out[ip] = out.get(ip, 0) + 1
    return out


def test_plan_required_attached(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    assert not src.plan.missing_required()
    names = {p.name: p for p in src.plan.probes}
    for n in ("confirm", "destroy", "alloc", "early_drop", "ctnetlink", "netns", "tcp_state", "sock"):
        assert names[n].attached, names[n]


# What the default plan must be, per lab suite, as measured by test_bcc_smoke.py
# (docs/KERNELS.md): fentry/fexit on nf_conntrack needs module BTF (5.11+) and
# a bcc with module kfunc support (not 0.18, not 0.26).
FENTRY_SUITES = {"trixie": True, "sid": True, "bullseye": False, "bookworm": False}
FUNCTION_PROBES = ("confirm", "delete", "destroy", "alloc", "early_drop", "ctnetlink", "netns", "tcp_state")
# Why ctrace must say fentry is impossible, per suite
NO_FENTRY_WHY = {"bullseye": "nf_conntrack is a module without BTF",
                 "bookworm": "resolves fentry targets in vmlinux BTF only"}


def expected_fentry() -> bool:
    suite = os.environ.get("CTRACE_LAB_SUITE", "")
    if suite not in FENTRY_SUITES:
        pytest.skip(f"no recorded expectation for suite {suite!r}")
    return FENTRY_SUITES[suite]


def test_attach_method_per_kernel(live) -> None:  # type: ignore[no-untyped-def]
    """The session's LiveSource (default plan) attached fentry/fexit exactly where
    the kernel and bcc allow it, with no fallback, and says why per probe."""
    src, col, ctx = live
    fentry = expected_fentry()
    for name in FUNCTION_PROBES:
        p = src.plan.probe(name)
        if not p.attached:
            continue
        if fentry:
            assert p.method in ("fentry", "fentry+fexit"), p
            assert "bcc attaches to module functions" in p.why, p
        else:
            assert p.method in ("kprobe", "kprobe+kretprobe"), p
    assert not src.fentry_fallbacks
    assert src.plan.probe("sock").method == "raw_tracepoint"


def test_probes_command_shows_the_plan() -> None:
    """`ctrace probes` (no compile) prints fentry where it will be used, and
    --attach-method fentry is refused, with the reason, where it cannot be."""
    fentry = expected_fentry()
    r = subprocess.run([sys.executable, "-m", "ctrace", "probes"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("*confirm"))
    assert ("fentry+fexit" in line) == fentry, r.stdout
    r = subprocess.run([sys.executable, "-m", "ctrace", "probes", "--attach-method", "fentry"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    if fentry:
        assert r.returncode == 0 and "cannot use fentry" not in r.stdout, r.stdout + r.stderr
    else:
        suite = os.environ["CTRACE_LAB_SUITE"]
        assert r.returncode == 11 and "cannot use fentry" in r.stdout, r.stdout + r.stderr
        assert NO_FENTRY_WHY[suite] in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "ctrace", "probes", "--attach-method", "kprobe"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0 and "fentry+fexit" not in r.stdout, r.stdout


def test_existing_entries(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    pre: Topology = ctx["pre"]
    ino = ns_inode(pre.server_ns)
    t0 = col.mark()
    ex = src.existing()
    mine = ex[ex["netns_ino"] == ino]
    want = sorted(c.tuple for c in ctx["pre_conns"])
    assert sorted(tuple_of(r) for r in mine) == want
    assert (mine["ct_state"] == abi.TcpState.ESTABLISHED).all()


def test_counts_per_ip_and_flush(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    with Topology.create() as topo:
        ino = ns_inode(topo.server_ns)
        t0 = col.mark()
        server = topo.tcp_server()
        server6 = topo.tcp_server(v6=True)
        want: Dict[str, int] = {}
        conns = []
        for i, ip in enumerate(topo.client_v4):
            n = 4 + 3 * i
            conns += topo.connect(ip, n, server)
            want[ip] = n
        conns += topo.connect(topo.client_v6[0], 6, server6)
        want[topo.client_v6[0]] = 6
        total = sum(want.values())
        col.wait(lambda: len(col.select(ino, abi.Kind.NEW, since=t0)) >= total, 10, "NEW events")
        time.sleep(0.5)
        new = col.select(ino, abi.Kind.NEW, since=t0)
        assert per_ip(new) == want
        truth = conntrack_list(topo.server_ns, "ipv4") + conntrack_list(topo.server_ns, "ipv6")
        truth_ip: Dict[str, int] = {}
        for e in truth:
            truth_ip[e.orig["src"]] = truth_ip.get(e.orig["src"], 0) + 1
        assert truth_ip == want
        assert sorted(tuple_of(r) for r in new) == sorted(c.tuple for c in conns)
        assert (new["flags"] & abi.FLAG_START_KNOWN).all()
        # aggregates agree
        agg = src.aggregates()
        agg = agg[agg["netns_ino"] == ino]
        got = {str(ipaddress.ip_address(bytes(a["addr"][:4] if a["family"] == abi.AF_INET else a["addr"])))
               : int(a["created"]) for a in agg}
        assert got == want

        conntrack_flush(topo.server_ns)
        col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= total, 10, "DESTROY after flush")
        time.sleep(0.5)
        d = col.select(ino, abi.Kind.DESTROY, since=t0)
        assert len(d) == total
        assert (d["reason"] == abi.DestroyReason.DELETE).all(), np.unique(d["reason"])
        assert (d["ct_state"] == abi.TcpState.ESTABLISHED).all()
        assert (d["flags"] & abi.FLAG_START_KNOWN).all()
        assert per_ip(d) == want


def test_fin_and_rst_closes(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    with Topology.create() as topo:
        ino = ns_inode(topo.server_ns)
        t0 = col.mark()
        with sysctls({"net.netfilter.nf_conntrack_tcp_timeout_time_wait": 3,
                      "net.netfilter.nf_conntrack_tcp_timeout_close": 3}, ns=topo.server_ns), \
                table_reader(topo.server_ns):
            server = topo.tcp_server()
            fin = topo.connect(topo.client_v4[0], 6, server)
            rst = topo.connect(topo.client_v4[1], 4, server)
            close_fin(fin)
            close_rst(rst)
            col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= 10, EXPIRY_WAIT_S,
                     "expiry of closed entries")
            time.sleep(0.5)
        d = col.select(ino, abi.Kind.DESTROY, since=t0)
        dump("fin-rst", col.select(ino, None, since=t0), f"fin={[c.tuple for c in fin]} rst={[c.tuple for c in rst]}")
        assert len(d) == 10
        assert (d["reason"] == abi.DestroyReason.TIMEOUT).all(), np.unique(d["reason"])
        by = {tuple_of(r): int(r["ct_state"]) for r in d}
        assert {by[c.tuple] for c in fin} == {abi.TcpState.TIME_WAIT}
        assert {by[c.tuple] for c in rst} == {abi.TcpState.CLOSE}
        # local aborts change the socket to CLOSE just before their RST passes
        # conntrack: no orphan may be reported for them
        assert len(col.select(ino, abi.Kind.ORPHAN, since=t0)) == 0
        st = col.select(ino, abi.Kind.STATE, since=t0)
        assert len(st) > 0
        assert set(st["ct_state"]) >= {abi.TcpState.TIME_WAIT, abi.TcpState.CLOSE}


def test_orphans_then_established_timeout(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    with Topology.create() as topo:
        ino = ns_inode(topo.server_ns)
        t0 = col.mark()
        with sysctls({"net.netfilter.nf_conntrack_tcp_timeout_established": 5}, ns=topo.server_ns):
            server = topo.tcp_server()
            conns = topo.connect(topo.client_v4[2], 5, server) + topo.connect(topo.client_v6[1], 3,
                                                                                topo.tcp_server(v6=True))
            topo.drop_fin_rst()
            # keep the connections quiet so that only the established timeout can end them
            closed_at = time.monotonic()
            close_client_only(conns, rst=True)
            time.sleep(2)
            dump("orphans", col.select(ino, None, since=t0), f"sock_stats={src.sock_stats()} conns={[c.tuple for c in conns]}")
            col.wait(lambda: len(col.select(ino, abi.Kind.ORPHAN, since=t0)) >= len(conns), 5, "ORPHAN events")
            took = time.monotonic() - closed_at
            o = col.select(ino, abi.Kind.ORPHAN, since=t0)
            assert sorted(tuple_of(r) for r in o) == sorted(c.tuple for c in conns)
            assert took < 2.5, took
            assert (o["ct_state"] == abi.TcpState.ESTABLISHED).all()
            assert topo.dropped_fin_rst() >= len(conns)
            with table_reader(topo.server_ns):
                col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= len(conns), EXPIRY_WAIT_S,
                         "established expiry")
                time.sleep(0.3)
        d = col.select(ino, abi.Kind.DESTROY, since=t0)
        assert sorted(tuple_of(r) for r in d) == sorted(c.tuple for c in conns)
        assert (d["reason"] == abi.DestroyReason.TIMEOUT).all(), np.unique(d["reason"])
        assert (d["ct_state"] == abi.TcpState.ESTABLISHED).all()


def test_table_full(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    with Topology.create() as topo:
        ino = ns_inode(topo.server_ns)
        t0 = col.mark()
        server = topo.tcp_server()
        before = conntrack_stats(topo.server_ns)
        cap = 12
        with sysctls({"net.netfilter.nf_conntrack_max": cap}):
            ok = topo.connect(topo.client_v4[0], cap, server)
            done, stuck = topo.try_connect(topo.client_v4[1], 4, server, wait=1.5)
            abort_pending(stuck)
            time.sleep(0.5)
            after = conntrack_stats(topo.server_ns)
        drops = col.select(ino, abi.Kind.DROP, since=t0)
        full = drops[drops["reason"] == abi.DropReason.TABLE_FULL]
        assert len(ok) == cap and not done and len(stuck) == 4
        assert len(full) == after["drop"] - before["drop"] > 0
        assert set(tuple_of(r)[0] for r in full) == {topo.client_v4[1]}
        assert set(full["l4proto"]) == {abi.IPPROTO_TCP}
        assert set(tuple_of(r)[3] for r in full) == {server.port}


HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"  # nf_conntrack_buckets, writable on every kernel


@contextlib.contextmanager
def few_buckets() -> Iterator[int]:
    """The smallest hash table for the body (one page of chains: 512); yields its size."""
    with open(HASHSIZE) as f:
        old = f.read().strip()
    with open(HASHSIZE, "w") as f:
        f.write("1")  # rounded up to a page of chains
    try:
        with open(HASHSIZE) as f:
            yield int(f.read())
    finally:
        with open(HASHSIZE, "w") as f:
            f.write(old)


def test_early_drop_is_tagged(live, lab_out: str) -> None:  # type: ignore[no-untyped-def]
    """A table full of unassured UDP entries, conntrack on in both namespaces: one more
    datagram makes room by early_drop in each, in the client's in process context (its
    output path) and in the server's in the packet path. early_drop scans the chain of
    the new tuple's bucket and a few after it, and drops every unassured entry of its
    namespace in the first chain that has one; with 4 entries per chain on average it
    always finds some. Every entry it drops comes as a DESTROY with reason early_drop,
    as many as each namespace's `conntrack -S` early_drop grew by, each one of the
    entries sent; the new datagram's entry comes as NEW."""
    from lab_toolkit import NFT_TRACK, nft_apply

    src, col, ctx = live
    with Topology.create() as topo:
        nft_apply(topo.client_ns, NFT_TRACK)
        sink = topo.udp_sink(port=5360)
        inos = {"client": ns_inode(topo.client_ns), "server": ns_inode(topo.server_ns)}
        names = {"client": topo.client_ns, "server": topo.server_ns}
        t0 = col.mark()
        with few_buckets() as buckets:
            cap = 4 * buckets
            with sysctls({"net.netfilter.nf_conntrack_max": cap}):
                filled = topo.send_udp(topo.client_v4[0], cap, sink, first_port=20000)
                wait_for(lambda: all(conntrack_count(ns) == cap for ns in names.values()), 30, what="table full")
                before = {k: conntrack_stats(ns)["early_drop"] for k, ns in names.items()}
                last = topo.send_udp(topo.client_v4[0], 1, sink, first_port=20000 + cap)
                wait_for(lambda: all(conntrack_stats(ns)["early_drop"] > before[k] for k, ns in names.items()), 10,
                         what="an early drop in both namespaces")
                dropped = {k: conntrack_stats(ns)["early_drop"] - before[k] for k, ns in names.items()}
                left = {k: conntrack_count(ns) for k, ns in names.items()}
        for side, ino in inos.items():
            col.wait(lambda: len(col.select(ino, abi.Kind.NEW, since=t0)) >= cap + 1, 30, f"{side} NEW")
            col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= dropped[side], 10, f"{side} DESTROY")
        time.sleep(0.5)
        got = {side: col.select(ino, None, since=t0) for side, ino in inos.items()}
    lost = {abi.LostCause(c).name.lower(): v for c, v in src.lost_counts().items() if v}
    gone = {side: ev[ev["kind"] == abi.Kind.DESTROY] for side, ev in got.items()}
    reasons = {side: {abi.DestroyReason(k).name.lower(): int(n) for k, n in zip(*np.unique(g["reason"], return_counts=True))}
               for side, g in gone.items()}
    with open(os.path.join(lab_out, "early-drop.json"), "w") as f:
        json.dump({"buckets": buckets, "entries": cap, "early_drops": dropped, "left": left, "reasons": reasons}, f, indent=1)
    for side, ev in got.items():
        new = ev[ev["kind"] == abi.Kind.NEW]
        summary = (side, buckets, dropped, left, reasons[side], lost)
        assert dropped[side] > 0 and left[side] == cap - dropped[side] + 1, summary
        assert len(gone[side]) == dropped[side], summary
        assert (gone[side]["reason"] == abi.DestroyReason.EARLY_DROP).all(), summary
        assert set(tuple_of(r) for r in gone[side]) <= set(filled), summary
        assert sorted(tuple_of(r) for r in new) == sorted(filled + last), summary
        assert not (ev["kind"] == abi.Kind.DROP).any(), summary


def test_netns_teardown(live) -> None:  # type: ignore[no-untyped-def]
    src, col, ctx = live
    topo = Topology.create()
    ino = ns_inode(topo.server_ns)
    t0 = col.mark()
    server = topo.tcp_server()
    conns = topo.connect(topo.client_v4[0], 7, server)
    topo.destroy()
    col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= 7, 60, "netns teardown")
    d = col.select(ino, abi.Kind.DESTROY, since=t0)
    assert len(d) == 7
    assert (d["reason"] == abi.DestroyReason.NETNS).all(), np.unique(d["reason"])


def test_loss_is_counted(live) -> None:  # type: ignore[no-untyped-def]
    """Consumer stopped during a burst: delivered + counted lost = generated, lost > 0."""
    src, col, ctx = live
    with Topology.create() as topo:
        ino = ns_inode(topo.server_ns)
        t0 = col.mark()
        sink = topo.udp_sink()
        n_per_ip = 3000  # ~9,000 NEW records; the 1 MiB ring holds ~7,280
        col.paused.set()
        try:
            with col.lock:
                col.parts.append(src.poll(final=True))
                start = len(col.parts)
                lost0 = src.lost_counts()
            sent = set()
            with sysctls({"net.netfilter.nf_conntrack_udp_timeout": 600}, ns=topo.server_ns):
                for ip in topo.client_v4:
                    sent.update(topo.send_udp(ip, n_per_ip, sink))
            entries = conntrack_count(topo.server_ns)
            with col.lock:
                lost1 = src.lost_counts()
                tail = src.poll(final=True)
                window = [tail] + col.parts[start:]
        finally:
            col.paused.clear()
        n = entries  # a reused source port finds the earlier entry: no new one
        assert n == len(sent)
        w = np.concatenate(window)
        lost = sum(lost1.values()) - sum(lost0.values())
        delivered = w[(w["netns_ino"] == ino) & (w["kind"] == abi.Kind.NEW)]
        lost_records = int(w[w["kind"] == abi.Kind.LOST]["value"].sum())
        assert lost > 0
        assert lost_records == lost
        assert len(delivered) + lost == n, (len(delivered), lost, n)
        cause = abi.LostCause.RINGBUF_FULL if src.plan.ringbuf else abi.LostCause.PERF_BUFFER
        assert lost1[cause] - lost0[cause] == lost
        if src.plan.ringbuf:
            # The poll after the burst found the ring full to within one record (the
            # first it refused), and says so in its COUNTER records.
            counters = tail[tail["kind"] == abi.Kind.COUNTER]
            ring = dict(zip(counters["reason"].tolist(), counters["value"].tolist()))
            assert ring[abi.Counter.RING_BYTES] == src.ring_bytes == TEST_RING_PAGES * mmap.PAGESIZE
            assert src.ring_bytes - RINGBUF_RECORD_BYTES < ring[abi.Counter.RING_PEAK_BYTES] <= src.ring_bytes, ring


# Does the kernel report BPF programs' recursion_misses (fdinfo, 5.12+)?
SKIPS_REPORTED = {"bullseye": False, "bookworm": True, "trixie": True, "sid": True}


def test_skipped_runs_are_read_per_program(live, lab_out: str) -> None:  # type: ignore[no-untyped-def]
    """Runs the kernel skipped come per attached program from the kernel: a count where it
    reports one, None (never a made-up 0) where it does not; their sum is the probe_skipped
    loss, which LOST records carry like the other causes."""
    src, col, ctx = live
    suite = os.environ.get("CTRACE_LAB_SUITE", "")
    if suite not in SKIPS_REPORTED:
        pytest.skip(f"no recorded expectation for suite {suite!r}")
    skips = src.prog_skips()
    with open(os.path.join(lab_out, "skipped-runs.json"), "w") as f:
        json.dump(skips, f, indent=1)
    programs = {n for p in src.plan.probes if p.attached for n in (p.entry, p.ret) if n}
    assert programs <= set(skips), (programs, skips)
    assert all((v is not None) == SKIPS_REPORTED[suite] for v in skips.values()), skips
    assert src.skips_counted == SKIPS_REPORTED[suite]
    assert src.info.extra["skipped_runs"].startswith("each program's" if src.skips_counted else "not counted")
    total = sum(v or 0 for v in skips.values())
    assert src.lost_counts()[abi.LostCause.PROBE_SKIPPED] >= total  # the counts only grow


def test_listed_entries_leave_through_the_model(live) -> None:  # type: ignore[no-untyped-def]
    """Entries that existed before tracing are followed to their removal: the model's
    count for their netns equals conntrack's before and after a flush."""
    from ctrace.keys import EventFilter
    from ctrace.model import Model, ModelOptions

    src, col, ctx = live
    pre: Topology = ctx["pre"]
    ino = ns_inode(pre.server_ns)
    n = len(ctx["pre_conns"])
    model = Model(src.info, ModelOptions(filter=EventFilter(netns=ino)))
    model.seed(src.existing())
    model.apply(col.select(ino))
    assert model.snapshot().count == conntrack_count(pre.server_ns) == n
    t0 = col.mark()
    conntrack_flush(pre.server_ns)
    col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= n, 10, "DESTROY of the listed entries")
    time.sleep(0.5)
    model.apply(col.select(ino, since=t0))
    snap = model.snapshot()
    assert conntrack_count(pre.server_ns) == 0
    assert snap.count == 0 and snap.removals == {"delete": n}, (snap.count, snap.removals)



# Runs in the client namespace: one UDP datagram from each of N fresh source ports
# (PORT0, PORT0+1, ...: no tuple repeats, so every send is a new entry) at RATE per
# second on an absolute schedule; prints "sport boottime_ns lag_s" per send.
_CHURN = r"""
import socket, sys, time
src, dst, dport, rate, n, port0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
fam = socket.AF_INET6 if ":" in src else socket.AF_INET
out = []
start = time.monotonic() + 0.5
for i in range(n):
    due = start + i / rate
    d = due - time.monotonic()
    if d > 0:
        time.sleep(d)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((src, port0 + i))
    s.sendto(b"c", (dst, dport))
    out.append("%d %d %.4f" % (port0 + i, time.clock_gettime_ns(time.CLOCK_BOOTTIME), time.monotonic() - due))
    s.close()
print("\n".join(out))
"""

CHURN_RATE = 40  # new entries per second: TCG sustains it with both tracers attached
CHURN_SECONDS = 40
CHURN_TIMEOUT_S = 3  # nf_conntrack_udp_timeout: each entry expires 3 s after its datagram


def test_churn_rates(live, lab_out: str) -> None:  # type: ignore[no-untyped-def]
    """A known churn: R = 40 new UDP entries per second for 40 s, each expiring 3 s later.
    The model's sliding-window insert and expire rates (the numbers `top` shows and
    `export` publishes), folded as a replay folds, are within 5 % of R at every point
    of the steady state; every entry is counted once as inserted and once as removed by
    timeout, with the generated tuples, and the table is empty again.

    Expiry is made prompt by a table_reader (module docstring): ct_seq_show kills each
    expired entry it meets, and ctrace reports it as TIMEOUT (the entry's timeout has
    passed; no delete, early-drop or netns path is involved). Every lifetime is between
    the timeout and the timeout plus 1.5 s, so the removals follow the inserts 3 s later.
    """
    from ctrace.keys import EventFilter
    from ctrace.model import Model, ModelOptions

    src, col, ctx = live
    n = CHURN_RATE * CHURN_SECONDS
    with Topology.create() as topo:
        ino = ns_inode(topo.server_ns)
        t0 = col.mark()
        sink = topo.udp_sink(port=5354)
        client = topo.client_v4[0]
        with sysctls({"net.netfilter.nf_conntrack_udp_timeout": CHURN_TIMEOUT_S}, ns=topo.server_ns), \
                table_reader(topo.server_ns) as reader:
            began = time.monotonic()
            out = run([sys.executable, "-c", _CHURN, client, sink.addr, str(sink.port), str(CHURN_RATE), str(n),
                       "20000"], ns=topo.client_ns, timeout=CHURN_SECONDS * 4)
            try:
                col.wait(lambda: len(col.select(ino, abi.Kind.DESTROY, since=t0)) >= n, EXPIRY_WAIT_S,
                         "expiry of the churned entries")
            except AssertionError as e:
                dump("churn", col.select(ino, None, since=t0))
                raise AssertionError(f"{e}: NEW {len(col.select(ino, abi.Kind.NEW, since=t0))}, DESTROY "
                                     f"{len(col.select(ino, abi.Kind.DESTROY, since=t0))}, table "
                                     f"{conntrack_count(topo.server_ns)}, sent {len(out.splitlines())} of {n}, "
                                     f"lost {src.lost_counts()}") from None
            time.sleep(0.5)
            left = conntrack_count(topo.server_ns)
            took = time.monotonic() - began
        sent = [(int(a), int(b), float(c)) for a, b, c in (ln.split() for ln in out.splitlines())]
        ev = col.select(ino, None, since=t0)
    dump("churn", ev)
    new = ev[ev["kind"] == abi.Kind.NEW]
    gone = ev[ev["kind"] == abi.Kind.DESTROY]
    want = sorted((client, sink.addr, p, sink.port) for p, _, _ in sent)

    # exact counts against what was generated
    assert len(sent) == n and left == 0
    assert sorted(tuple_of(r) for r in new) == want
    assert sorted(tuple_of(r) for r in gone) == want
    assert set(new["l4proto"]) == set(gone["l4proto"]) == {abi.IPPROTO_UDP}
    assert (gone["reason"] == abi.DestroyReason.TIMEOUT).all(), np.unique(gone["reason"])
    assert (gone["flags"] & abi.FLAG_START_KNOWN).all()
    life = (gone["ts_boot_ns"].astype(np.int64) - gone["start_boot_ns"].astype(np.int64)) / 1e9
    assert CHURN_TIMEOUT_S - 0.05 <= life.min() and life.max() <= CHURN_TIMEOUT_S + 1.5, (life.min(), life.max())

    # the model's rates, folded up to each moment of the steady state
    model = Model(src.info, ModelOptions(filter=EventFilter(netns=ino)))
    w = model.opt.rate_window_s
    ts = ev["ts_boot_ns"].astype(np.int64)
    order = np.argsort(ts, kind="stable")
    ev, ts = ev[order], ts[order]
    first, last = sent[0][1], sent[-1][1]
    # a window starts up to 1 s before now - w; it must begin after the first expiry
    t, end, step = first + int((CHURN_TIMEOUT_S + w + 1.5) * 1e9), last, int(0.7e9)
    done, samples = 0, []
    while t <= end:
        hi = int(np.searchsorted(ts, t, side="right"))
        model.apply(ev[done:hi])
        done = hi
        snap = model.snapshot(t)
        samples.append(((t - first) / 1e9, snap.window_s, snap.window_insert_rate, snap.window_expire_rate))
        t += step
    model.apply(ev[done:])
    final = model.snapshot(int(ts[-1]))
    lag = max(c for _, _, c in sent)
    result = {
        "rate": CHURN_RATE, "entries": n, "timeout_s": CHURN_TIMEOUT_S, "generator_max_lag_s": lag,
        "generated_rate": (n - 1) / ((last - first) / 1e9), "reader": reader, "test_s": took,
        "lifetime_s": [float(life.min()), float(np.median(life)), float(life.max())],
        "samples": samples, "inserts": final.inserts, "removals": final.removals,
    }
    with open(os.path.join(lab_out, "churn.json"), "w") as f:
        json.dump(result, f, indent=1)
    assert len(samples) >= 30, samples
    bad = [s for s in samples if abs(s[2] - CHURN_RATE) > 0.05 * CHURN_RATE
           or abs(s[3] - CHURN_RATE) > 0.05 * CHURN_RATE]
    assert not bad, (f"window rates off by more than 5 % of {CHURN_RATE}/s (generator max lag {lag:.3f} s): "
                     f"{bad}")
    assert final.inserts == final.removals_total == n
    assert final.removals == {"timeout": n}
    assert final.count == 0


STRESS_S = 30


def ring_caught_up(src) -> bool:  # type: ignore[no-untyped-def]
    """The reader has taken everything the programs put in the ring (a perf buffer: True)."""
    st = src.ring_state()
    return st is None or st["consumer"] == st["producer"]
PAIRED = ("confirm", "tcp_state")  # probes whose return half needs what the entry half saw


def test_pairs_survive_preemption(live, lab_out: str) -> None:  # type: ignore[no-untyped-def]
    """Busy CPUs: 2 spinning processes and 4 connect loops (conntrack on in both
    namespaces, so inserts also happen in process context) for 30 s. On a preemptible
    kernel (7.2: PREEMPT_LAZY) a task can be preempted, or moved to another CPU,
    between a conntrack function's entry and its return, and the kernel skips program
    runs. Then the stress's entries are flushed and the reader catches up with the ring.
    Afterwards, on a quiet machine, 40 connections must each come back as one NEW
    and a STATE to ESTABLISHED, less only what the kernel is counted to have skipped
    meanwhile: what the entry half handed the return half under stress must not
    break the pairs after it. (Before this test, a per-CPU stack did: on 7.2 with two
    vCPUs it was left 64 to 137 deep, and from then on no insert was reported.)"""
    import tcp_churn
    from lab_toolkit import NFT_TRACK, PATH, nft_apply

    src, col, ctx = live
    env = dict(os.environ, PATH=PATH)
    with Topology.create() as topo:
        nft_apply(topo.client_ns, NFT_TRACK)
        server = subprocess.Popen(["ip", "netns", "exec", topo.server_ns] + tcp_churn.serve_argv(9100, STRESS_S + 10),
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert server.stdout.readline().strip() == "ready"
        spin = "import time\nt = time.monotonic() + %d\nwhile time.monotonic() < t: pass" % STRESS_S
        hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
        loops = [subprocess.Popen(["ip", "netns", "exec", topo.client_ns]
                                  + tcp_churn.client_argv([topo.client_v4[i % len(topo.client_v4)]], topo.server_v4,
                                                          9100, STRESS_S), stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(4)]
        stressed = sum(int(tcp_churn.client_result(p.communicate(timeout=STRESS_S + 120)[0])["connects"])
                       for p in loops)
        for p in hogs:
            p.wait(timeout=60)
        server.kill()
        server.wait()
        # The stress's entries (closed by RST: CLOSE, 10 s) would expire inside the quiet
        # window, thousands of removals at once, more than the 1 MiB test ring holds while
        # the reader shares the CPU (seen on 6.1: every quiet record lost to the full ring,
        # counted). Remove them now and let the reader catch up first.
        ring_before_flush = src.ring_state()
        for ns in (topo.client_ns, topo.server_ns):
            conntrack_flush(ns)
        wait_for(lambda: conntrack_count(topo.client_ns) == conntrack_count(topo.server_ns) == 0, 30,
                 what="the stress's entries gone")
        wait_for(lambda: ring_caught_up(src), 60, what="the reader caught up with the ring")
        time.sleep(1)
        ino = ns_inode(topo.server_ns)
        ring0 = src.ring_state()
        skips0, lost0 = src.prog_skips(), src.lost_counts()
        t0 = col.mark()
        quiet = topo.tcp_server(port=9200)
        conns = topo.connect(topo.client_v4[0], 40, quiet)
        try:
            col.wait(lambda: len(col.select(ino, abi.Kind.NEW, since=t0)) >= 40, 20, "NEW events")
        except AssertionError:
            pass  # judged below, with the skips
        time.sleep(1)
        ev = col.select(ino, None, since=t0)
        everywhere = col.events()
        everywhere = everywhere[everywhere["ts_boot_ns"] >= t0]
        skipped = {k: (v or 0) - (skips0.get(k) or 0) for k, v in src.prog_skips().items()}
        lost = {abi.LostCause(c).name.lower(): v - lost0.get(c, 0) for c, v in src.lost_counts().items()
                if v - lost0.get(c, 0)}
        ring1 = src.ring_state()
        new = ev[ev["kind"] == abi.Kind.NEW]
        # a ring that stays full: is the consumer held at a record never submitted?
        ring_later = [] if len(new) >= len(conns) else [time.sleep(3) or src.ring_state() for _ in range(5)]
    est = ev[(ev["kind"] == abi.Kind.STATE) & (ev["ct_state"] == abi.TcpState.ESTABLISHED)]
    progs = {p.name: (p.entry, p.ret) for p in src.plan.probes if p.name in PAIRED}
    slack = {name: sum(skipped.get(prog, 0) for prog in programs) for name, programs in progs.items()}
    summary = {"stress_connects": stressed, "skipped_under_stress": {k: v for k, v in skips0.items() if v},
               "ring_after_stress": ring_before_flush, "ring_before_quiet": ring0, "ring_after_quiet": ring1, "ring_later": ring_later,
               "quiet_new": len(new),
               "quiet_established": len(set(est["ct_id"].tolist())), "skipped_when_quiet": slack,
               "lost_when_quiet": lost,
               "quiet_records_by_kind": {abi.Kind(k).name.lower(): int((ev["kind"] == k).sum())
                                         for k in np.unique(ev["kind"])},
               "quiet_records_anywhere": {abi.Kind(k).name.lower(): int((everywhere["kind"] == k).sum())
                                          for k in np.unique(everywhere["kind"])}}
    with open(os.path.join(lab_out, "preemption.json"), "w") as f:
        json.dump(summary, f, indent=1)
    assert stressed > 0, summary
    want = sorted(c.tuple for c in conns)
    got = sorted(tuple_of(r) for r in new)
    assert set(got) <= set(want) and len(got) == len(set(got)), summary
    assert len(got) >= len(want) - slack["confirm"], summary
    assert len(set(est["ct_id"].tolist()) & set(new["ct_id"].tolist())) >= len(got) - slack["tcp_state"], summary
