"""The lifecycle model on hand-built streams: exact numbers for each rule."""

import numpy as np
import pytest

from ctrace import abi
from ctrace.keys import KeySpace
from ctrace.model import Model, ModelOptions, removal_reasons
from tests.unit.eventfactory import INFO, NS, T0, destroy, new, records, seq, state

S = abi.TcpState
D = abi.DestroyReason


def fold(*batches, **opts):
    m = Model(INFO, ModelOptions(**opts))
    for b in batches:
        m.apply(b)
    return m


def row(snap, label):
    return next(r for r in snap.ips if r.label == label)


def test_id_reuse_inside_one_batch():
    m = fold(seq([new(1, 1, src="10.0.0.1"), destroy(1, 2, S.TIME_WAIT, src="10.0.0.1"), new(1, 3, src="10.0.0.2")]))
    s = m.snapshot()
    assert s.count == 1 and s.peak_count == 1
    assert (row(s, "10.0.0.1").created, row(s, "10.0.0.1").destroyed, row(s, "10.0.0.1").live) == (1, 1, 0)
    assert (row(s, "10.0.0.2").created, row(s, "10.0.0.2").live) == (1, 1)
    assert s.removals == {"fin": 1}


def test_id_reuse_across_batches_and_states():
    m = fold(seq([new(7, 1)]), seq([state(7, 2, S.ESTABLISHED)]), seq([destroy(7, 3, S.CLOSE), new(7, 4, src="10.0.0.3")]))
    s = m.snapshot()
    assert s.count == 1 and row(s, "10.0.0.3").states == {"SYN_SENT": 1}
    assert row(s, "10.0.0.1").removals == {"rst": 1} and row(s, "10.0.0.1").live == 0


def test_live_states_follow_state_records():
    m = fold(seq([new(1, 1), new(2, 1), state(1, 2, S.ESTABLISHED), state(2, 2, S.ESTABLISHED), state(2, 3, S.TIME_WAIT)]))
    assert row(m.snapshot(), "10.0.0.1").states == {"ESTABLISHED": 1, "TIME_WAIT": 1}


def test_destroy_of_unknown_entry_counts_removal_not_occupancy():
    m = fold(seq([destroy(9, 1, S.ESTABLISHED)]))
    s = m.snapshot()
    assert s.count == 0 and s.peak_count == 0 and s.removals == {"timeout-established": 1}


def test_removals_of_entries_never_born_are_counted():
    """A DESTROY whose entry was neither listed at start nor seen created: a missed insert
    (or a listing that missed it). Known entries, across batches too, do not count."""
    m = Model(INFO)
    m.seed(seq([dict(kind=abi.Kind.EXISTING, ct_id=1, t=0)]))
    m.apply(seq([new(10, 1), destroy(9, 2, S.ESTABLISHED), destroy(1, 3, S.TIME_WAIT)]))
    m.apply(seq([destroy(10, 4, S.TIME_WAIT), destroy(8, 5, S.CLOSE), new(8, 6), destroy(8, 7, S.CLOSE)]))
    s = m.snapshot()
    assert s.untracked["removed_unborn"] == 2 and s.removals_total == 5


def test_seed_sets_start_count_and_peak():
    m = Model(INFO)
    m.seed(seq([dict(kind=abi.Kind.EXISTING, ct_id=i, t=0) for i in range(1, 6)]))
    m.apply(seq([new(10, 1), new(11, 2), destroy(1, 3, S.TIME_WAIT), destroy(2, 4, S.TIME_WAIT), destroy(3, 5, S.TIME_WAIT)]))
    s = m.snapshot()
    assert (s.start_count, s.peak_count, s.count) == (5, 7, 4)


def test_removal_reason_rules():
    specs = [
        destroy(1, 1, S.TIME_WAIT),
        destroy(2, 1, S.CLOSE),
        destroy(3, 1, S.ESTABLISHED),
        destroy(4, 1, S.FIN_WAIT),
        destroy(5, 1, S.SYN_SENT),
        destroy(6, 1, 0, proto=abi.IPPROTO_UDP),
        destroy(7, 1, S.ESTABLISHED, reason=D.EARLY_DROP),
        destroy(8, 1, S.ESTABLISHED, reason=D.DELETE),
        destroy(9, 1, S.ESTABLISHED, reason=D.NETNS),
        destroy(10, 1, S.TIME_WAIT, reason=D.KILL),
        destroy(11, 1, S.ESTABLISHED, reason=D.KILL),
        destroy(12, 1, S.ESTABLISHED, reason=D.UNKNOWN),
    ]
    from ctrace.model import REMOVAL_REASONS

    got = [REMOVAL_REASONS[i] for i in removal_reasons(records(*specs))]
    assert got == ["fin", "rst", "timeout-established", "timeout-closing", "timeout-handshake", "timeout",
                   "early-drop", "delete", "netns", "fin", "killed", "unknown"]


def test_removal_reason_lookup_follows_the_rules_for_every_byte_value():
    # The per-record lookup table covers known mechanisms and states; any other byte
    # value must still land where the rules put it (unknown, timeout...).
    from ctrace.model import _removal_rules

    g = np.arange(256 * 2 * 256)
    mech, tcp, state = (g >> 9).astype(np.uint8), ((g >> 8) & 1).astype(bool), (g & 0xFF).astype(np.uint8)
    ev = {"reason": mech, "l4proto": np.where(tcp, abi.IPPROTO_TCP, abi.IPPROTO_UDP).astype(np.uint8), "ct_state": state}
    assert (removal_reasons(ev) == _removal_rules(mech, tcp, state)).all()


def test_orphans_counted_once_and_cleared_by_late_fin():
    m = fold(seq([
        new(1, 0), state(1, 1, S.ESTABLISHED), dict(kind=abi.Kind.ORPHAN, ct_id=1, t=2),
        new(2, 0, src="10.0.0.2"), state(2, 1, S.ESTABLISHED, src="10.0.0.2"), dict(kind=abi.Kind.ORPHAN, ct_id=2, t=2, src="10.0.0.2"),
    ]))
    s = m.snapshot()
    assert row(s, "10.0.0.1").orphans_live == 1 and s.orphans_by_kind == {"socket-closed": 2, "expired-established": 0}
    m.apply(seq([destroy(1, 9, S.ESTABLISHED, flags=abi.FLAG_ORPHANED), state(2, 9, S.FIN_WAIT, src="10.0.0.2"),
                 destroy(3, 9, S.ESTABLISHED, src="10.0.0.3")]))
    s = m.snapshot()
    assert s.orphans_by_kind == {"socket-closed": 2, "expired-established": 1}
    assert row(s, "10.0.0.1").orphans == 1 and row(s, "10.0.0.2").orphans_live == 0 and row(s, "10.0.0.3").orphans == 1
    assert [o["kind"] for o in s.orphans] == ["socket-closed", "socket-closed", "expired-established"]
    assert s.orphans[0]["src"] == "10.0.0.1" and s.orphans[0]["dport"] == 443


def test_bounded_keys_count_what_they_evict():
    specs = [new(i, i, src=f"10.0.{i}.1") for i in range(1, 6)] + [destroy(1, 10, S.TIME_WAIT, src="10.0.1.1")]
    m = fold(seq(specs), max_keys=3)
    s = m.snapshot()
    assert len(s.ips) == 3
    assert s.untracked["keys_evicted"] == 2
    assert s.untracked["live"] == s.count - sum(r.live for r in s.ips) == 2
    assert s.untracked["created"] == 2


def test_prefix_and_netns_rollups():
    m = fold(seq([new(1, 1, src="10.1.2.3"), new(2, 1, src="10.1.2.4"), new(3, 1, src="10.1.3.4"),
                  new(4, 1, src="2001:db8:0:1::5", netns=7), new(5, 1, src="2001:db8:0:1:ffff::9", netns=7)]))
    s = m.snapshot()
    assert {(r.label, r.live) for r in s.prefixes} == {("10.1.2.0/24", 2), ("10.1.3.0/24", 1), ("2001:db8:0:1::/64", 2)}
    assert {(r.label, r.live) for r in s.netns} == {("netns:4026531840", 3), ("netns:7", 2)}
    m2 = fold(seq([new(1, 1, src="10.1.2.3"), new(2, 1, src="10.1.3.4")]), keys=KeySpace(prefix_v4=16))
    assert [(r.label, r.live) for r in m2.snapshot().prefixes] == [("10.1.0.0/16", 2)]


def test_by_dport_and_dst():
    b = seq([new(1, 1, dport=443), new(2, 1, dport=443), new(3, 1, dport=53, proto=abi.IPPROTO_UDP)])
    s = fold(b, keys=KeySpace(by="dport")).snapshot()
    assert [(r.label, r.live) for r in s.ips] == [("tcp/443", 2), ("udp/53", 1)]
    s = fold(b, keys=KeySpace(by="dst")).snapshot()
    assert [(r.label, r.live) for r in s.ips] == [("10.9.9.9", 3)]


def test_rates_window_and_time_to_full():
    m = fold(seq([new(i, 80 + i) for i in range(20)]), rate_window_s=10)
    s = m.snapshot(T0 + 100 * NS)
    assert s.window_insert_rate == pytest.approx(1.0)  # 10 inserts in the last 10 s
    assert s.time_to_full_s(window=True) == pytest.approx((100 - 20) / 1.0)
    assert s.rates(window=False) == pytest.approx((0.2, 0.0))
    assert s.time_to_full_s(window=False) == pytest.approx((100 - 20) / 0.2)


def test_window_rates_mid_second_are_exact():
    """A steady 4/s: the window rate is 4/s wherever `now` falls inside a second (the
    buckets cover W plus the current partial second, and the rate divides by that)."""
    b = seq([new(i, i * 0.25) for i in range(400)] + [destroy(i, 3 + i * 0.25, S.TIME_WAIT) for i in range(380)])
    b = b[np.argsort(b["ts_boot_ns"], kind="stable")]
    for t in (50.0, 50.3, 50.7, 50.99):
        m = fold(b[b["ts_boot_ns"] <= T0 + int(t * NS)], rate_window_s=10)  # as a replay folds up to t
        s = m.snapshot(T0 + int(t * NS))
        ins = sum(1 for i in range(400) if int(t) - 10 <= i * 0.25 <= t)
        assert s.window_s == pytest.approx(10 + t - int(t))
        assert s.window_insert_rate == pytest.approx(ins / s.window_s) == pytest.approx(4.0, rel=0.03)
        assert s.window_expire_rate == pytest.approx(4.0, rel=0.03)
    early = fold(b[b["ts_boot_ns"] <= T0 + int(4.5 * NS)], rate_window_s=10).snapshot(T0 + int(4.5 * NS))
    assert early.window_s == pytest.approx(4.5)


def test_lost_and_counters_in_band():
    m = fold(seq([dict(kind=abi.Kind.LOST, reason=abi.LostCause.RINGBUF_FULL, value=7, t=1),
                  dict(kind=abi.Kind.LOST, reason=abi.LostCause.RINGBUF_FULL, value=3, t=2),
                  dict(kind=abi.Kind.COUNTER, reason=abi.Counter.MAX, value=4096, t=2)]))
    s = m.snapshot()
    assert s.lost == {"ringbuf_full": 10} and s.lost_total == 10 and s.table_max == 4096


def test_lifetime_quantiles_within_bucket_resolution():
    lives = np.linspace(1, 100, 100)
    specs = [destroy(i, 200 + float(l), S.TIME_WAIT, start=200) for i, l in enumerate(lives)]
    lt = fold(seq(specs)).snapshot().lifetimes["fin"]
    assert lt["count"] == 100 and lt["max_s"] == pytest.approx(100)
    for q, key in ((0.5, "p50_s"), (0.9, "p90_s"), (0.99, "p99_s")):
        exact = np.quantile(lives, q)
        assert exact <= lt[key] * 1.0001 and lt[key] <= exact * 1.1


def test_unsorted_batches_are_ordered():
    m = fold(seq([destroy(1, 5, S.TIME_WAIT), new(1, 1)]))
    assert m.snapshot().count == 0


def test_listed_entries_are_matched_by_tuple_then_followed_by_kernel_id():
    m = Model(INFO)
    dump = abi.FLAG_DUMP_ID
    m.seed(seq([dict(kind=abi.Kind.EXISTING, ct_id=1, t=0, src="10.0.0.1", sport=1111, flags=dump),
                dict(kind=abi.Kind.EXISTING, ct_id=2, t=0, src="10.0.0.2", sport=2222, flags=dump),
                dict(kind=abi.Kind.EXISTING, ct_id=3, t=0, src="10.0.0.3", sport=3333, flags=dump)]))
    P1, P2 = 0xFFFF8880_00001000, 0xFFFF8880_00002000
    m.apply(seq([
        state(P1, 1, S.TIME_WAIT, src="10.0.0.1", sport=1111),
        destroy(P2, 2, S.ESTABLISHED, src="10.0.0.2", sport=2222),
        new(P2, 3, src="10.0.0.9", sport=9999),  # the kernel reuses the freed object at once
        state(P2, 4, S.ESTABLISHED, src="10.0.0.9", sport=9999),
    ]))
    s = m.snapshot()
    assert (s.start_count, s.count, s.peak_count) == (3, 3, 3)
    assert row(s, "10.0.0.1").states == {"TIME_WAIT": 1} and row(s, "10.0.0.2").live == 0
    assert row(s, "10.0.0.9").states == {"ESTABLISHED": 1}
    m.apply(seq([destroy(P1, 5, S.TIME_WAIT, src="10.0.0.1", sport=1111)]))
    s = m.snapshot()
    assert s.count == 2 and row(s, "10.0.0.1").live == 0 and s.removals == {"timeout-established": 1, "fin": 1}
    assert sorted(int(i) for i in m.live["ct_id"]) == [3, P2]


def test_unlisted_unknown_entries_are_adopted():
    m = Model(INFO)
    m.seed(seq([dict(kind=abi.Kind.EXISTING, ct_id=1, t=0, src="10.0.0.1", sport=1111, flags=abi.FLAG_DUMP_ID)]))
    m.apply(seq([state(0xFFFF0001, 1, S.ESTABLISHED, src="10.0.0.7", sport=7777)]))
    assert m.snapshot().count == 2


def test_big_live_table_same_result_whatever_the_batching():
    """With more than 4,096 live entries the merge sets aside live entries a batch
    cannot touch (a Bloom filter): batching must not change any number."""
    rng = np.random.default_rng(7)
    n = 20_000
    ids = rng.permutation(np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x10001))
    ev = abi.empty(3 * n)
    ev["kind"][:n] = abi.Kind.NEW
    ev["ct_id"][:n] = ids
    ev["ct_state"][:n] = abi.TcpState.SYN_SENT
    ev["kind"][n : 2 * n] = abi.Kind.STATE
    ev["ct_id"][n : 2 * n] = ids
    ev["ct_state"][n : 2 * n] = abi.TcpState.ESTABLISHED
    closing = ids[rng.random(n) < 0.4]
    k = len(closing)
    ev["kind"][2 * n : 2 * n + k] = abi.Kind.DESTROY
    ev["ct_id"][2 * n : 2 * n + k] = closing
    ev["ct_state"][2 * n : 2 * n + k] = abi.TcpState.TIME_WAIT
    ev["reason"][2 * n : 2 * n + k] = abi.DestroyReason.TIMEOUT
    ev = ev[: 2 * n + k]
    ev["ts_boot_ns"] = T0 + np.arange(len(ev), dtype=np.uint64) * np.uint64(1000)
    ev["family"] = abi.AF_INET
    ev["orig_src"][:, :4] = rng.integers(0, 256, (len(ev), 4))
    ev["l4proto"] = abi.IPPROTO_TCP
    results = []
    for first, batch in ((len(ev), len(ev)), (5000, 5000), (777, 777), (100, 9000)):  # (the last: fold_file's small first batch)
        m = Model(INFO)
        m.apply(ev[:first])
        for lo in range(first, len(ev), batch):
            m.apply(ev[lo : lo + batch])
        s = m.snapshot()
        live = m.live
        results.append((s.count, s.peak_count, s.inserts, s.removals, sorted(live["ct_id"].tolist()),
                        np.bincount(live["ct_state"], minlength=10).tolist()))
    assert results[0][0] == n - k and results[0][1] == n and results[0][3] == {"fin": k}
    assert results[0][5][abi.TcpState.ESTABLISHED] == n - k
    assert results[1] == results[0] and results[2] == results[0] and results[3] == results[0]


def test_median_ages_of_many_rows_come_from_one_sort_and_match_one_pass():
    # A full report lists every address: past AGES_ONE_PASS rows the medians come from
    # one sort of all entries' ages; fewer rows get theirs from one pass over the entries.
    from ctrace.keytable import AGES_ONE_PASS

    n = AGES_ONE_PASS + 8
    # Address i holds 1-3 entries; entry id e is born e + 1 s after T0.
    evs = [new(i * 4 + k, 1 + i * 4 + k, src=f"10.{i // 40000}.{i // 200 % 200}.{i % 200 + 1}") for i in range(n) for k in range(1 + i % 3)]
    m = fold(seq(evs))
    end = T0 + 10000 * NS
    few = m.snapshot(end).ips
    one_pass = {r.label: r.median_age_s for r in few.top(AGES_ONE_PASS)}
    assert few.ages._all is None and len(one_pass) == AGES_ONE_PASS
    many = m.snapshot(end).ips
    rows = many.top()
    assert len(rows) == n and many.ages._all is not None
    by_label = {r.label: r.median_age_s for r in rows}
    assert all(by_label[k] == pytest.approx(v) for k, v in one_pass.items())
    assert many[3].median_age_s == pytest.approx(by_label[many[3].label])
    assert by_label["10.0.0.1"] == pytest.approx(9999.0)  # its one entry, born at T0 + 1 s
    assert by_label["10.0.0.3"] == pytest.approx(10000 - 10)  # entries born at 9, 10 and 11 s
    assert one_pass["10.0.0.3"] == pytest.approx(10000 - 10)
