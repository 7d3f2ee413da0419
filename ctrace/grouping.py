"""Exact group-by of fixed-width keys in O(n) numpy passes (no sorting).

Rows are hashed into a table; each occupied slot is claimed by one row and every
row whose key equals its claimant's (compared column by column, so hash
collisions never merge different keys) joins that group. Rows that lost their
slot to a different key try again with another hash; a few rounds resolve all.
"""

from typing import List, Sequence, Tuple

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)
_MAX_BITS = 21
_SALTS = (0x0, 0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3)


def _mix(cols: Sequence[np.ndarray], salt: int) -> np.ndarray:
    h = np.full(len(cols[0]), np.uint64(salt), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            h ^= c
            h *= _MULT
            h ^= h >> np.uint64(31)
    return h


def group_rows(columns: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """columns: k arrays of n uint64 forming each row's key. Returns (rep, gid):
    rep[g] is one row index of group g, gid[i] the group of row i. Equal keys
    share a group; different keys never do."""
    cols: List[np.ndarray] = [np.ascontiguousarray(c, dtype=np.uint64) for c in columns]
    n = len(cols[0])
    gid = np.empty(n, dtype=np.int64)
    if n == 0:
        return np.empty(0, dtype=np.int64), gid
    reps = []
    next_id = 0
    remaining = np.arange(n, dtype=np.int64)
    sub = cols
    for salt in _SALTS:
        # ~2 slots per row, capped to stay cache friendly: keys beyond the
        # table's capacity resolve in the next round.
        bits = max(8, min(_MAX_BITS, int(2 * len(remaining) - 1).bit_length()))
        size = 1 << bits
        slot = _mix(sub, salt)
        slot >>= np.uint64(64 - bits)
        slot = slot.view(np.int64)
        table = np.full(size, -1, dtype=np.int32 if len(remaining) < 2**31 else np.int64)
        table[slot] = np.arange(len(remaining), dtype=table.dtype)
        occupied = np.flatnonzero(table >= 0)
        claimant = table[occupied]
        same = np.ones(len(remaining), dtype=bool)
        key_at_slot = np.empty(size, dtype=np.uint64)  # read only at occupied slots
        for c in sub:
            key_at_slot[occupied] = c[claimant]
            same &= key_at_slot[slot] == c
        dense = np.empty(size, dtype=np.int64)  # read only at occupied slots
        dense[occupied] = np.arange(next_id, next_id + len(occupied), dtype=np.int64)
        reps.append(remaining[claimant])
        next_id += len(occupied)
        if same.all():
            gid[remaining] = dense[slot]
            return np.concatenate(reps), gid
        gid[remaining[same]] = dense[slot[same]]
        remaining = remaining[~same]
        sub = [c[remaining] for c in cols]
    # Pathological leftovers: exact but slower.
    stacked = np.stack(sub, axis=1)
    _, first, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    gid[remaining] = next_id + inverse.reshape(-1)
    reps.append(remaining[first])
    return np.concatenate(reps), gid


def first_last(gid: np.ndarray, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """First and last row index of each of m groups (rows in order)."""
    idx = np.arange(len(gid), dtype=np.int64)
    first = np.full(m, len(gid), dtype=np.int64)
    last = np.full(m, -1, dtype=np.int64)
    np.minimum.at(first, gid, idx)
    np.maximum.at(last, gid, idx)
    return first, last
