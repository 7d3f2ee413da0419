"""group_rows is an exact group-by: equal keys together, different keys apart, whatever the hash does."""

import numpy as np
import pytest

from ctrace import grouping


def check(cols):
    rep, gid = grouping.group_rows(cols)
    for c in cols:
        assert (np.asarray(c, np.uint64)[rep[gid]] == np.asarray(c, np.uint64)).all()  # same group -> same key
    keys = set(zip(*(np.asarray(c).tolist() for c in cols)))
    assert len(rep) == len(keys)  # different keys -> different groups
    return rep, gid


@pytest.mark.parametrize("n,m", [(0, 1), (1, 1), (10, 3), (5000, 5000), (200_000, 1000), (300_000, 250_000)])
def test_random_keys(n, m):
    rng = np.random.default_rng(n + m)
    k = rng.integers(0, m, n).astype(np.uint64)
    check([k, k * np.uint64(7), rng.integers(0, 2, n).astype(np.uint64)])


def test_collisions_resolved_in_later_rounds_and_fallback(monkeypatch):
    monkeypatch.setattr(grouping, "_MAX_BITS", 8)  # 256 slots for 50,000 keys
    monkeypatch.setattr(grouping, "_SALTS", grouping._SALTS[:2])  # then the exact fallback
    k = np.arange(50_000, dtype=np.uint64)
    check([np.concatenate([k, k]), np.zeros(100_000, np.uint64)])


def test_first_last():
    first, last = grouping.first_last(np.array([2, 0, 2, 1, 0]), 3)
    assert first.tolist() == [1, 3, 0] and last.tolist() == [4, 3, 2]
