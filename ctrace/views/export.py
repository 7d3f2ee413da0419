"""`ctrace export`: a snapshot as Prometheus metric families (pure: no I/O, no prometheus_client).

Every family has a fixed set of series whatever the traffic:

- global series: one per family, or one per fixed label value (removal reasons,
  orphan kinds, drop reasons, loss causes, kernel counters);
- per netns: the netns chosen by `NetnsSelection` (at most `max_netns`) plus `other`;
- per address and per prefix: the top K by live entries plus `other`.

`series_bound(top_k, max_netns)` is the exact maximum; docs/EXPORT.md derives it.
Counters (`_total`) are cumulative from the model and never go down between
snapshots of one run; per-address detail is gauges only, because membership of a
top K changes (a counter summed into `other` would go down when a key leaves it).
"""

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ctrace import abi
from ctrace.keys import label
from ctrace.keytable import RowTable
from ctrace.model import DROP_REASONS, ORPHAN_KINDS, REMOVAL_REASONS, Snapshot

COUNTER, GAUGE = "counter", "gauge"
OTHER = "other"
LOST_CAUSES = tuple(c.name.lower() for c in abi.LostCause)
KERNEL_STATS = ("insert_failed", "drop", "early_drop")  # kernel's own conntrack counters (procfs/netlink)


@dataclass(frozen=True)
class Family:
    """One metric family: name (counters end in `_total`), type, help, label names, samples."""

    name: str
    kind: str
    help: str
    labels: Tuple[str, ...] = ()
    samples: Tuple[Tuple[Tuple[str, ...], float], ...] = ()


@dataclass
class NetnsSelection:
    """Which network namespaces get their own series (the rest are summed into `other`).

    Counters summed into `other` must never go down, so a namespace that was ever
    part of `other` never leaves it: new namespaces are admitted while there is
    room; when there is none, a chosen namespace with no live entries (the longest
    idle first) is retired into `other` for good to make room. State, no I/O."""

    max_netns: int = 128
    chosen: Dict[int, int] = field(default_factory=dict)  # netns -> order of admission
    retired: Set[int] = field(default_factory=set)
    _seq: int = 0

    def update(self, netns: np.ndarray, live: np.ndarray) -> Set[int]:
        """Given every known netns and its live entries, return the chosen set."""
        known = netns.tolist()
        live_of = dict(zip(known, live.tolist()))
        for ns in [n for n in self.chosen if n not in live_of]:  # evicted from the model's table
            del self.chosen[ns]
            self.retired.add(ns)
        newcomers = [n for n in known if n not in self.chosen and n not in self.retired]
        newcomers.sort(key=lambda n: (-live_of[n], n))
        for ns in newcomers:
            if len(self.chosen) >= self.max_netns:
                idle = [n for n in self.chosen if live_of.get(n, 0) == 0]
                if not idle or live_of[ns] == 0:
                    self.retired.add(ns)
                    continue
                oldest = min(idle, key=lambda n: self.chosen[n])
                del self.chosen[oldest]
                self.retired.add(oldest)
            self._seq += 1
            self.chosen[ns] = self._seq
        return set(self.chosen)


def series_bound(top_k: int, max_netns: int) -> int:
    """The most series `families()` can produce (docs/EXPORT.md)."""
    return _global_series() + (max_netns + 1) * _NETNS_SERIES + 2 * (top_k + 1) * _SOURCE_SERIES


def _global_series() -> int:
    return len(_GLOBAL_SINGLE) + len(REMOVAL_REASONS) + len(ORPHAN_KINDS) + len(DROP_REASONS) + len(LOST_CAUSES) \
        + len(KERNEL_STATS)


_GLOBAL_SINGLE = (
    "ctrace_info", "ctrace_entries", "ctrace_entries_max", "ctrace_entries_peak", "ctrace_kernel_entries",
    "ctrace_hash_buckets", "ctrace_fill_ratio", "ctrace_inserts_total", "ctrace_events_total",
    "ctrace_insert_rate_per_second", "ctrace_expiry_rate_per_second",
    "ctrace_rate_window_seconds", "ctrace_time_to_full_seconds", "ctrace_trace_duration_seconds",
    "ctrace_untracked_entries", "ctrace_keys_evicted_total", "ctrace_ring_buffer_bytes", "ctrace_ring_buffer_peak_bytes",
)
_NETNS_SERIES = 7 + len(REMOVAL_REASONS)  # entries, orphaned, inserts, orphans, drops, two rates + removals
_SOURCE_SERIES = 4  # entries, orphaned entries, insert rate, removal rate


def families(s: Snapshot, top_k: int = 20, netns: Optional[Iterable[int]] = None,
             window: bool = True) -> List[Family]:
    """Every metric family for one snapshot. `netns`: the namespaces with their own
    series (None = all); `window`: rates and time to full over the sliding window
    (live) or over the whole run (a folded recording, as `ctrace report`)."""
    out: List[Family] = []

    def g(name: str, help_: str, value: Optional[float]) -> None:
        out.append(Family(name, GAUGE, help_, (), (((), float(value)),) if value is not None else ()))

    def c(name: str, help_: str, value: float) -> None:
        out.append(Family(name, COUNTER, help_, (), (((), float(value)),)))

    def by(name: str, kind: str, help_: str, lbl: str, values: Dict[str, int], names: Sequence[str]) -> None:
        out.append(Family(name, kind, help_, (lbl,), tuple(((n,), float(values.get(n, 0))) for n in names)))

    info = s.info
    out.append(Family("ctrace_info", GAUGE, "Always 1: the traced host, its kernel, and whether the data is synthetic.",
                      ("hostname", "kernel", "synthetic"),
                      (((info.hostname, info.kernel, "true" if info.synthetic else "false"), 1.0),)))
    g("ctrace_entries", "Conntrack entries in the table (all netns).", s.count)
    g("ctrace_entries_max", "nf_conntrack_max: entries the table may hold.", s.table_max)
    g("ctrace_entries_peak", "Most entries seen at once since ctrace started.", s.peak_count)
    g("ctrace_kernel_entries", "nf_conntrack_count as the kernel reports it (sampled).", s.kernel_count)
    g("ctrace_hash_buckets", "nf_conntrack_buckets.", s.buckets)
    g("ctrace_fill_ratio", "Entries / nf_conntrack_max.", s.fill)
    c("ctrace_inserts_total", "Entries inserted (confirmed) since ctrace started.", s.inserts)
    by("ctrace_removals_total", COUNTER, "Entries removed, by reason (see docs/REPORT.md).", "reason", s.removals,
       REMOVAL_REASONS)
    by("ctrace_orphans_total", COUNTER, "Entries whose connection ended without conntrack seeing FIN or RST.", "kind",
       s.orphans_by_kind, ORPHAN_KINDS)
    by("ctrace_drops_total", COUNTER, "New entries refused: table full or insert failed.", "reason",
       s.drops_by_reason, DROP_REASONS)
    by("ctrace_events_lost_total", COUNTER, "Events lost before ctrace counted them, by cause; counts are then lower "
       "bounds.", "cause", s.lost, LOST_CAUSES)
    c("ctrace_events_total", "Event records folded (including the initial table dump).", s.events_total)
    by("ctrace_kernel_stat_total", COUNTER, "The kernel's own conntrack statistics (sampled).", "name",
       s.kernel_counters, KERNEL_STATS)
    ins, exp = s.rates(window)
    g("ctrace_insert_rate_per_second", "Inserts per second" + (" over the sliding window." if window else
      " over the whole run."), ins)
    g("ctrace_expiry_rate_per_second", "Removals per second" + (" over the sliding window." if window else
      " over the whole run."), exp)
    g("ctrace_rate_window_seconds", "Length of the window the rates cover.", s.window_s if window else s.duration_s)
    ttf = s.time_to_full_s(window)
    g("ctrace_time_to_full_seconds", "Seconds until the table is full at the current net growth (+Inf: not growing).",
      ttf if ttf is not None else (float("inf") if s.table_max else None))
    g("ctrace_trace_duration_seconds", "Seconds of kernel time the model covers.", s.duration_s)
    g("ctrace_untracked_entries", "Live entries whose address was evicted from the bounded key table.",
      s.untracked.get("live", 0))
    c("ctrace_keys_evicted_total", "Addresses evicted from the bounded key table.", s.untracked.get("keys_evicted", 0))
    g("ctrace_ring_buffer_bytes", "Size of the BPF ring buffer ctrace reads events from (live traces).",
      s.ring.size_bytes if s.ring else None)
    g("ctrace_ring_buffer_peak_bytes", "Most bytes waiting in the ring buffer when ctrace came to read it, over the "
      "last second: near its size, records are about to be lost.", s.ring.peak_bytes if s.ring else None)
    out.extend(_netns_families(s, netns))
    out.extend(_source_families(s.ips, "ip", "address", top_k, s.count))
    out.extend(_source_families(s.prefixes, "prefix", "prefix", top_k, s.count))
    return out


def _netns_families(s: Snapshot, chosen: Optional[Iterable[int]]) -> List[Family]:
    t = s.netns
    ns = (t.words[0] & np.uint64(0xFFFFFFFF)).astype(np.int64) if len(t) else np.zeros(0, np.int64)
    keep = np.ones(len(t), bool) if chosen is None else np.isin(ns, np.fromiter(chosen, np.int64))
    order = np.lexsort((ns, -t.live))
    rows = [i for i in order.tolist() if keep[i]]
    rest = ~keep
    names = [str(int(ns[i])) for i in rows] + [OTHER]

    def col(values: np.ndarray) -> List[float]:
        v = np.asarray(values, dtype=np.float64)
        return [float(v[i]) for i in rows] + [float(v[rest].sum())]

    def fam(name: str, kind: str, help_: str, values: np.ndarray) -> Family:
        return Family(name, kind, help_, ("netns",), tuple(((n,), x) for n, x in zip(names, col(values))))

    # entries in `other` include those the model could not attribute (untracked), so the
    # netns entries always add up to ctrace_entries
    live = col(t.live)
    live[-1] = float(s.count) - sum(live[:-1])
    out = [
        Family("ctrace_netns_entries", GAUGE, "Conntrack entries per network namespace (inode).", ("netns",),
               tuple(((n,), x) for n, x in zip(names, live))),
        fam("ctrace_netns_orphaned_entries", GAUGE, "Live entries per netns whose local socket closed without FIN/RST.",
            t.orphans_live),
        fam("ctrace_netns_inserts_total", COUNTER, "Entries inserted per netns.", t.created),
        fam("ctrace_netns_orphans_total", COUNTER, "Orphans per netns (both kinds).", t.orphans),
        fam("ctrace_netns_drops_total", COUNTER, "New entries refused per netns.", t.drops),
        fam("ctrace_netns_insert_rate_per_second", GAUGE, "Inserts per second per netns since the previous snapshot.",
            t.new_per_s),
        fam("ctrace_netns_expiry_rate_per_second", GAUGE, "Removals per second per netns since the previous snapshot.",
            t.gone_per_s),
    ]
    samples = []
    rm = t.removals if len(t) else np.zeros((0, len(REMOVAL_REASONS)), np.int64)
    for j, reason in enumerate(t.removal_names if len(t) else REMOVAL_REASONS):
        samples += [((n, reason), x) for n, x in zip(names, col(rm[:, j]))]
    out.append(Family("ctrace_netns_removals_total", COUNTER, "Entries removed per netns, by reason.",
                      ("netns", "reason"), tuple(samples)))
    return out


def _source_families(t: RowTable, lbl: str, what: str, top_k: int, total_live: int) -> List[Family]:
    rows = t.order("live", t.live > 0, top_k)[:top_k] if len(t) else np.zeros(0, np.int64)
    rest = np.ones(len(t), bool)
    rest[rows] = False
    keys = [label(tuple(int(w[i]) for w in t.words), t.by) for i in rows.tolist()]
    netns = ((t.words[0][rows] & np.uint64(0xFFFFFFFF)).astype(np.int64).tolist()) if len(rows) else []
    names = [(k, str(n)) for k, n in zip(keys, netns)] + [(OTHER, "")]

    def fam(name: str, help_: str, values: np.ndarray, other: Optional[float] = None) -> Family:
        v = np.asarray(values, dtype=np.float64)
        vals = [float(x) for x in v[rows]] + [float(v[rest].sum()) if other is None else other]
        return Family(name, GAUGE, help_, (lbl, "netns"), tuple((n, x) for n, x in zip(names, vals)))

    top_live = float(np.asarray(t.live)[rows].sum()) if len(rows) else 0.0
    return [
        fam(f"ctrace_{lbl}_entries", f"Live entries of the top {top_k} source {what}es by live entries; "
            f"`other` holds every other entry.", t.live, float(total_live) - top_live),
        fam(f"ctrace_{lbl}_orphaned_entries", f"Live orphaned entries of the same top {top_k} {what}es.",
            t.orphans_live),
        fam(f"ctrace_{lbl}_insert_rate_per_second", f"Inserts per second of the same top {top_k} {what}es "
            "since the previous snapshot.", t.new_per_s),
        fam(f"ctrace_{lbl}_expiry_rate_per_second", f"Removals per second of the same top {top_k} {what}es "
            "since the previous snapshot.", t.gone_per_s),
    ]


def netns_ids(s: Snapshot) -> Tuple[np.ndarray, np.ndarray]:
    """(netns inode, live entries) of every netns the snapshot knows."""
    t = s.netns
    if not len(t):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (t.words[0] & np.uint64(0xFFFFFFFF)).astype(np.int64), np.asarray(t.live, np.int64)


def skipped_runs_family(skips: Mapping[str, Optional[int]]) -> Family:
    """Live only: runs of each loaded BPF program the kernel skipped (its recursion_misses),
    one series per program whose kernel counts them (None: no series, never a made-up 0).
    Their sum is ctrace_events_lost_total{cause="probe_skipped"}; which program says which
    counts a loss touches (docs/PROBES.md)."""
    return Family("ctrace_probe_skipped_runs_total", COUNTER,
                  "Runs of each BPF program the kernel skipped; each may have lost one event.", ("program",),
                  tuple(((name,), float(n)) for name, n in sorted(skips.items()) if n is not None))


def series_count(fams: Sequence[Family]) -> int:
    return sum(len(f.samples) for f in fams)


__all__ = ["Family", "NetnsSelection", "families", "series_bound", "series_count", "netns_ids", "skipped_runs_family"]
