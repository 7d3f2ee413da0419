"""Bounded per-key counters, kept as numpy arrays, and the row tables snapshots expose.

KeyTable is a least-recently-seen table: when more keys than `capacity` are known,
the ones seen longest ago are evicted and their counts summed into `evicted_totals`,
so nothing is silently lost. Every operation is whole-array: a flood of a million
new addresses costs no per-address Python.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ctrace.grouping import group_rows
from ctrace.keys import Key, label, netns_of


class KeyTable:
    def __init__(self, capacity: int, ncols: int) -> None:
        self.capacity = capacity
        self.words: List[np.ndarray] = [np.zeros(0, np.uint64) for _ in range(3)]
        self.counts = np.zeros((0, ncols), dtype=np.int64)
        self.prev = np.zeros((0, 2), dtype=np.int64)  # (created, destroyed) at the previous snapshot
        self.last_seen = np.zeros(0, dtype=np.int64)
        self.evictions = 0
        self.evicted_totals = np.zeros(ncols, dtype=np.int64)
        self.samples: Dict[Key, Deque[Dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self.last_seen)

    def add(self, words: Sequence[np.ndarray], counts: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Fold in distinct keys with their counts and last-seen times; returns each
        given key's row number in the table after the fold (-1 if evicted at once)."""
        n_old = len(self)
        allw = [np.concatenate([a, np.asarray(b, np.uint64)]) for a, b in zip(self.words, words)]
        rep, gid = group_rows(allw)
        g = len(rep)
        new_counts = np.zeros((g, self.counts.shape[1]), dtype=np.int64)
        new_prev = np.zeros((g, 2), dtype=np.int64)
        new_seen = np.zeros(g, dtype=np.int64)
        old, fresh = gid[:n_old], gid[n_old:]
        new_counts[old] = self.counts
        new_prev[old] = self.prev
        new_seen[old] = self.last_seen
        new_counts[fresh] += counts  # keys given are distinct, so no index repeats
        new_seen[fresh] = np.maximum(new_seen[fresh], seen)
        self.words = [w[rep] for w in allw]
        self.counts, self.prev, self.last_seen = new_counts, new_prev, new_seen
        where = fresh
        if g > self.capacity:
            drop = np.argpartition(self.last_seen, g - self.capacity - 1)[: g - self.capacity]
            keep = np.ones(g, dtype=bool)
            keep[drop] = False
            self.evictions += len(drop)
            self.evicted_totals += self.counts[drop].sum(axis=0)
            if self.samples:
                for k in self.keys(drop):
                    self.samples.pop(k, None)
            renumber = np.cumsum(keep) - 1
            where = np.where(keep[fresh], renumber[fresh], -1)
            self.words = [w[keep] for w in self.words]
            self.counts, self.prev, self.last_seen = self.counts[keep], self.prev[keep], self.last_seen[keep]
        return where

    def keys(self, rows: Optional[np.ndarray] = None) -> List[Key]:
        w = self.words if rows is None else [x[rows] for x in self.words]
        return list(zip(*(x.tolist() for x in w)))


@dataclass(frozen=True)
class Row:
    """One address, prefix or netns in a snapshot."""

    key: Key
    label: str
    netns: int
    live: int
    created: int
    destroyed: int
    removals: Dict[str, int]
    orphans: int
    orphans_live: int
    drops: int
    states: Dict[str, int]
    new_per_s: float
    gone_per_s: float
    median_age_s: Optional[float]
    drop_samples: Tuple[Dict[str, Any], ...] = ()


@dataclass(frozen=True)
class RowTable:
    """Every tracked key of one grouping as columns; Row objects are made only for
    the rows asked for. Iterating yields rows by live entries, then inserts."""

    by: str
    words: Tuple[np.ndarray, ...]
    live: np.ndarray
    created: np.ndarray
    destroyed: np.ndarray
    orphans: np.ndarray
    orphans_live: np.ndarray
    drops: np.ndarray
    new_per_s: np.ndarray
    gone_per_s: np.ndarray
    ages: "Ages"  # median entry age per row, computed when first needed
    states: np.ndarray  # (n, len(state_names))
    removals: np.ndarray  # (n, len(removal_names))
    state_names: Tuple[str, ...]
    removal_names: Tuple[str, ...]
    samples: Dict[Key, Tuple[Dict[str, Any], ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.live)

    def column(self, name: str) -> np.ndarray:
        if name == "estab":
            return self.states[:, self.state_names.index("ESTABLISHED")]
        if name == "age":
            return np.nan_to_num(self.ages.all(), nan=0.0)
        return {"new/s": self.new_per_s, "gone/s": self.gone_per_s}.get(name, getattr(self, name, None))

    def order(self, sort: str = "live", mask: Optional[np.ndarray] = None, limit: Optional[int] = None) -> np.ndarray:
        """Row numbers sorted by a column, descending; ties by live, inserts, drops, then key.
        With `limit`, only the rows that can make the first `limit` are sorted."""
        idx = np.arange(len(self)) if mask is None else np.flatnonzero(mask)
        primary = -(self.live if sort == "live" else self.column(sort))[idx].astype(np.float64)
        if limit is not None and limit < len(idx):
            cut = np.partition(primary, limit - 1)[limit - 1]
            keep = primary <= cut  # every row tied with the last one shown stays a candidate
            idx, primary = idx[keep], primary[keep]
        cols = [self.words[2][idx], self.words[1][idx], self.words[0][idx], -self.drops[idx], -self.created[idx], -self.live[idx], primary]
        return idx[np.lexsort(cols)]

    def labels(self, rows: Optional[np.ndarray] = None) -> List[str]:
        cols = [(w if rows is None else w[rows]).tolist() for w in self.words]  # Python ints: numpy 1.19 can't shift uint64 by int
        return [label(k, self.by) for k in zip(*cols)]

    def row(self, i: int, age: Optional[float] = None) -> Row:
        """Row i (age: its median entry age, if already at hand)."""
        key = tuple(int(w[i]) for w in self.words)
        if age is None:
            age = float(self.ages.of(np.array([i]))[0])
        return Row(
            key=key, label=label(key, self.by), netns=netns_of(key), live=int(self.live[i]), created=int(self.created[i]),
            destroyed=int(self.destroyed[i]),
            removals={n: int(v) for n, v in zip(self.removal_names, self.removals[i].tolist()) if v},
            orphans=int(self.orphans[i]), orphans_live=int(self.orphans_live[i]), drops=int(self.drops[i]),
            states={n: int(v) for n, v in zip(self.state_names, self.states[i].tolist()) if v},
            new_per_s=float(self.new_per_s[i]), gone_per_s=float(self.gone_per_s[i]),
            median_age_s=None if np.isnan(age) else age, drop_samples=self.samples.get(key, ()),
        )

    def top(self, n: Optional[int] = None, sort: str = "live", where: Optional[Callable[["RowTable"], np.ndarray]] = None) -> List[Row]:
        rows = self.order(sort, where(self) if where else None, n)[:n]
        return [self.row(i, age) for i, age in zip(rows.tolist(), self.ages.of(rows).tolist())]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.top())

    def __getitem__(self, i: int) -> Row:
        return self.top()[i]


# Up to this many rows listed get their median entry ages from one pass over the live
# entries (a median per row, each a partition of that row's entries); more rows share
# one sort of all ages (measured with 444,000 live entries: 62 ms).
AGES_ONE_PASS = 1000


class Ages:
    """Median age of each row's live entries. Sorting all ages costs more than the rest of
    a snapshot, so it happens only when every row's median is needed (sort by age, a
    full report); a screenful of rows gets theirs from one pass."""

    def __init__(self, n: int, group_of_entry: Optional[np.ndarray] = None, age: Optional[np.ndarray] = None,
                 group_of_row: Optional[np.ndarray] = None, groups: int = 0) -> None:
        self.n = n
        self.entry_group, self.age, self.row_group, self.groups = group_of_entry, age, group_of_row, groups
        self._all: Optional[np.ndarray] = None

    def all(self) -> np.ndarray:
        if self._all is None:
            if self.entry_group is None or self.age is None or self.row_group is None:
                self._all = np.full(self.n, np.nan)
            else:
                self._all = group_medians(self.entry_group, self.age, self.groups)[self.row_group]
        return self._all

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The median ages of table rows `rows` (distinct)."""
        if not len(rows):
            return np.empty(0)
        if self._all is not None or self.entry_group is None or self.age is None or self.row_group is None \
                or len(rows) > AGES_ONE_PASS:
            return self.all()[rows]
        k = len(rows)
        listed = np.full(self.groups, -1, dtype=np.int16)  # group -> position in rows
        listed[self.row_group[rows]] = np.arange(k, dtype=np.int16)
        pos = listed[self.entry_group]
        mine = np.flatnonzero((pos >= 0) & ~np.isnan(self.age))
        at = pos[mine]
        ages = self.age[mine][np.argsort(at, kind="stable")]  # (a radix sort: 16-bit keys)
        counts = np.bincount(at, minlength=k)
        ends = np.cumsum(counts)
        out = np.full(k, np.nan)
        for j in np.flatnonzero(counts).tolist():
            out[j] = np.median(ages[ends[j] - counts[j] : ends[j]])
        return out


def group_medians(gid: np.ndarray, values: np.ndarray, m: int) -> np.ndarray:
    """Median of the non-NaN values of each of m groups (NaN where a group has none)."""
    out = np.full(m, np.nan)
    ok = ~np.isnan(values)
    g, v = gid[ok], values[ok]
    if not len(g):
        return out
    order = np.lexsort((v, g))
    g, v = g[order], v[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    out[g[starts]] = (v[starts + (ends - starts - 1) // 2] + v[starts + (ends - starts) // 2]) / 2
    return out


def bounded_samples(maxlen: int) -> Deque[Dict[str, Any]]:
    return deque(maxlen=maxlen)
