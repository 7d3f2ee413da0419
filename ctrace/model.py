"""The lifecycle model: pure, no I/O. Fold batches of events into live state and
counters; `snapshot()` returns an immutable summary the views render.

Live entries are kept as one numpy table (the latest record of each entry);
counters per address, prefix and netns live in bounded LRU caches whose
evictions are counted ("untracked"). Every batch is processed with whole-array
operations: no per-event Python.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from ctrace import abi
from ctrace.columns import Columns, take
from ctrace.grouping import first_last, group_max, group_min, group_rows, hash_rows, maybe_in
from ctrace.keytable import Ages, KeyTable, Row, RowTable, bounded_samples
from ctrace.keys import EventFilter, Key, KeySpace, addr_text, label, netns_of, proto_name
from ctrace.sources.base import SourceInfo

K = abi.Kind
NS = 1_000_000_000

REMOVAL_REASONS = (
    "fin",
    "rst",
    "timeout-established",
    "timeout-closing",
    "timeout-handshake",
    "timeout",
    "early-drop",
    "delete",
    "netns",
    "killed",
    "unknown",
)
_R = {name: i for i, name in enumerate(REMOVAL_REASONS)}
DROP_REASONS = ("table-full", "insert-failed")
ORPHAN_KINDS = ("socket-closed", "expired-established")

COLUMNS = (
    ("created", "destroyed")
    + tuple("rm:" + r for r in REMOVAL_REASONS)
    + ("drops",)
    + tuple("drop:" + r for r in DROP_REASONS)
    + tuple("orphans:" + k for k in ORPHAN_KINDS)
)
_C = {name: i for i, name in enumerate(COLUMNS)}

TCP_STATE_NAMES = tuple(s.name for s in abi.TcpState)
STATE_NAMES = TCP_STATE_NAMES + ("UDP", "UDP_UNREPLIED", "OTHER")
_S_UDP, _S_UDP_UNREPLIED, _S_OTHER = len(TCP_STATE_NAMES), len(TCP_STATE_NAMES) + 1, len(TCP_STATE_NAMES) + 2

# Lifetime histogram: 8 bins per octave from 2^-10 s (~1 ms) to 2^23 s (~97 days).
_LT_SUB = 8
_LT_MIN_EXP = -10
_LT_BINS = (23 - _LT_MIN_EXP) * _LT_SUB + 1

_FLAG_ORPHANED_LIVE = 0x80  # model-private bit in the live table: socket closed while ESTABLISHED
_ENTRY_LUT = np.zeros(256, dtype=bool)
_ENTRY_LUT[[K.NEW, K.EXISTING, K.STATE, K.ORPHAN, K.DESTROY]] = True
# Records counted per address. STATE records change no counter (live states come
# from the live table), so they are left out of the per-address pass.
_KEYED_LUT = _ENTRY_LUT.copy()
_KEYED_LUT[K.DROP] = True
_KEYED_LUT[K.STATE] = False
_LIVE_KIND = 0  # kind value of live-table rows inside a merge
# What the live table keeps of an entry's latest record: what keys, states, ages, filters
# and the matching of listed entries read (the reply tuple, pid, timeout... are not kept:
# every batch writes the entries it touches, so each field kept costs a gather and a scatter).
LIVE_FIELDS = ("ts_boot_ns", "ct_id", "start_boot_ns", "netns_ino", "status_raw", "orig_src", "orig_dst",
               "orig_sport_be", "orig_dport_be", "zone", "kind", "family", "l4proto", "ct_state", "flags")
# Every field folding reads of an event (readers need not deliver the others).
EVENT_FIELDS = LIVE_FIELDS + ("reason", "value")
# What a snapshot reads of the live entries.
_SNAPSHOT_FIELDS = ("netns_ino", "family", "orig_src", "orig_dst", "orig_dport_be", "l4proto", "ct_state", "status_raw",
                    "flags", "start_boot_ns")
_ORPHAN_FIELDS = ("family", "l4proto", "orig_src", "orig_sport_be", "orig_dst", "orig_dport_be", "netns_ino",
                  "start_boot_ns", "flags", "ct_state", "ts_boot_ns")


_PARALLEL_MIN = 1 << 16  # batch size from which the two halves of a fold run side by side
_side: List[ThreadPoolExecutor] = []


def _side_thread() -> ThreadPoolExecutor:
    if not _side:
        _side.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrace-fold"))
    return _side[0]


class _Cols:
    """The fields of records ev[idx], each gathered on first use: no record copies
    (fresh memory for whole records is the dearest thing a batch can ask for)."""

    def __init__(self, ev: Columns, idx: Optional[np.ndarray] = None) -> None:
        self.ev, self.idx = ev, idx
        self._cache: Dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ev) if self.idx is None else len(self.idx)

    def __getitem__(self, name: str) -> np.ndarray:
        col = self._cache.get(name)
        if col is None:
            col = self.ev[name] if self.idx is None else take(self.ev[name], self.idx)
            self._cache[name] = col
        return col

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Field `name` of a few of these records (without gathering the whole field)."""
        col = self._cache.get(name)
        if col is not None:
            return take(col, rows)
        return take(self.ev[name], rows if self.idx is None else self.idx[rows])

    def sub(self, sel: np.ndarray) -> "_Cols":
        return _Cols(self.ev, sel if self.idx is None else self.idx[sel])

    def record(self, i: int) -> Dict[str, Any]:
        return self.ev.record(i if self.idx is None else int(self.idx[i]))


def _removal_rules(mech: np.ndarray, tcp: np.ndarray, st: np.ndarray) -> np.ndarray:
    """Removal mechanism, TCP or not, conntrack state at removal -> index into REMOVAL_REASONS."""
    T = abi.TcpState
    r = np.full(len(mech), _R["unknown"], dtype=np.int64)
    timeout = mech == abi.DestroyReason.TIMEOUT
    ended = timeout | (mech == abi.DestroyReason.KILL)
    r[mech == abi.DestroyReason.KILL] = _R["killed"]
    r[timeout & ~tcp] = _R["timeout"]
    r[timeout & tcp & np.isin(st, (T.NONE, T.SYN_SENT, T.SYN_RECV, T.SYN_SENT2))] = _R["timeout-handshake"]
    r[timeout & tcp & np.isin(st, (T.FIN_WAIT, T.CLOSE_WAIT, T.LAST_ACK))] = _R["timeout-closing"]
    r[timeout & tcp & (st == T.ESTABLISHED)] = _R["timeout-established"]
    r[ended & tcp & (st == T.TIME_WAIT)] = _R["fin"]
    r[ended & tcp & (st == T.CLOSE)] = _R["rst"]
    r[mech == abi.DestroyReason.EARLY_DROP] = _R["early-drop"]
    r[mech == abi.DestroyReason.DELETE] = _R["delete"]
    r[mech == abi.DestroyReason.NETNS] = _R["netns"]
    return r


# The rules above for every (mechanism, tcp, state) triple, looked up per record. Values
# past the last known mechanism and state are clipped to one past it (no rule names it).
_MECHS, _STATES = max(abi.DestroyReason) + 2, max(abi.TcpState) + 2
_GRID = np.arange(_MECHS * 2 * _STATES)
_REMOVAL_LUT = _removal_rules(_GRID // (2 * _STATES), ((_GRID // _STATES) & 1).astype(bool), _GRID % _STATES)


def removal_reasons(ev: Any) -> np.ndarray:
    """DESTROY records -> index into REMOVAL_REASONS (mechanism + protocol + state at removal)."""
    i = np.minimum(ev["reason"], _MECHS - 1).astype(np.int32) * (2 * _STATES)
    i += (ev["l4proto"] == abi.IPPROTO_TCP).astype(np.int32) * _STATES
    i += np.minimum(ev["ct_state"], _STATES - 1)
    return _REMOVAL_LUT[i]


def state_codes(ev: np.ndarray) -> np.ndarray:
    """Records -> index into STATE_NAMES."""
    code = np.full(len(ev), _S_OTHER, dtype=np.int64)
    tcp = ev["l4proto"] == abi.IPPROTO_TCP
    code[tcp] = np.minimum(ev["ct_state"][tcp], len(TCP_STATE_NAMES) - 1)
    udp = ev["l4proto"] == abi.IPPROTO_UDP
    replied = (ev["status_raw"] & abi.IPS_SEEN_REPLY) != 0
    code[udp & replied] = _S_UDP
    code[udp & ~replied] = _S_UDP_UNREPLIED
    return code


def _lifetime_bins(seconds: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        b = np.floor(np.log2(np.maximum(seconds, 1e-12)) * _LT_SUB) - _LT_MIN_EXP * _LT_SUB
    return np.clip(b, 0, _LT_BINS - 1).astype(np.int64)


def _bin_upper_s(b: int) -> float:
    return float(2.0 ** ((b + 1) / _LT_SUB + _LT_MIN_EXP))


@dataclass(frozen=True)
class ModelOptions:
    keys: KeySpace = KeySpace()
    max_keys: int = 65536  # addresses (and as many prefixes) kept before LRU eviction
    rate_window_s: int = 10  # sliding window for live rates
    orphan_list_max: int = 1000
    drop_samples: int = 5
    filter: EventFilter = EventFilter()


@dataclass(frozen=True)
class RingUse:
    """How full ctrace's ring buffer got before the reader emptied it (live traces with a
    BPF ring buffer): size, the peak of the last sampling period, the peak of the run."""
    size_bytes: int
    peak_bytes: int
    max_peak_bytes: int


@dataclass(frozen=True)
class Snapshot:
    info: SourceInfo
    by: str
    start_boot_ns: int
    now_boot_ns: int
    interval_s: float  # since the previous snapshot (for per-row rates)
    events_total: int
    events_by_kind: Dict[str, int]
    lost: Dict[str, int]
    table_max: Optional[int]
    buckets: Optional[int]
    start_count: int
    count: int
    peak_count: int
    kernel_count: Optional[int]
    inserts: int
    removals_total: int
    window_s: float
    window_insert_rate: float
    window_expire_rate: float
    removals: Dict[str, int]
    lifetimes: Dict[str, Dict[str, Any]]
    ips: RowTable
    prefixes: RowTable
    netns: RowTable
    orphans: Tuple[Dict[str, Any], ...]
    orphans_by_kind: Dict[str, int]
    drops_by_reason: Dict[str, int]
    untracked: Dict[str, int]
    kernel_counters: Dict[str, int]
    ring: Optional[RingUse] = None

    @property
    def duration_s(self) -> float:
        return max(0.0, (self.now_boot_ns - self.start_boot_ns) / NS)

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())

    @property
    def fill(self) -> Optional[float]:
        return self.count / self.table_max if self.table_max else None

    def rates(self, window: bool) -> Tuple[float, float]:
        """(inserts/s, expiries/s) over the sliding window or the whole run."""
        if window:
            return self.window_insert_rate, self.window_expire_rate
        d = self.duration_s
        return (self.inserts / d, self.removals_total / d) if d > 0 else (0.0, 0.0)

    def time_to_full_s(self, window: bool) -> Optional[float]:
        """Seconds until count reaches max at the current net growth, None if not growing."""
        if not self.table_max:
            return None
        if self.count >= self.table_max:
            return 0.0
        ins, exp = self.rates(window)
        growth = ins - exp if window else ((self.count - self.start_count) / self.duration_s if self.duration_s else 0.0)
        if growth <= 0:
            return None
        return (self.table_max - self.count) / growth


class Model:
    def __init__(self, info: SourceInfo, options: Optional[ModelOptions] = None) -> None:
        self.info = info
        self.opt = options or ModelOptions()
        self._slots = Columns.zeros(0, LIVE_FIELDS)  # live entries, one per alive slot
        self._alive = np.zeros(0, dtype=bool)
        self._n_alive = 0
        self._ids_per_record = 0.0  # distinct entries per record in the last merge (sizes the next one's Bloom filter)
        self.start_boot_ns = info.start_boot_ns
        self.now_boot_ns = info.start_boot_ns
        self.start_count = 0
        self.peak_count = 0
        self.events_total = 0
        self.by_kind = np.zeros(16, dtype=np.int64)
        self.lost = np.zeros(8, dtype=np.int64)
        self.removals = np.zeros(len(REMOVAL_REASONS), dtype=np.int64)
        self.drops = np.zeros(len(DROP_REASONS), dtype=np.int64)
        self.orphans_by_kind = np.zeros(len(ORPHAN_KINDS), dtype=np.int64)
        self.lifetime_hist = np.zeros((len(REMOVAL_REASONS), _LT_BINS), dtype=np.int64)
        self.lifetime_max = np.zeros(len(REMOVAL_REASONS), dtype=np.float64)
        self.inserts = 0
        self.removals_total = 0
        self.removed_unborn = 0  # removals of entries neither listed at start nor seen created
        self.counters: Dict[int, int] = {}
        self.ring_max_peak = 0  # the largest RING_PEAK_BYTES counter so far
        self.ips = KeyTable(self.opt.max_keys, len(COLUMNS))
        self.prefixes = KeyTable(self.opt.max_keys, len(COLUMNS))
        self.netns = KeyTable(self.opt.max_keys, len(COLUMNS))
        self.orphan_list: Deque[Dict[str, Any]] = deque(maxlen=self.opt.orphan_list_max)
        self._orphan_parts: Deque[Tuple[int, Dict[str, np.ndarray]]] = deque()  # not yet in orphan_list
        self._orphans_pending = 0
        self._per_sec: Dict[int, List[int]] = {}  # second -> [inserts, removals]
        self._prev_snapshot_ns = info.start_boot_ns
        self._seeded = False

    # ---- folding -------------------------------------------------------
    def seed(self, existing: Union[Columns, np.ndarray]) -> None:
        """The entries present when tracing began: they set the starting count."""
        self.apply(existing)
        self.start_count = self.peak_count = self._n_alive
        self._seeded = True

    def apply(self, events: Union[Columns, np.ndarray]) -> None:
        """Fold a batch of events (in time order, or sorted here) into the model."""
        ev = Columns.of(events)
        if self.opt.filter.active and len(ev):
            ev = ev[self.opt.filter.mask(ev)]
        if not len(ev):
            return
        ts = ev["ts_boot_ns"]
        if len(ev) > 1 and (ts[1:] < ts[:-1]).any():
            ev = ev[np.argsort(ts, kind="stable")]
            ts = ev["ts_boot_ns"]
        self.events_total += len(ev)
        kind = ev["kind"]
        per_kind = np.bincount(kind, minlength=16)[:16]
        self.by_kind += per_kind
        self.now_boot_ns = max(self.now_boot_ns, int(ts[-1]))
        if per_kind[K.LOST]:
            lost = np.flatnonzero(kind == K.LOST)
            self.lost += np.bincount(ev["reason"][lost], weights=ev["value"][lost], minlength=8)[:8].astype(np.int64)
        if per_kind[K.COUNTER]:  # (live-table records, seeding a filtered view, have no "reason")
            counters = np.flatnonzero(kind == K.COUNTER)
            for cid, val in zip(ev["reason"][counters].tolist(), ev["value"][counters].tolist()):
                self.counters[cid] = val
                if cid == abi.Counter.RING_PEAK_BYTES:
                    self.ring_max_peak = max(self.ring_max_peak, val)
        # Rows of entry records and of records counted per key (None: every row).
        n_entry, n_keyed = int(per_kind[_ENTRY_LUT[:16]].sum()), int(per_kind[_KEYED_LUT[:16]].sum())
        entry = None if n_entry == len(ev) else np.flatnonzero(_ENTRY_LUT[kind])
        keyed = None if n_keyed == len(ev) else np.flatnonzero(_KEYED_LUT[kind])
        counting = None
        if n_keyed:
            cols = _Cols(ev, keyed)
            if len(ev) >= _PARALLEL_MIN and n_entry:
                # The live table and the per-key counters share no state: on a big batch
                # they are folded side by side (numpy releases the GIL in its loops).
                counting = _side_thread().submit(self._count_keys, cols)
            else:
                self._count_keys(cols)
        try:
            if n_entry:
                self._merge_entries(ev, entry)
        finally:
            if counting is not None:
                counting.result()

    @property
    def live(self) -> Columns:
        """The live entries (a copy): the latest record of each, kind EXISTING, with the
        fields in LIVE_FIELDS."""
        return self._slots[self._alive]

    @property
    def live_count(self) -> int:
        return self._n_alive

    def _merge_entries(self, ev: Columns, sel: Optional[np.ndarray]) -> None:
        """Fold entry records ev[sel] (sel None: all of ev) into the live table: for every
        entry id, the last record decides whether it lives; a NEW/EXISTING record starts
        a new life (ids are reused). The table is a slot array updated in place: only
        entries the batch touches are written."""
        if sel is None:
            def at(r: np.ndarray) -> np.ndarray:  # row of ev of the r-th entry record
                return r
            ids, stream_kind = ev["ct_id"], ev["kind"]
        else:
            def at(r: np.ndarray) -> np.ndarray:
                return sel[r]
            ids, stream_kind = ev["ct_id"][sel], ev["kind"][sel]
        slots = np.flatnonzero(self._alive)
        live_ids = self._slots["ct_id"][slots]
        id_hash = hash_rows([ids])
        live_hash = hash_rows([live_ids])
        if len(slots) > 4096:
            # Live entries this batch cannot touch stay out of the group-by: those whose
            # id is surely not in the batch and that are not awaiting a tuple match.
            # Sized for twice the distinct ids the last batch's share would give this one:
            # records repeat ids, and a filter that fits in cache is faster (a batch with
            # more ids only lets more through).
            expected = min(len(ids), int(2 * self._ids_per_record * len(ids)) + 1) if self._ids_per_record else len(ids)
            near = np.flatnonzero(maybe_in(live_hash, id_hash, expected) | ((self._slots["flags"][slots] & abi.FLAG_DUMP_ID) != 0))
            slots, live_ids, live_hash = slots[near], live_ids[near], live_hash[near]  # (row numbers: a mask is slower)
        n_live = len(slots)
        kind = np.concatenate([np.full(n_live, _LIVE_KIND, np.uint8), stream_kind])
        rep, gid = group_rows([np.concatenate([live_ids, ids])], hashed=np.concatenate([live_hash, id_hash]))
        m = len(rep)
        self._ids_per_record = m / len(kind)
        first, last = first_last(gid, m, rep)
        births = (kind == K.NEW) | (kind == K.EXISTING) | (kind == _LIVE_KIND)
        birth_rows = np.flatnonzero(births)
        seg = group_max(m, gid[birth_rows], birth_rows, -1, ascending=True)
        orphan_rows = np.flatnonzero(kind == K.ORPHAN)
        last_orphan = group_max(m, gid[orphan_rows], orphan_rows, -1, ascending=True)

        adopted = self._match_dumped(ev, at, slots, kind, gid, first, m)

        # Running count for the peak: +1 per birth in the stream, -1 per known removal. A
        # removal leading its group (no live slot, not a listed entry) is of an entry
        # whose birth was never seen: it changes no count.
        lead_destroy = (first >= n_live) & (kind[first] == K.DESTROY) & ~adopted
        unborn_rows = first[lead_destroy] - n_live
        self.removed_unborn += len(unborn_rows)
        delta = births[n_live:].view(np.int8) - (kind[n_live:] == K.DESTROY).view(np.int8)
        delta[unborn_rows] = 0
        if len(delta):
            self.peak_count = max(self.peak_count, self._n_alive + int(np.cumsum(delta, dtype=np.int32).max()))

        # Only groups whose last record is in this batch change; groups that were only
        # the continuation of a listed entry (handled above) are done.
        touched = np.flatnonzero((last >= n_live) & ~(adopted & (seg < n_live)))
        had_slot = first[touched] < n_live  # live rows come first in each group
        slot_of = np.where(had_slot, slots[np.minimum(first[touched], max(n_live - 1, 0))] if n_live else -1, -1)
        ends_alive = kind[last[touched]] != K.DESTROY
        freed = slot_of[had_slot & ~ends_alive]
        self._alive[freed] = False
        stay = had_slot & ends_alive
        born = ~had_slot & ends_alive
        target = slot_of.copy()
        target[born] = self._free_slots(int(born.sum()))
        write = stay | born
        groups = touched[write]
        dest = target[write]
        last_rows = last[groups]
        rec = ev.select(at(last_rows - n_live), LIVE_FIELDS)

        def gather(field: str, rows: np.ndarray) -> np.ndarray:
            """A column for combined row numbers (live slots first, then ev[sel])."""
            out = np.empty(len(rows), dtype=ev[field].dtype)
            in_live = rows < n_live
            if not in_live.any():
                return ev[field][at(rows - n_live)]
            live_at, stream_at = np.flatnonzero(in_live), np.flatnonzero(~in_live)
            out[live_at] = self._slots[field][slots[rows[live_at]]]
            out[stream_at] = ev[field][at(rows[stream_at] - n_live)]
            return out

        starts = seg[groups]
        has_start = starts >= 0
        start_rows = np.where(has_start, starts, last_rows)
        start_kind = kind[start_rows]
        start_flags = gather("flags", start_rows)
        born_in_stream = has_start & (start_kind == K.NEW)
        rec["start_boot_ns"] = np.where(born_in_stream, gather("ts_boot_ns", start_rows), gather("start_boot_ns", start_rows))
        known = (has_start & ((start_flags & abi.FLAG_START_KNOWN) != 0)) | born_in_stream
        flags = rec["flags"]
        was_orphan = ((start_flags & _FLAG_ORPHANED_LIVE) != 0) | ((flags & abi.FLAG_ORPHANED) != 0)
        orphaned = (was_orphan | (last_orphan[groups] > starts)) & (rec["ct_state"] == abi.TcpState.ESTABLISHED)
        orphaned &= rec["l4proto"] == abi.IPPROTO_TCP
        flags &= np.uint8(~(_FLAG_ORPHANED_LIVE | abi.FLAG_START_KNOWN) & 0xFF)
        flags |= known.astype(np.uint8) * np.uint8(abi.FLAG_START_KNOWN)
        flags |= orphaned.astype(np.uint8) * np.uint8(_FLAG_ORPHANED_LIVE)
        rec["flags"] = flags
        rec["kind"] = K.EXISTING
        self._slots.put(dest, rec)
        self._alive[dest] = True
        self._n_alive = int(np.count_nonzero(self._alive))

    def _match_dumped(self, ev: Columns, at: Callable[[np.ndarray], np.ndarray], slots: np.ndarray, kind: np.ndarray, gid: np.ndarray,
                      first: np.ndarray, m: int) -> np.ndarray:
        """Entries read from a listing at start carry a sequence number, not the kernel's
        id (FLAG_DUMP_ID). The first records the kernel sends about such an entry are
        matched to it by netns, zone and original tuple (unique among live entries):
        the slot takes the kernel's id, or is freed if the entry went. Returns, per
        group, whether its leading records belonged to a listed entry."""
        adopted = np.zeros(m, dtype=bool)
        n_live = len(slots)
        dumped = slots[(self._slots["flags"][slots] & abi.FLAG_DUMP_ID) != 0]
        if not len(dumped):
            return adopted
        idx = np.arange(len(kind), dtype=np.int64)
        stream_birth = (idx >= n_live) & ((kind == K.NEW) | (kind == K.EXISTING))
        first_birth = group_min(m, gid[stream_birth], idx[stream_birth], len(kind))
        lead = (idx >= n_live) & (first[gid] >= n_live) & (idx < first_birth[gid])
        if not lead.any():
            return adopted
        last_lead = group_max(m, gid[lead], idx[lead], -1)
        groups = np.flatnonzero(last_lead >= 0)
        rows = at(last_lead[groups] - n_live)
        cand = _tuple_words(ev, rows)
        mine = _tuple_words(self._slots, dumped)
        rep, tid = group_rows([np.concatenate([a, b]) for a, b in zip(mine, cand)])
        slot_of_group = np.full(len(rep), -1, dtype=np.int64)
        slot_of_group[tid[: len(dumped)]] = dumped
        hit = slot_of_group[tid[len(dumped):]]
        ok = hit >= 0
        groups, rows, hit = groups[ok], rows[ok], hit[ok]
        if not len(groups):
            return adopted
        adopted[groups] = True
        gone = ev["kind"][rows] == K.DESTROY
        self._alive[hit[gone]] = False
        keep_rows, keep_slots = rows[~gone], hit[~gone]
        rec = ev.select(keep_rows, LIVE_FIELDS)
        old = self._slots[keep_slots]
        rec["start_boot_ns"] = old["start_boot_ns"]
        orphaned = ((old["flags"] & _FLAG_ORPHANED_LIVE) != 0) | (rec["kind"] == K.ORPHAN) | ((rec["flags"] & abi.FLAG_ORPHANED) != 0)
        orphaned &= (rec["ct_state"] == abi.TcpState.ESTABLISHED) & (rec["l4proto"] == abi.IPPROTO_TCP)
        flags = (old["flags"] & np.uint8(abi.FLAG_START_KNOWN)) | (orphaned.astype(np.uint8) * np.uint8(_FLAG_ORPHANED_LIVE))
        rec["flags"] = flags
        rec["kind"] = K.EXISTING
        self._slots.put(keep_slots, rec)  # now carrying the kernel's id: later batches match by id
        return adopted

    def _free_slots(self, n: int) -> np.ndarray:
        """n unused slot numbers, growing the slot array (doubling) when needed."""
        free = np.flatnonzero(~self._alive)
        if len(free) < n:
            old = len(self._alive)
            size = max(1024, 2 * old, old + n - len(free))
            # Slots beyond the alive ones are never read: the new ones need no zeroing.
            self._slots = Columns({name: np.concatenate([c, np.empty((size - old,) + c.shape[1:], c.dtype)])
                                   for name, c in self._slots.cols.items()}, size)
            self._alive = np.concatenate([self._alive, np.zeros(size - old, dtype=bool)])
            free = np.flatnonzero(~self._alive)
        return free[:n]

    def _count_keys(self, ev: "_Cols") -> None:
        """Per-address, per-prefix and per-netns counters, plus global tallies."""
        kind = ev["kind"]
        n = len(ev)
        # (row, column) pairs of every count an event contributes to.
        rows: List[np.ndarray] = []
        cols: List[np.ndarray] = []

        def add(r: np.ndarray, c: Any) -> None:
            rows.append(r)
            cols.append(np.broadcast_to(np.asarray(c, dtype=np.int64), r.shape))

        new = np.flatnonzero(kind == K.NEW)
        add(new, _C["created"])
        destroy = np.flatnonzero(kind == K.DESTROY)
        expired = np.empty(0, dtype=np.int64)
        if len(destroy):
            d = ev.sub(destroy)
            r = removal_reasons(d)
            add(destroy, _C["destroyed"])
            add(destroy, _C["rm:" + REMOVAL_REASONS[0]] + r)
            self.removals += np.bincount(r, minlength=len(REMOVAL_REASONS))
            known = (d["flags"] & abi.FLAG_START_KNOWN) != 0
            if known.any():
                life = (d["ts_boot_ns"][known].astype(np.int64) - d["start_boot_ns"][known].astype(np.int64)) / NS
                life = np.maximum(life, 0.0)
                rk = r[known]
                bins = _lifetime_bins(life)
                hist = np.bincount(rk * _LT_BINS + bins, minlength=self.lifetime_hist.size).reshape(self.lifetime_hist.shape)
                self.lifetime_hist += hist
                # Each reason's longest life is in its top bin: find it among those few.
                top = _LT_BINS - 1 - np.argmax(hist[:, ::-1] > 0, axis=1)
                cand = bins == top[rk]
                rc, lc = rk[cand], life[cand]
                for reason in np.flatnonzero(np.bincount(rc, minlength=len(REMOVAL_REASONS))).tolist():
                    self.lifetime_max[reason] = max(self.lifetime_max[reason], float(lc[rc == reason].max()))
            expired = destroy[(r == _R["timeout-established"]) & ((d["flags"] & abi.FLAG_ORPHANED) == 0)]
        drop = np.flatnonzero(kind == K.DROP)
        if len(drop):
            dr = np.clip(ev["reason"][drop].astype(np.int64) - 1, 0, len(DROP_REASONS) - 1)
            add(drop, _C["drops"])
            add(drop, _C["drop:" + DROP_REASONS[0]] + dr)
            self.drops += np.bincount(dr, minlength=len(DROP_REASONS))
        closed = np.flatnonzero(kind == K.ORPHAN)
        add(closed, _C["orphans:socket-closed"])
        add(expired, _C["orphans:expired-established"])
        self.orphans_by_kind += [len(closed), len(expired)]
        if len(closed) or len(expired):
            self._remember_orphans(ev, closed, expired)
        self.inserts += len(new)
        self.removals_total += len(destroy)
        ts = ev["ts_boot_ns"]
        self._count_seconds(ts[new], ts[destroy])

        ks = self.opt.keys
        words = ks.words(ev)
        rep, gid = group_rows(words)
        m = len(rep)
        nc = len(COLUMNS)
        flat = np.concatenate([gid[r] * nc + c for r, c in zip(rows, cols)]) if rows else np.empty(0, np.int64)
        per_key = np.bincount(flat, minlength=m * nc).reshape(m, nc)
        rep_words = [w[rep] for w in words]
        last = group_max(m, gid, np.arange(len(gid), dtype=np.int64), -1, ascending=True)
        seen = ev["ts_boot_ns"][last].astype(np.int64)
        where = self.ips.add(rep_words, per_key, seen)
        if len(drop):
            self._keep_drop_samples(ev, drop, gid, where)
        self._rollup(self.prefixes, ks.prefix_words(rep_words), per_key, seen)
        self._rollup(self.netns, ks.netns_words(rep_words), per_key, seen)

    def _keep_drop_samples(self, ev: "_Cols", drop: np.ndarray, gid: np.ndarray, where: np.ndarray) -> None:
        """The latest refused tuple of each address in this batch, a few per address."""
        last = group_max(int(gid.max()) + 1, gid[drop], np.arange(len(drop), dtype=np.int64), -1)
        for g in np.flatnonzero(last >= 0).tolist():
            row = int(where[g])
            if row < 0:
                continue
            key = tuple(int(w[row]) for w in self.ips.words)
            q = self.ips.samples.get(key)
            if q is None:
                q = self.ips.samples[key] = bounded_samples(self.opt.drop_samples)
            q.append(_tuple_dict(ev.record(drop[last[g]])))

    @staticmethod
    def _rollup(table: KeyTable, kw: List[np.ndarray], per_key: np.ndarray, seen: np.ndarray) -> None:
        rep, gid = group_rows(kw)
        m = len(rep)
        sums = np.stack([np.bincount(gid, weights=per_key[:, c], minlength=m) for c in range(per_key.shape[1])], axis=1)
        last = group_max(m, gid, seen, 0)
        table.add([w[rep] for w in kw], sums.astype(np.int64), last)

    def _count_seconds(self, ins_ts: np.ndarray, rem_ts: np.ndarray) -> None:
        """Per-second insert and removal counts, kept only for the rate window."""
        horizon = self.now_boot_ns // NS - self.opt.rate_window_s - 1
        for col, ts in ((0, ins_ts), (1, rem_ts)):
            ts = ts[np.searchsorted(ts, np.uint64(max(horizon, 0) * NS)) :]  # in time order
            if not len(ts):
                continue
            secs = (ts // NS).astype(np.int64)
            lo = int(secs.min())
            counts = np.bincount(secs - lo)
            for off in np.flatnonzero(counts):
                self._per_sec.setdefault(lo + int(off), [0, 0])[col] += int(counts[off])
        for s in [s for s in self._per_sec if s < horizon]:
            del self._per_sec[s]

    def _remember_orphans(self, ev: "_Cols", closed: np.ndarray, expired: np.ndarray) -> None:
        """Keep the latest orphans' records (a copy of the few fields shown); they become
        dicts only when a snapshot lists them."""
        both = np.concatenate([closed, expired])
        order = np.argsort(both, kind="stable")
        is_closed = np.concatenate([np.ones(len(closed), bool), np.zeros(len(expired), bool)])[order]
        keep = self.opt.orphan_list_max
        rows = both[order][-keep:]
        part = {name: ev.take(name, rows) for name in _ORPHAN_FIELDS}
        part["_closed"] = is_closed[-keep:]
        self._orphan_parts.append((len(rows), part))
        self._orphans_pending += len(rows)
        while self._orphans_pending - self._orphan_parts[0][0] >= keep:
            self._orphans_pending -= self._orphan_parts.popleft()[0]

    def _orphan_dicts(self) -> Tuple[Dict[str, Any], ...]:
        """The latest orphans (at most orphan_list_max), oldest first, as report rows."""
        while self._orphan_parts:
            n, part = self._orphan_parts.popleft()
            self._orphans_pending -= n
            for i in range(n):
                r = {name: part[name][i] for name in _ORPHAN_FIELDS}
                d = _tuple_dict(r)
                start = int(r["start_boot_ns"])
                known = bool(r["flags"] & abi.FLAG_START_KNOWN)
                d.update(
                    kind=ORPHAN_KINDS[0] if part["_closed"][i] else ORPHAN_KINDS[1],
                    state=STATE_NAMES[min(int(r["ct_state"]), len(TCP_STATE_NAMES) - 1)],
                    age_s=round((int(r["ts_boot_ns"]) - start) / NS, 3) if known else None,
                    at_s=round((int(r["ts_boot_ns"]) - self.start_boot_ns) / NS, 3),
                )
                self.orphan_list.append(d)
        return tuple(self.orphan_list)

    # ---- summarising -----------------------------------------------------
    def snapshot(self, now_boot_ns: Optional[int] = None) -> Snapshot:
        """Summarise everything folded so far. Per-row rates cover the time since the previous call."""
        now = int(now_boot_ns if now_boot_ns is not None else self.now_boot_ns)
        interval = max(0.0, (now - self._prev_snapshot_ns) / NS)
        ips, prefixes, netns = self._row_tables(now, interval)
        self._prev_snapshot_ns = now
        # Whole one-second buckets from lo_sec up to the current, partial one: they
        # cover [max(lo_sec, start), now], between W and W+1 s; rates divide by that.
        lo_sec = now // NS - self.opt.rate_window_s
        window = max(0.0, (now - max(lo_sec * NS, self.start_boot_ns)) / NS)
        w_ins = sum(v[0] for s, v in self._per_sec.items() if s >= lo_sec)
        w_rem = sum(v[1] for s, v in self._per_sec.items() if s >= lo_sec)
        tracked_live = int(ips.live.sum())
        sysctl_max = self.info.sysctls.get("nf_conntrack_max")
        ev = self.ips.evicted_totals
        return Snapshot(
            info=self.info,
            by=self.opt.keys.by,
            start_boot_ns=self.start_boot_ns,
            now_boot_ns=now,
            interval_s=interval,
            events_total=self.events_total,
            events_by_kind={k.name.lower(): int(self.by_kind[k]) for k in K if self.by_kind[k]},
            lost={c.name.lower(): int(self.lost[c]) for c in abi.LostCause if self.lost[c]},
            table_max=self.counters.get(abi.Counter.MAX, sysctl_max),
            buckets=self.counters.get(abi.Counter.BUCKETS, self.info.sysctls.get("nf_conntrack_buckets")),
            start_count=self.start_count,
            count=self._n_alive,
            peak_count=max(self.peak_count, self._n_alive),
            kernel_count=self.counters.get(abi.Counter.COUNT),
            inserts=self.inserts,
            removals_total=self.removals_total,
            window_s=window,
            window_insert_rate=w_ins / window if window else 0.0,
            window_expire_rate=w_rem / window if window else 0.0,
            removals={r: int(self.removals[i]) for i, r in enumerate(REMOVAL_REASONS) if self.removals[i]},
            lifetimes=self._lifetimes(),
            ips=ips,
            prefixes=prefixes,
            netns=netns,
            orphans=self._orphan_dicts(),
            orphans_by_kind={k: int(self.orphans_by_kind[i]) for i, k in enumerate(ORPHAN_KINDS)},
            drops_by_reason={r: int(self.drops[i]) for i, r in enumerate(DROP_REASONS) if self.drops[i]},
            untracked={
                "keys_evicted": self.ips.evictions,
                "live": self._n_alive - tracked_live,
                "created": int(ev[_C["created"]]),
                "destroyed": int(ev[_C["destroyed"]]),
                "drops": int(ev[_C["drops"]]),
                "removed_unborn": self.removed_unborn,
            },
            kernel_counters={abi.Counter(c).name.lower(): v for c, v in self.counters.items()
                             if c in abi.Counter._value2member_map_ and c not in abi.RING_COUNTERS},
            ring=self._ring_use(),
        )

    def _ring_use(self) -> Optional[RingUse]:
        size = self.counters.get(abi.Counter.RING_BYTES)
        if not size:
            return None
        return RingUse(size, self.counters.get(abi.Counter.RING_PEAK_BYTES, 0), self.ring_max_peak)

    def _lifetimes(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for i, reason in enumerate(REMOVAL_REASONS):
            h = self.lifetime_hist[i]
            total = int(h.sum())
            if not total:
                continue
            cum = np.cumsum(h)

            def q(p: float) -> float:
                return min(_bin_upper_s(int(np.searchsorted(cum, math.ceil(p * total)))), float(self.lifetime_max[i]))

            out[reason] = {"count": total, "p50_s": q(0.5), "p90_s": q(0.9), "p99_s": q(0.99), "max_s": float(self.lifetime_max[i])}
        return out

    def _row_tables(self, now: int, interval: float) -> Tuple[RowTable, RowTable, RowTable]:
        """Each table's tracked keys joined with the live table's per-key tallies."""
        live = self._slots.select(np.flatnonzero(self._alive), _SNAPSHOT_FIELDS)
        ks = self.opt.keys
        states = state_codes(live)
        age = np.where((live["flags"] & abi.FLAG_START_KNOWN) != 0, (now - live["start_boot_ns"].astype(np.int64)) / NS, np.nan)
        orphan = ((live["flags"] & _FLAG_ORPHANED_LIVE) != 0).astype(np.float64)
        ips, keys, key_of_entry = self._row_table(self.ips, ks.words(live), None, states, age, orphan, interval)
        # Prefixes and netns group the addresses that have live entries (from the join
        # above), not every live entry again.
        has_live = np.bincount(key_of_entry, minlength=len(keys[0])) > 0
        addresses = [w[has_live] for w in keys]
        address_of_entry = (np.cumsum(has_live) - 1)[key_of_entry]
        prefixes = self._row_table(self.prefixes, ks.prefix_words(addresses), address_of_entry, states, age, orphan, interval)[0]
        netns = self._row_table(self.netns, ks.netns_words(addresses), address_of_entry, states, age, orphan, interval)[0]
        for table in (self.ips, self.prefixes, self.netns):
            table.prev = table.counts[:, [_C["created"], _C["destroyed"]]].copy()
        return ips, prefixes, netns

    def _row_table(self, table: KeyTable, key_words: List[np.ndarray], key_of_entry: Optional[np.ndarray], states: np.ndarray,
                   age: np.ndarray, orphan: np.ndarray, interval: float) -> Tuple[RowTable, List[np.ndarray], np.ndarray]:
        """The table's keys joined with live entries' keys: key_words, one per entry (key_of_entry
        None) or the distinct keys with each entry's in key_of_entry. Returns the row table, the
        joined keys and each live entry's joined key."""
        n = len(table)
        joined = [np.concatenate([a, b]) for a, b in zip(table.words, key_words)]
        rep, gid = group_rows(joined)
        g = len(rep)
        tid, lid = gid[:n], gid[n:] if key_of_entry is None else gid[n:][key_of_entry]
        ns = len(STATE_NAMES)
        st = np.bincount(lid * ns + states, minlength=g * ns).reshape(g, ns)[tid]
        orph = np.bincount(lid, weights=orphan, minlength=g)[tid].astype(np.int64)
        c = table.counts
        created, destroyed = c[:, _C["created"]], c[:, _C["destroyed"]]
        per_s = (lambda now_, prev_: (now_ - prev_) / interval) if interval else (lambda now_, prev_: np.zeros(n))
        r0 = _C["rm:" + REMOVAL_REASONS[0]]
        samples = {k: tuple(v) for k, v in table.samples.items()}
        return RowTable(
            by=self.opt.keys.by, words=tuple(table.words), live=st.sum(axis=1), created=created, destroyed=destroyed,
            orphans=c[:, _C["orphans:socket-closed"]] + c[:, _C["orphans:expired-established"]], orphans_live=orph,
            drops=c[:, _C["drops"]], new_per_s=per_s(created, table.prev[:, 0]), gone_per_s=per_s(destroyed, table.prev[:, 1]),
            ages=Ages(n, lid, age, tid, g), states=st, removals=c[:, r0 : r0 + len(REMOVAL_REASONS)],
            state_names=STATE_NAMES, removal_names=REMOVAL_REASONS, samples=samples,
        ), [w[rep] for w in joined], lid


def _tuple_words(ev: Columns, rows: np.ndarray) -> List[np.ndarray]:
    """netns, zone, family, protocol and original tuple of ev[rows] as six uint64 words."""
    u = np.uint64
    w0 = ev["netns_ino"][rows].astype(u) | (ev["zone"][rows].astype(u) << u(32)) | (ev["family"][rows].astype(u) << u(48)) | (ev["l4proto"][rows].astype(u) << u(56))
    src = np.ascontiguousarray(take(ev["orig_src"], rows)).view("<u8").reshape(-1, 2)
    dst = np.ascontiguousarray(take(ev["orig_dst"], rows)).view("<u8").reshape(-1, 2)
    ports = ev["orig_sport_be"][rows].astype(u) | (ev["orig_dport_be"][rows].astype(u) << u(16))
    return [w0, src[:, 0], src[:, 1], dst[:, 0], dst[:, 1], ports]


def _tuple_dict(r: Dict[str, Any]) -> Dict[str, Any]:
    fam = int(r["family"])
    return {
        "family": "ipv4" if fam == abi.AF_INET else "ipv6" if fam == abi.AF_INET6 else str(fam),
        "proto": proto_name(int(r["l4proto"])),
        "src": addr_text(fam, r["orig_src"]),
        "sport": int(r["orig_sport_be"]),
        "dst": addr_text(fam, r["orig_dst"]),
        "dport": int(r["orig_dport_be"]),
        "netns": int(r["netns_ino"]),
    }
