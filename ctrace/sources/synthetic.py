"""Synthetic scenarios with known ground truth.

A scenario draws connections (arrival time, addresses, what happens to them) and
runs them through a small discrete-event simulation of the conntrack table
(nf_conntrack_max enforced: early drop of unassured entries, else a refused
insert). The simulation emits the event stream and, independently of ctrace's
model, tallies the ground truth a report must reproduce.
"""

import heapq
import ipaddress
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ctrace import abi, kernel_defaults
from ctrace.sources.base import SourceInfo

NS = 1_000_000_000
T = abi.TcpState
BOOT_START = 3600 * NS  # recordings start one hour after boot
WALL_OFFSET = 1_764_000_000 * NS - BOOT_START  # a fixed wall clock: 2025-11-24

DEFAULT_SYSCTLS = {"nf_conntrack_max": 262144, "nf_conntrack_buckets": 65536, **kernel_defaults.TIMEOUTS}

# What happens to a connection after it is born.
FIN, RST, LOST, IDLE, SYN, UDP_REPLIED, UDP_UNREPLIED, DELETED = range(8)


@dataclass
class Conn:
    netns: int
    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    t0: int
    pattern: int
    hold_ns: int  # time from established to close / last packet
    reply_dst: Optional[bytes] = None  # SNAT: where replies go
    key_src: str = ""


@dataclass
class Truth:
    """Tallies kept by the simulation, in the shape of `ctrace report --json`."""

    by_ip: Dict[Tuple[str, int], Dict[str, Any]] = field(default_factory=dict)
    removals: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    orphans_by_kind: Counter = field(default_factory=Counter)
    drops_by_ip: Counter = field(default_factory=Counter)
    start_count: int = 0
    peak: int = 0

    def ip(self, ip: str, netns: int) -> Dict[str, Any]:
        row = self.by_ip.get((ip, netns))
        if row is None:
            row = {"ip": ip, "netns": netns, "live": 0, "created": 0, "destroyed": 0, "orphans": 0, "drops": 0, "states": Counter()}
            self.by_ip[(ip, netns)] = row
        return row


def _state_name(proto: int, state: int, status: int) -> str:
    if proto == abi.IPPROTO_TCP:
        return T(state).name
    if proto == abi.IPPROTO_UDP:
        return "UDP" if status & abi.IPS_SEEN_REPLY else "UDP_UNREPLIED"
    return "OTHER"


class Simulation:
    """Discrete-event conntrack table. Connections' steps are scheduled on a heap."""

    def __init__(self, sysctls: Dict[str, int], start_ns: int, end_ns: int, seed: int, early_drop_p: float = 0.5) -> None:
        self.s = sysctls
        self.start, self.end = start_ns, end_ns
        self.rng = random.Random(seed)
        self.early_drop_p = early_drop_p
        self.records: List[Tuple] = []
        self.existing: List[Tuple] = []
        self.truth = Truth()
        self.live: Dict[int, Dict[str, Any]] = {}  # ct_id -> entry
        self.free_ids: List[int] = []
        self.next_id = 0xFFFF888000000000
        self.heap: List[Tuple[int, int, int, Callable[[], None]]] = []
        self.seq = 0
        self.count = 0

    def at(self, ts: int, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (ts, self.seq, 0, fn))

    def run(self) -> None:
        seeded = False
        while self.heap:
            ts, _, _, fn = heapq.heappop(self.heap)
            if ts > self.end:
                break
            if not seeded and ts >= self.start:
                self._seed()
                seeded = True
            self.now = ts
            fn()
        if not seeded:
            self._seed()

    # -- records -----------------------------------------------------------
    def _emit(self, kind: int, e: Dict[str, Any], ts: int, **kw: int) -> None:
        if ts < self.start:
            return
        self.truth.by_kind[abi.Kind(kind).name.lower()] += 1
        self.records.append((kind, ts, dict(e), kw))

    def _seed(self) -> None:
        for ct_id, e in self.live.items():
            self.existing.append((abi.Kind.EXISTING, self.start, dict(e), {}))
            row = self.truth.ip(e["key_src"], e["netns"])
            row["live"] += 1
            row["states"][_state_name(e["proto"], e["state"], e["status"])] += 1
        self.truth.start_count = self.truth.peak = len(self.live)
        if self.live:
            self.truth.by_kind["existing"] = len(self.live)

    def _track_live(self, e: Dict[str, Any], delta: int) -> None:
        if self.now < self.start:
            return
        row = self.truth.ip(e["key_src"], e["netns"])
        row["live"] += delta
        row["states"][_state_name(e["proto"], e["state"], e["status"])] += delta

    # -- lifecycle -----------------------------------------------------------
    def birth(self, c: Conn) -> None:
        ts = self.now
        if self.count >= self.s["nf_conntrack_max"]:
            victim = self._early_drop_victim()
            if victim is not None and self.rng.random() < self.early_drop_p:
                self.destroy(victim, abi.DestroyReason.EARLY_DROP)
            else:
                e = self._entry(c, 0)
                self._emit(abi.Kind.DROP, e, ts, reason=abi.DropReason.TABLE_FULL)
                if ts >= self.start:
                    self.truth.ip(c.key_src, c.netns)["drops"] += 1
                    self.truth.drops_by_ip[(c.key_src, c.netns)] += 1
                return
        ct_id = self.free_ids.pop() if self.free_ids else self._fresh_id()
        e = self._entry(c, ct_id)
        e["state"] = T.SYN_SENT if c.proto == abi.IPPROTO_TCP else 0
        e["start"] = ts
        e["gen"] = self.seq
        self.live[ct_id] = e
        self.count += 1
        self._emit(abi.Kind.NEW, e, ts)
        if ts >= self.start:
            self.truth.ip(c.key_src, c.netns)["created"] += 1
            self.truth.peak = max(self.truth.peak, self.count)
        self._track_live(e, +1)
        self._plan(ct_id, e, c)

    def _fresh_id(self) -> int:
        self.next_id += 0x140
        return self.next_id

    def _entry(self, c: Conn, ct_id: int) -> Dict[str, Any]:
        return {
            "ct_id": ct_id, "netns": c.netns, "family": c.family, "proto": c.proto, "src": c.src, "dst": c.dst,
            "sport": c.sport, "dport": c.dport, "reply_dst": c.reply_dst or c.src, "key_src": c.key_src,
            "state": 0, "status": abi.IPS_CONFIRMED, "start": self.now, "orphaned": False, "gen": 0,
        }

    def _early_drop_victim(self) -> Optional[int]:
        for ct_id, e in self.live.items():  # oldest first (dict order = insertion order)
            if not e["status"] & abi.IPS_ASSURED:
                return ct_id
        return None

    def _guarded(self, ct_id: int, gen: int, fn: Callable[[Dict[str, Any]], None]) -> Callable[[], None]:
        def step() -> None:
            e = self.live.get(ct_id)
            if e is not None and e["gen"] == gen:
                fn(e)

        return step

    def state(self, e: Dict[str, Any], new: int, status: int = 0) -> None:
        self._track_live(e, -1)
        old = e["state"]
        e["state"] = new
        e["status"] |= status
        self._track_live(e, +1)
        self._emit(abi.Kind.STATE, e, self.now, ct_oldstate=old)

    def orphan(self, e: Dict[str, Any]) -> None:
        self._emit(abi.Kind.ORPHAN, e, self.now)
        e["orphaned"] = True
        if self.now >= self.start:
            self.truth.orphans_by_kind["socket-closed"] += 1
            self.truth.ip(e["key_src"], e["netns"])["orphans"] += 1

    def destroy(self, ct_id: int, mech: int) -> None:
        e = self.live.pop(ct_id)
        self.count -= 1
        reason = _removal_reason(mech, e["proto"], e["state"])
        self._emit(abi.Kind.DESTROY, e, self.now, reason=mech)
        if self.now >= self.start:
            self.truth.removals[reason] += 1
            row = self.truth.ip(e["key_src"], e["netns"])
            row["destroyed"] += 1
            if reason == "timeout-established" and not e["orphaned"]:
                self.truth.orphans_by_kind["expired-established"] += 1
                row["orphans"] += 1
        self._track_live(e, -1)
        self.free_ids.append(ct_id)

    def _plan(self, ct_id: int, e: Dict[str, Any], c: Conn) -> None:
        s, rtt = self.s, 2_000_000 + self.rng.randrange(20_000_000)
        t0, gen = self.now, e["gen"]

        def later(dt: int, fn: Callable[[Dict[str, Any]], None]) -> None:
            self.at(t0 + dt, self._guarded(ct_id, gen, fn))

        def die(dt: int, mech: int = abi.DestroyReason.TIMEOUT) -> None:
            later(dt, lambda e: self.destroy(e["ct_id"], mech))

        if c.proto == abi.IPPROTO_UDP:
            if c.pattern == UDP_REPLIED:
                later(rtt, lambda e: self.state(e, 0, abi.IPS_SEEN_REPLY | abi.IPS_ASSURED))
                die(rtt + c.hold_ns + s["nf_conntrack_udp_timeout_stream"] * NS)
            else:
                die(s["nf_conntrack_udp_timeout"] * NS)
            return
        if c.pattern == SYN:
            die(s["nf_conntrack_tcp_timeout_syn_sent"] * NS)
            return
        later(rtt // 2, lambda e: self.state(e, T.SYN_RECV, abi.IPS_SEEN_REPLY))
        later(rtt, lambda e: self.state(e, T.ESTABLISHED, abi.IPS_ASSURED))
        close = rtt + c.hold_ns
        if c.pattern == FIN:
            later(close, lambda e: self.state(e, T.FIN_WAIT))
            later(close + rtt, lambda e: self.state(e, T.TIME_WAIT))
            die(close + rtt + s["nf_conntrack_tcp_timeout_time_wait"] * NS)
        elif c.pattern == RST:
            later(close, lambda e: self.state(e, T.CLOSE))
            die(close + s["nf_conntrack_tcp_timeout_close"] * NS)
        elif c.pattern == LOST:
            later(close, self.orphan)
            die(close + s["nf_conntrack_tcp_timeout_established"] * NS)
        elif c.pattern == IDLE:
            die(close + s["nf_conntrack_tcp_timeout_established"] * NS)
        elif c.pattern == DELETED:
            die(close, abi.DestroyReason.DELETE)

    # -- output ----------------------------------------------------------------
    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        return _to_array(self.existing), _to_array(self.records)


def _removal_reason(mech: int, proto: int, state: int) -> str:
    if mech == abi.DestroyReason.EARLY_DROP:
        return "early-drop"
    if mech == abi.DestroyReason.DELETE:
        return "delete"
    if proto != abi.IPPROTO_TCP:
        return "timeout"
    if state == T.TIME_WAIT:
        return "fin"
    if state == T.CLOSE:
        return "rst"
    if state == T.ESTABLISHED:
        return "timeout-established"
    if state in (T.FIN_WAIT, T.CLOSE_WAIT, T.LAST_ACK):
        return "timeout-closing"
    return "timeout-handshake"


def _to_array(records: List[Tuple]) -> np.ndarray:
    out = abi.empty(len(records))
    if not records:
        return out
    cols: Dict[str, list] = defaultdict(list)
    for kind, ts, e, kw in records:
        cols["kind"].append(kind)
        cols["ts_boot_ns"].append(ts)
        cols["ct_id"].append(e["ct_id"])
        cols["start_boot_ns"].append(e["start"])
        cols["netns_ino"].append(e["netns"])
        cols["family"].append(e["family"])
        cols["l4proto"].append(e["proto"])
        cols["ct_state"].append(e["state"])
        cols["status_raw"].append(e["status"])
        cols["orig_src"].append(e["src"])
        cols["orig_dst"].append(e["dst"])
        cols["orig_sport_be"].append(e["sport"])
        cols["orig_dport_be"].append(e["dport"])
        cols["reply_src"].append(e["dst"])
        cols["reply_dst"].append(e["reply_dst"])
        cols["reply_sport_be"].append(e["dport"])
        cols["reply_dport_be"].append(e["sport"])
        flags = abi.FLAG_SYNTHETIC | (abi.FLAG_START_KNOWN if kind != abi.Kind.EXISTING else 0)
        if e["orphaned"] and kind != abi.Kind.ORPHAN:
            flags |= abi.FLAG_ORPHANED
        cols["flags"].append(flags)
        cols["reason"].append(kw.get("reason", 0))
        cols["ct_oldstate"].append(kw.get("ct_oldstate", 0))
    for name, values in cols.items():
        if name in ("orig_src", "orig_dst", "reply_src", "reply_dst"):
            out[name] = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, 16)
        else:
            out[name] = values
    out["flags"][out["kind"] == abi.Kind.EXISTING] |= abi.FLAG_START_KNOWN  # the simulation knows their birth
    return out


# ---- scenarios -----------------------------------------------------------------


def _addr(text: str) -> Tuple[int, bytes]:
    ip = ipaddress.ip_address(text)
    return (abi.AF_INET, ip.packed + bytes(12)) if ip.version == 4 else (abi.AF_INET6, ip.packed)


def _hosts(prefix: str, n: int, rng: random.Random) -> List[str]:
    net = ipaddress.ip_network(prefix)
    first = int(net.network_address) + 1
    span = min(net.num_addresses - 2, 250)
    return [str(ipaddress.ip_address(first + i)) for i in rng.sample(range(span), n)]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    build: Callable[["Builder"], None]
    sysctls: Dict[str, int]
    duration_s: int
    events_per_conn: float  # to scale --events


class Builder:
    """Helpers a scenario uses to put connections on the simulation's timeline."""

    def __init__(self, sim: Simulation, rng: random.Random, rate_scale: float) -> None:
        self.sim, self.rng, self.scale = sim, rng, rate_scale

    def clients(self, netns: int, clients: List[str], server: str, dport: int, proto: int, rate: float,
                patterns: List[Tuple[int, float]], hold_mean_s: float, t_from: float, t_to: float,
                snat: Optional[str] = None) -> None:
        """Poisson arrivals at `rate`/s (scaled) from random `clients` to `server`."""
        rate *= self.scale
        if rate <= 0:
            return
        t = t_from
        fam_s, dst = _addr(server)
        reply_dst = _addr(snat)[1] if snat else None
        names, weights = zip(*patterns)
        while True:
            t += self.rng.expovariate(rate)
            if t >= t_to:
                return
            client = self.rng.choice(clients)
            fam, src = _addr(client)
            if fam != fam_s:
                continue
            conn = Conn(netns, fam, proto, src, dst, self.rng.randrange(32768, 61000), dport,
                        int(t * NS), self.rng.choices(names, weights)[0],
                        int(self.rng.expovariate(1 / hold_mean_s) * NS) if hold_mean_s else 0,
                        reply_dst=reply_dst, key_src=client)
            self.sim.at(conn.t0, (lambda c: lambda: self.sim.birth(c))(conn))


def _lost_fin(b: Builder) -> None:
    s, e = b.sim.start / NS, b.sim.end / NS
    rng = b.rng
    good4 = _hosts("198.51.100.0/24", 40, rng)
    lossy4 = _hosts("203.0.113.0/24", 30, rng)
    good6 = [f"2001:db8:1::{i:x}" for i in range(1, 21)]
    lossy6 = [f"2001:db8:2::{i:x}" for i in range(1, 11)]
    for netns, srv4, srv6 in ((4026532101, "192.0.2.10", "2001:db8:ff::10"), (4026532202, "192.0.2.20", "2001:db8:ff::20")):
        b.clients(netns, good4, srv4, 443, abi.IPPROTO_TCP, 20, [(FIN, 0.85), (RST, 0.15)], 4, s - 300, e)
        b.clients(netns, lossy4, srv4, 443, abi.IPPROTO_TCP, 8, [(LOST, 0.8), (FIN, 0.2)], 4, s - 300, e)
        b.clients(netns, good6, srv6, 443, abi.IPPROTO_TCP, 6, [(FIN, 0.9), (RST, 0.1)], 4, s - 300, e)
        b.clients(netns, lossy6, srv6, 443, abi.IPPROTO_TCP, 3, [(LOST, 0.8), (RST, 0.2)], 4, s - 300, e)


def _syn_flood(b: Builder) -> None:
    s, e = b.sim.start / NS, b.sim.end / NS
    rng = b.rng
    normal = _hosts("198.51.100.0/24", 50, rng) + [f"2001:db8:1::{i:x}" for i in range(1, 11)]
    flood = [str(ipaddress.ip_address(int(ipaddress.ip_address("192.0.2.0")) + i)) for i in range(1, 255)]
    b.clients(4026531840, [h for h in normal if ":" not in h], "10.0.0.1", 80, abi.IPPROTO_TCP, 10, [(FIN, 0.9), (RST, 0.1)], 2, s - 200, e)
    b.clients(4026531840, [h for h in normal if ":" in h], "fd00::1", 80, abi.IPPROTO_TCP, 3, [(FIN, 1.0)], 2, s - 200, e)
    b.clients(4026531840, flood, "10.0.0.1", 80, abi.IPPROTO_TCP, 120, [(SYN, 1.0)], 0, s + 30, e - 60)


def _nat_churn(b: Builder) -> None:
    s, e = b.sim.start / NS, b.sim.end / NS
    rng = b.rng
    pods = {4026532301: _hosts("10.244.1.0/24", 12, rng), 4026532302: _hosts("10.244.2.0/24", 12, rng),
            4026532303: [f"fd00:10:244:3::{i:x}" for i in range(1, 9)]}
    for netns, hosts in pods.items():
        v6 = ":" in hosts[0]
        dns, web, gw = ("fd00:10:96::a", "2001:db8:80::80", "2001:db8:ffff::1") if v6 else ("10.96.0.10", "192.0.2.80", "203.0.113.1")
        b.clients(netns, hosts, dns, 53, abi.IPPROTO_UDP, 15, [(UDP_REPLIED, 0.9), (UDP_UNREPLIED, 0.1)], 0.05, s - 400, e, snat=gw)
        b.clients(netns, hosts, web, 443, abi.IPPROTO_TCP, 12, [(FIN, 0.8), (RST, 0.1), (IDLE, 0.07), (DELETED, 0.03)], 3, s - 400, e, snat=gw)


SCENARIOS: Dict[str, Scenario] = {
    "lost-fin": Scenario("lost-fin", "web servers in two netns; clients in 203.0.113.0/24 and 2001:db8:2::/64 lose FIN/RST, orphans pile up",
                         _lost_fin, dict(DEFAULT_SYSCTLS), 600, 6.0),
    "syn-flood": Scenario("syn-flood", "a SYN flood from 192.0.2.0/24 fills a small table (8192): early drops, then refused inserts",
                          _syn_flood, dict(DEFAULT_SYSCTLS, nf_conntrack_max=8192, nf_conntrack_buckets=2048, nf_conntrack_tcp_timeout_syn_sent=60), 300, 3.0),
    "nat-churn": Scenario("nat-churn", "a NAT gateway for three pod netns (one IPv6): DNS and HTTPS churn at a steady state, SNAT reply tuples",
                          _nat_churn, dict(DEFAULT_SYSCTLS, nf_conntrack_tcp_timeout_established=120), 600, 4.5),
}


def generate(name: str, seed: int = 1, events: Optional[int] = None) -> Tuple[SourceInfo, np.ndarray, np.ndarray]:
    """Run a scenario: (info with ground truth in extra, existing records, events)."""
    sc = SCENARIOS[name]
    start, end = BOOT_START, BOOT_START + sc.duration_s * NS
    sim = Simulation(sc.sysctls, start, end, seed)
    rng = random.Random(seed)
    base = _estimate_events(sc)
    scale = (events / base) if events else 1.0
    sc.build(Builder(sim, rng, scale))
    sim.run()
    existing, records = sim.arrays()
    info = SourceInfo(
        hostname=f"synthetic-{name}", kernel="synthetic", boot_to_wall_ns=WALL_OFFSET, start_boot_ns=start,
        sysctls=dict(sc.sysctls), probes=[{"function": "synthetic", "method": "model", "why": sc.summary}],
        synthetic=True, extra={"scenario": name, "seed": seed, "end_boot_ns": end, "ground_truth": _truth_json(sim)},
    )
    return info, existing, records


def _estimate_events(sc: Scenario) -> float:
    """Events the scenario produces at scale 1 (measured once per scenario and seed 1)."""
    return {"lost-fin": 100_000.0, "syn-flood": 45_000.0, "nat-churn": 128_000.0}[sc.name]


def _truth_json(sim: Simulation) -> Dict[str, Any]:
    t = sim.truth
    ips = []
    for row in t.by_ip.values():
        states = {k: v for k, v in row["states"].items() if v}
        ips.append(dict(row, states=states))
    return {
        "table": {"start_count": t.start_count, "end_count": len(sim.live), "peak_count": t.peak},
        "removals": dict(t.removals),
        "events_by_kind": dict(t.by_kind),
        "orphans_by_kind": {"socket-closed": t.orphans_by_kind["socket-closed"], "expired-established": t.orphans_by_kind["expired-established"]},
        "ips": ips,
        "drops_by_ip": [{"ip": ip, "netns": ns, "count": n} for (ip, ns), n in t.drops_by_ip.items()],
    }
