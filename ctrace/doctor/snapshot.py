"""Read every input once, in a fixed order, into one Snapshot; fold the (possibly huge)
conntrack table into counters as it streams, without keeping the entries."""

import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from ctrace.doctor import inputs as P
from ctrace.doctor.inputs import Inputs
from ctrace.doctor.parse import (
    CtEntry,
    SocketTable,
    Stats,
    parse_conntrack_s,
    parse_ct_line,
    parse_fib_trie,
    parse_if_inet6,
    parse_int,
    parse_modules,
    parse_proc_tcp,
    parse_slab_objsize,
    parse_stat_table,
    prefix_of,
)
from ctrace import kernel_defaults
from ctrace.doctor.ruleset import RulesetScan, scan_iptables_save, scan_nft

DEFAULT_TIMEOUTS = kernel_defaults.TIMEOUTS

# conntrack TCP state (as printed in the table) -> the sysctl holding its timeout
TCP_STATE_TIMEOUT = {
    "SYN_SENT": "nf_conntrack_tcp_timeout_syn_sent",
    "SYN_SENT2": "nf_conntrack_tcp_timeout_syn_sent",
    "SYN_RECV": "nf_conntrack_tcp_timeout_syn_recv",
    "ESTABLISHED": "nf_conntrack_tcp_timeout_established",
    "FIN_WAIT": "nf_conntrack_tcp_timeout_fin_wait",
    "CLOSE_WAIT": "nf_conntrack_tcp_timeout_close_wait",
    "LAST_ACK": "nf_conntrack_tcp_timeout_last_ack",
    "TIME_WAIT": "nf_conntrack_tcp_timeout_time_wait",
    "CLOSE": "nf_conntrack_tcp_timeout_close",
}

REQUIRED_SYSCTLS = (
    "nf_conntrack_count",
    "nf_conntrack_max",
    "nf_conntrack_buckets",
    "nf_conntrack_tcp_timeout_established",
)

UDP_FRESH_S = 5  # an unanswered UDP entry refreshed this recently: someone keeps sending
DEFAULT_RACE_WINDOW = 8.0
SRC_STATES_CAP = 100_000  # sources whose entries are also counted per state (memory bound)  # assumed when a tree carries no read timing

_LOOPBACK = ("127.", "::1")
_OLD = 1 << 62  # "idle for longer than any race": entries older than the current timeout


def _ints() -> "array[int]":
    return array("q")  # 8 bytes per value instead of a list of int objects


@dataclass
class LocalIP:
    """conntrack versus sockets for one local address (TCP only)."""

    ct_states: Counter = field(default_factory=Counter)  # conntrack TCP state -> entries
    orphans: int = 0  # ESTABLISHED entries with no socket of that 4-tuple
    orphan_idle: List[int] = field(default_factory=list)
    orphan_peers: Counter = field(default_factory=Counter)  # (peer, "server"|"client") -> entries
    young_unmatched: int = 0  # no socket, but young enough to be a read race


@dataclass
class TableSummary:
    source: str
    entries: int = 0
    bad_lines: int = 0
    first_bad_line: int = 0
    offloaded: int = 0
    by_proto: Counter = field(default_factory=Counter)
    by_state: Counter = field(default_factory=Counter)  # "tcp ESTABLISHED", "udp UNREPLIED", ...
    local_entries: int = 0
    forwarded_entries: int = 0
    est_entries: int = 0  # TCP ESTABLISHED
    est_idle_all: "array[int]" = field(default_factory=_ints)  # idle estimate, unambiguous entries
    est_idle_keep: "array[int]" = field(default_factory=_ints)  # same, without orphans
    est_ambiguous: int = 0  # remaining <= unacknowledged/max_retrans timeout: idle unknown
    above_timeout: int = 0  # remaining > configured timeout (timeout lowered since)
    local_ips: Dict[str, LocalIP] = field(default_factory=dict)
    orphans_checked: bool = False
    src_ips: Counter = field(default_factory=Counter)  # orig source, local addresses excluded
    src_states: Dict[str, Counter] = field(default_factory=dict)  # first SRC_STATES_CAP sources: by state
    prefix_states: Dict[str, Counter] = field(default_factory=dict)
    prefixes: Counter = field(default_factory=Counter)
    udp_entries: int = 0
    udp_unreplied: int = 0
    udp_unreplied_fresh: int = 0
    udp_unreplied_idle: "array[int]" = field(default_factory=_ints)
    udp_unreplied_dest: Counter = field(default_factory=Counter)  # "dst:dport" -> entries
    udp_unreplied_dnat: Counter = field(default_factory=Counter)  # "dst:dport -> backend:port"
    services: Counter = field(default_factory=Counter)  # ("tcp", port) -> entries
    ages: "array[int]" = field(default_factory=_ints)  # delta-time, when timestamps are on


@dataclass
class Snapshot:
    kind: str
    label: str
    meta: Dict[str, Any]
    sysctls: Dict[str, int]
    hashsize: Optional[int]
    stats: Optional[Stats]
    stats_later: Optional[Stats]  # a second read, `stats_interval` seconds later (--interval)
    stats_interval: Optional[float]
    keepalive: Optional[int]
    ipvs_conntrack: Optional[int]
    modules: Optional[Dict[str, List[str]]]
    slab_objsize: Optional[int]
    local_addrs: Set[str]
    local_source: str
    sockets: Optional[SocketTable]
    table: Optional[TableSummary]
    ruleset: Optional[RulesetScan]
    missing: Dict[str, str]
    notes: List[str]
    race_window: float
    race_window_known: bool

    def prefix_addresses(self, prefix: str) -> Counter:
        """Source addresses inside `prefix` (from the per-address counts)."""
        out: Counter = Counter()
        if self.table is not None:
            for ip, n in self.table.src_ips.items():
                if prefix_of(ip)[0] == prefix:
                    out[ip] = n
        return out

    def timeout(self, name: str) -> int:
        return self.sysctls.get(name, DEFAULT_TIMEOUTS.get(name, 0))

    @property
    def count(self) -> Optional[int]:
        return self.sysctls.get("nf_conntrack_count")

    @property
    def max(self) -> Optional[int]:
        return self.sysctls.get("nf_conntrack_max")

    @property
    def buckets(self) -> Optional[int]:
        return self.sysctls.get("nf_conntrack_buckets", self.hashsize)


class _Fold:
    """Folds table entries into a TableSummary, matching them against sockets."""

    def __init__(self, summary: TableSummary, snap_sysctls: Dict[str, int], local: Set[str],
                 sockets: Optional[SocketTable], race_window: float) -> None:
        self.s = summary
        self.t = lambda name: snap_sysctls.get(name, DEFAULT_TIMEOUTS[name])
        self.local = local
        self.race_window = race_window
        self.socket_keys: Optional[Set[Tuple[str, int, str, int]]] = None
        if sockets is not None:
            self.socket_keys = sockets.keys
            summary.orphans_checked = True
        self.clock_start: Optional[float] = None  # live: widen the window as the read goes on
        self.ambiguous_at = max(self.t("nf_conntrack_tcp_timeout_unacknowledged"), self.t("nf_conntrack_tcp_timeout_max_retrans"))

    def is_local(self, addr: str) -> bool:
        return addr in self.local or addr.startswith(_LOOPBACK)

    def add(self, e: CtEntry) -> None:
        s = self.s
        s.entries += 1
        if self.clock_start is not None and s.entries % 256 == 1:
            self.race_window = time.monotonic() - self.clock_start + 1.0
        s.by_proto[e.proto] += 1
        if e.offload:
            s.offloaded += 1
        if e.delta_time is not None:
            s.ages.append(e.delta_time)
        client = self.is_local(e.orig.src)
        server = self.is_local(e.reply.src)
        if client or server:
            s.local_entries += 1
        else:
            s.forwarded_entries += 1
        if e.proto == "tcp":
            label = f"tcp {e.state or 'NONE'}"
        elif e.proto == "udp":
            label = "udp UNREPLIED" if e.unreplied else ("udp ASSURED" if e.assured else "udp REPLIED")
        else:
            label = f"{e.proto} {e.state or ('UNREPLIED' if e.unreplied else 'REPLIED')}"
        s.by_state[label] += 1
        if not client:
            src = e.orig.src
            s.src_ips[src] += 1
            states = s.src_states.get(src)
            if states is None and len(s.src_states) < SRC_STATES_CAP:
                states = s.src_states[src] = Counter()
            if states is not None:
                states[label] += 1
            pfx, _ = prefix_of(src)
            s.prefixes[pfx] += 1
            pstates = s.prefix_states.get(pfx)
            if pstates is None:
                pstates = s.prefix_states[pfx] = Counter()
            pstates[label] += 1
        port = e.reply.sport if server else e.orig.dport
        if port is not None:
            s.services[(e.proto, port)] += 1
        if e.proto == "tcp":
            self._tcp(e, client, server)
        elif e.proto == "udp":
            self._udp(e)

    def _tcp(self, e: CtEntry, client: bool, server: bool) -> None:
        s = self.s
        state = e.state or "NONE"
        idle: Optional[int] = None
        race_idle: Optional[int] = None
        if e.timeout is not None and state in TCP_STATE_TIMEOUT:
            configured = self.t(TCP_STATE_TIMEOUT[state])
            if e.timeout > configured:
                # the timeout was lowered after this entry's last packet: it is old, its idle age unknown
                s.above_timeout += 1
                race_idle = _OLD
            else:
                idle = max(0, configured - e.timeout)
                race_idle = idle
            if idle is not None and state == "ESTABLISHED" and e.timeout <= self.ambiguous_at:
                # the kernel caps the timeout while data is unacknowledged or retransmitted
                race_idle = min(idle, max(0, self.ambiguous_at - e.timeout))
                idle = None
        if state == "ESTABLISHED":
            s.est_entries += 1
            if idle is not None:
                s.est_idle_all.append(idle)
            elif e.timeout is not None and race_idle != _OLD:
                s.est_ambiguous += 1
        orphan = False
        if client or server:
            ip = e.orig.src if client else e.reply.src
            row = self.s.local_ips.get(ip)
            if row is None:
                row = self.s.local_ips[ip] = LocalIP()
            row.ct_states[state] += 1
            if state == "ESTABLISHED" and self.socket_keys is not None:
                keys = []
                if client:
                    keys.append((e.orig.src, e.orig.sport, e.orig.dst, e.orig.dport))
                if server:
                    keys.append((e.reply.src, e.reply.sport, e.reply.dst, e.reply.dport))
                if not any(k in self.socket_keys for k in keys):
                    peer = e.orig.dst if client else e.reply.dst
                    if race_idle is not None and race_idle <= self.race_window:
                        row.young_unmatched += 1
                    else:
                        orphan = True
                        row.orphans += 1
                        row.orphan_peers[(peer, "client" if client else "server")] += 1
                        if idle is not None:
                            row.orphan_idle.append(idle)
        if state == "ESTABLISHED" and idle is not None and not orphan:
            s.est_idle_keep.append(idle)

    def _udp(self, e: CtEntry) -> None:
        s = self.s
        s.udp_entries += 1
        if not e.unreplied:
            return
        s.udp_unreplied += 1
        if e.timeout is not None:
            idle = max(0, self.t("nf_conntrack_udp_timeout") - e.timeout)
            s.udp_unreplied_idle.append(idle)
            if idle <= UDP_FRESH_S:
                s.udp_unreplied_fresh += 1
        dest = _hostport(e.orig.dst, e.orig.dport)
        s.udp_unreplied_dest[dest] += 1
        if e.reply.src != e.orig.dst or e.reply.sport != e.orig.dport:
            s.udp_unreplied_dnat[f"{dest} -> {_hostport(e.reply.src, e.reply.sport)}"] += 1


def _hostport(addr: str, port: Optional[int]) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _fold_lines(lines: Iterable[str], fold: _Fold) -> None:
    s = fold.s
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        e = parse_ct_line(line)
        if e is None:
            if line.startswith("conntrack v"):  # conntrack-tools' summary, if stderr was captured too
                continue
            s.bad_lines += 1
            if not s.first_bad_line:
                s.first_bad_line = n
            continue
        fold.add(e)


def load(inp: Inputs) -> Snapshot:
    """Read every input of `inp` (sockets before the table) and parse them."""
    notes: List[str] = list(inp.notes)
    sysctls: Dict[str, int] = {}
    names = inp.list_dir(P.NETFILTER)
    if names is not None:
        for name in names:
            value = parse_int(inp.read_text(f"{P.NETFILTER}/{name}", optional=True))
            if value is not None:
                sysctls[name] = value
    dir_reason = inp.missing.get(P.NETFILTER)
    for name in REQUIRED_SYSCTLS:
        if name not in sysctls:
            inp.missing[f"{P.NETFILTER}/{name}"] = dir_reason or P.NOT_PRESENT
    inp.missing.pop(P.NETFILTER, None)

    hashsize = parse_int(inp.read_text(P.HASHSIZE, optional="nf_conntrack_buckets" in sysctls))

    stats: Optional[Stats] = None
    text = inp.read_text(P.STAT)
    if text is not None:
        stats = parse_stat_table(text, P.STAT)
        if stats is None:
            inp.missing[P.STAT] = "damaged: no header line starting with 'entries'"
    if stats is None and _may_fall_back(inp, P.STAT):
        text = inp.read_text(P.CT_STATS)
        if text is not None:
            stats = parse_conntrack_s(text, P.CT_STATS)
            if stats is None:
                inp.missing[P.CT_STATS] = "damaged: no 'cpu=' lines"
            else:
                inp.missing.pop(P.STAT, None)
                notes.append("statistics come from `conntrack -S` (no /proc/net/stat/nf_conntrack)")
    if stats is not None and stats.bad_rows:
        notes.append(f"{stats.source}: {stats.bad_rows} damaged rows ignored")

    keepalive = parse_int(inp.read_text(P.KEEPALIVE))
    ipvs = parse_int(inp.read_text(P.IPVS_CONNTRACK, optional=True))
    osrelease = inp.read_text(P.OSRELEASE, optional=True)
    if osrelease and not inp.meta.get("kernel"):
        inp.meta["kernel"] = osrelease.strip()
    text = inp.read_text(P.MODULES)
    modules = parse_modules(text) if text is not None else None
    text = inp.read_text(P.SLABINFO)
    slab = parse_slab_objsize(text) if text is not None else None

    local: Set[str] = set()
    sources = []
    text = inp.read_text(P.FIB_TRIE)
    if text is not None:
        local |= parse_fib_trie(text)
        sources.append("fib_trie")
    text = inp.read_text(P.IF_INET6)
    if text is not None:
        local |= parse_if_inet6(text)
        sources.append("if_inet6")

    sockets: Optional[SocketTable] = None
    for path in (P.TCP4, P.TCP6):
        lines = inp.iter_lines(path)
        if lines is not None:
            sockets = parse_proc_tcp(lines, inp.byteorder, sockets)
    if sockets is not None:
        if sockets.bad_lines:
            notes.append(f"/proc/net/tcp*: {sockets.bad_lines} damaged lines ignored")
        if not sources:
            local |= sockets.addresses
            sources.append("socket addresses only")
            notes.append(
                "local addresses taken from sockets only (no fib_trie/if_inet6): "
                "an address with no socket left is treated as forwarded traffic"
            )

    # A connection opened after the socket lists were read has an entry but no socket:
    # it is at most `race_window` seconds idle, so younger unmatched entries are not orphans.
    race_window = DEFAULT_RACE_WINDOW
    window_known = False
    if inp.kind != "live":
        recorded = inp.race_window()
        if recorded is not None:
            race_window, window_known = recorded + 1.0, True
    table: Optional[TableSummary] = None
    table_path = P.TABLE
    lines = inp.iter_lines(P.TABLE)
    if lines is None and _may_fall_back(inp, P.TABLE):
        lines = inp.iter_lines(P.CT_LIST)
        table_path = P.CT_LIST
    if lines is not None:
        table = TableSummary(source=table_path)
        fold = _Fold(table, sysctls, local, sockets, race_window)
        if inp.kind == "live":
            starts = [inp.timing[p][0] for p in (P.TCP4, P.TCP6) if p in inp.timing]
            if starts:
                fold.clock_start, window_known = min(starts), True
        _fold_lines(lines, fold)
        if fold.clock_start is not None:
            race_window = time.monotonic() - fold.clock_start + 1.0
        if table_path == P.CT_LIST:
            inp.missing.pop(P.TABLE, None)
            notes.append("table read through `conntrack -L -o extended` (no /proc/net/nf_conntrack)")
        if table.bad_lines:
            notes.append(f"{table_path}: {table.bad_lines} damaged lines ignored (first at line {table.first_bad_line})")

    scan: Optional[RulesetScan] = None
    texts: Dict[str, str] = {}
    for path in P.RULESETS:
        text = inp.read_text(path)
        if text is not None:
            texts[path] = text
            scan = scan or RulesetScan()
            (scan_nft if path == P.NFT else scan_iptables_save)(text, path, scan)
    for legacy, names_path, modern in P.LEGACY_RULESETS:
        if inp.kind == "live":
            loaded = inp.read_text(names_path, optional=True)
            if not loaded or not loaded.strip():
                continue
        text = inp.read_text(legacy, optional=True)
        if text is None or text == texts.get(modern):
            continue
        scan = scan or RulesetScan()
        scan_iptables_save(text, legacy, scan)

    later: Optional[Stats] = None
    interval: Optional[float] = None
    text = inp.read_text(P.STAT_LATER, optional=True)
    if text is not None and stats is not None and stats.source == P.STAT:
        later = parse_stat_table(text, P.STAT_LATER)
        first, second = inp.started(P.STAT), inp.started(P.STAT_LATER)
        if later is None:
            notes.append(f"{P.STAT_LATER} is damaged: no growth computed")
        elif first is not None and second is not None:
            interval = round(second - first, 3)

    return Snapshot(
        kind=inp.kind,
        label=inp.label,
        meta=dict(inp.meta),
        sysctls=sysctls,
        hashsize=hashsize,
        stats=stats,
        stats_later=later,
        stats_interval=interval,
        keepalive=keepalive,
        ipvs_conntrack=ipvs,
        modules=modules,
        slab_objsize=slab,
        local_addrs=local,
        local_source="+".join(sources) or "none",
        sockets=sockets,
        table=table,
        ruleset=scan,
        missing=dict(inp.missing),
        notes=notes + [n for n in inp.notes if n not in notes],
        race_window=race_window,
        race_window_known=window_known,
    )


def _may_fall_back(inp: Inputs, path: str) -> bool:
    """Try the conntrack-tools copy of `path`? Live: only when the file is absent (the
    command needs the same privilege); trees and bundles: whenever it is missing."""
    if inp.kind != "live":
        return True
    return inp.missing.get(path, "").startswith(P.NOT_PRESENT)
