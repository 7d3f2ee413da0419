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


@pytest.mark.parametrize("n,m", [(1, 1), (1000, 10), (100_000, 70_000)])
def test_group_max_min_equal_ufunc_at(n, m):
    rng = np.random.default_rng(n)
    gid = rng.integers(0, m, n)
    for values in (np.arange(n, dtype=np.int64), rng.integers(-50, 50, n), rng.random(n)):
        below, above = values.min() - 1, values.max() + 1  # fills: groups without rows
        want_max = np.full(m, below, dtype=values.dtype)
        np.maximum.at(want_max, gid, values)
        want_min = np.full(m, above, dtype=values.dtype)
        np.minimum.at(want_min, gid, values)
        assert (grouping.group_max(m, gid, values, below) == want_max).all()
        assert (grouping.group_min(m, gid, values, above) == want_min).all()


def test_group_max_falls_back_when_writes_land_out_of_order(monkeypatch):
    """numpy does not promise which of repeated writes wins: the result is checked."""
    gid = np.array([0, 1, 0, 1])
    values = np.array([1, 2, 3, 4])

    class Reversed(np.ndarray):
        def __setitem__(self, key, val):  # the last write loses
            super().__setitem__(key[::-1], val[::-1])

    real_full = np.full
    monkeypatch.setattr(grouping.np, "full", lambda *a, **k: real_full(*a, **k).view(Reversed))
    assert grouping.group_max(2, gid, values, 0).tolist() == [3, 4]


def test_maybe_in_has_no_false_negatives():
    rng = np.random.default_rng(3)
    among = rng.integers(0, 1 << 62, 100_000, dtype=np.uint64)
    others = rng.integers(0, 1 << 62, 100_000, dtype=np.uint64)
    keys = np.concatenate([among[::3], others])
    hit = grouping.maybe_in(grouping.hash_rows([keys]), grouping.hash_rows([among]))
    assert hit[: len(among[::3])].all()
    assert hit[len(among[::3]) :].mean() < 0.1  # few false positives
    # Sized for far fewer distinct values than `among` holds: more pass, none is missed.
    small = grouping.maybe_in(grouping.hash_rows([keys]), grouping.hash_rows([among]), distinct=1000)
    assert small[: len(among[::3])].all() and small[len(among[::3]) :].mean() > 0.5
