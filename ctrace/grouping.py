"""Exact group-by of fixed-width keys in O(n) numpy passes (no sorting).

Rows are hashed into a table; each occupied slot is claimed by one row and every
row whose key equals its claimant's (compared column by column, so hash
collisions never merge different keys) joins that group. Rows that lost their
slot to a different key try again with another hash; a few rounds resolve all.
"""

import threading
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)
_MAX_BITS = 21
_SALTS = (0x0, 0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3)


_scratch = threading.local()  # per thread: hash tables reused between calls (fresh memory is dear)


def _buffer(name: str, size: int, dtype: Any) -> np.ndarray:
    """A scratch array of at least `size` items, kept for the next call (contents undefined)."""
    buf = getattr(_scratch, name, None)
    if buf is None or len(buf) < size:
        buf = np.empty(max(size, 1 << 16), dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:size]


def _mix(cols: Sequence[np.ndarray], salt: int) -> np.ndarray:
    tmp = _buffer("mix", len(cols[0]), np.uint64)
    with np.errstate(over="ignore"):
        # h = salt; then per column: h ^= c; h *= MULT; h ^= h >> 31 (the first two in one pass)
        h = np.multiply(cols[0] ^ np.uint64(salt) if salt else cols[0], _MULT)
        for i, c in enumerate(cols):
            if i:
                h ^= c
                h *= _MULT
            np.right_shift(h, np.uint64(31), out=tmp)
            h ^= tmp
    return h


def hash_rows(columns: Sequence[np.ndarray]) -> np.ndarray:
    """The 64-bit hash of each row's key that group_rows starts from (and maybe_in uses):
    computed once, it can serve both."""
    return _mix([np.ascontiguousarray(c, dtype=np.uint64) for c in columns], _SALTS[0])


def group_rows(columns: Sequence[np.ndarray], hashed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """columns: k arrays of n uint64 forming each row's key; hashed: hash_rows(columns)
    if already at hand. Returns (rep, gid): rep[g] is one row index of group g, gid[i]
    the group of row i. Equal keys share a group; different keys never do."""
    cols: List[np.ndarray] = [np.ascontiguousarray(c, dtype=np.uint64) for c in columns]
    n = len(cols[0])
    if n >= 2**31:
        raise ValueError("group_rows: more than 2^31 rows")
    gid = np.empty(n, dtype=np.int64)
    if n == 0:
        return np.empty(0, dtype=np.int64), gid
    reps = []
    next_id = 0
    remaining: Optional[np.ndarray] = None  # rows still without a group (None: all)
    sub = cols
    for salt in _SALTS:
        # ~2 slots per row, capped to stay cache friendly: keys beyond the
        # table's capacity resolve in the next round.
        k = len(sub[0])
        bits = max(8, min(_MAX_BITS, int(2 * k - 1).bit_length()))
        size = 1 << bits
        slot = hashed.copy() if hashed is not None and remaining is None else _mix(sub, salt)
        slot >>= np.uint64(64 - bits)
        slot = slot.view(np.int64)
        table = _buffer("table", size, np.int32)
        table.fill(-1)
        # Written last to first: where numpy keeps the last write (it does not promise
        # to), each group's claimant is its first row, which first_last() can use.
        table[np.flip(slot)] = np.arange(k - 1, -1, -1, dtype=np.int32)
        occupied = np.flatnonzero(table >= 0)
        claimant = table[occupied]
        dense = table  # the claimants are read: reuse the table for this round's group numbers
        dense[occupied] = np.arange(len(occupied), dtype=np.int32)
        local = dense[slot]  # each row's slot's group
        # A row belongs to its slot's group if its key equals the claimant's, compared
        # through the claimants' keys gathered in group order (small, cache friendly).
        same = sub[0][claimant][local] == sub[0]
        for c in sub[1:]:
            same &= c[claimant][local] == c
        # Every row takes its slot's group; rows that differ from their claimant are
        # given theirs in a later round.
        if remaining is None:
            reps.append(claimant.astype(np.int64))
            gid[:] = local
        else:
            reps.append(remaining[claimant])
            gid[remaining] = local + next_id
        if same.all():
            return (reps[0] if len(reps) == 1 else np.concatenate(reps)), gid
        remaining = np.flatnonzero(~same) if remaining is None else remaining[~same]
        next_id += len(occupied)
        sub = [c[remaining] for c in cols]
    # Pathological leftovers: exact but slower.
    assert remaining is not None
    stacked = np.stack(sub, axis=1)
    _, first, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    gid[remaining] = next_id + inverse.reshape(-1)
    reps.append(remaining[first])
    return np.concatenate(reps), gid


def maybe_in(key_hashes: np.ndarray, among_hashes: np.ndarray, distinct: Optional[int] = None) -> np.ndarray:
    """Per key (by its hash_rows hash): False if it is certainly not among the others,
    True if it may be (a one-hash Bloom filter of ~16 bits per distinct element of
    `among`; distinct: about how many there are, default all): a cheap way to set aside
    rows that cannot match before an exact group-by."""
    bits = max(16, min(26, (16 * (len(among_hashes) if distinct is None else distinct)).bit_length()))
    mark = _buffer("bloom", 1 << bits, bool)
    mark.fill(False)
    shift = np.uint64(64 - bits)
    mark[(among_hashes >> shift).view(np.int64)] = True
    return mark[(key_hashes >> shift).view(np.int64)]


def group_max(m: int, gid: np.ndarray, values: np.ndarray, fill: Any, ascending: bool = False) -> np.ndarray:
    """out[g] = the largest of `values` over rows of group g (`fill` for groups without
    rows). A plain scatter in ascending order of value, checked; ufunc.at, which numpy
    before 2.0 runs ~15x slower, only if the scatter did not keep the last write.
    ascending: the values are known to be in ascending order (row numbers)."""
    out = np.full(m, fill, dtype=values.dtype)
    if not len(gid):
        return out
    if not ascending and len(values) > 1 and (values[1:] < values[:-1]).any():
        order = np.argsort(values, kind="stable")
        gid, values = gid[order], values[order]
    out[gid] = values
    if (out[gid] < values).any():  # numpy does not promise the order of repeated writes
        np.maximum.at(out, gid, values)
    return out


def group_min(m: int, gid: np.ndarray, values: np.ndarray, fill: Any) -> np.ndarray:
    """out[g] = the smallest of `values` over rows of group g (`fill` for groups without rows)."""
    out = np.full(m, fill, dtype=values.dtype)
    if not len(gid):
        return out
    if len(values) > 1 and (values[1:] > values[:-1]).any():
        order = np.argsort(values, kind="stable")[::-1]
        gid, values = gid[order], values[order]
    else:
        gid, values = np.flip(gid).copy(), np.flip(values).copy()  # contiguous: scatters faster
    out[gid] = values
    if (out[gid] > values).any():
        np.minimum.at(out, gid, values)
    return out


def first_last(gid: np.ndarray, m: int, rep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """First and last row index of each of m groups (rows in order). `rep` from
    group_rows is usually each group's first row already: checked, then used."""
    idx = np.arange(len(gid), dtype=np.int64)
    last = group_max(m, gid, idx, -1, ascending=True)
    if rep is not None and len(rep) == m and (rep[gid] <= idx).all():
        return rep, last
    return group_min(m, gid, idx, len(gid)), last
