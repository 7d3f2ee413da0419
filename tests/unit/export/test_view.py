"""views/export: metric families equal the report, counters never go down, series stay bounded."""

import json
from collections import defaultdict

import numpy as np
import pytest

from ctrace import abi
from ctrace.feeds import ReplayFeed
from ctrace.model import REMOVAL_REASONS, Model, ModelOptions
from ctrace.pipeline import fold_file, open_recording
from ctrace.sources.base import SourceInfo
from ctrace.views import export
from ctrace.exporter import render
from ctrace.views.export import (COUNTER, NetnsSelection, families, netns_ids, series_bound, series_count,
                                  skipped_runs_family)
from tests.unit.conftest import run_cli

NS = 1_000_000_000


def flat(fams):
    return {(f.name, tuple(zip(f.labels, v))): x for f in fams for v, x in f.samples}


def get(fl, name, **labels):
    return fl[(name, tuple(labels.items()))]


@pytest.mark.parametrize("scenario", ["lost-fin", "syn-flood", "nat-churn"])
def test_families_equal_the_report(recordings, scenario):
    path = recordings[scenario]
    model, _, end = fold_file(path, ModelOptions())
    fl = flat(families(model.snapshot(end), top_k=20, window=False))
    status, out, err = run_cli(["report", "--json", path])
    assert status == 0, err
    rep = json.loads(out)
    t = rep["table"]
    assert get(fl, "ctrace_entries") == t["end_count"]
    assert get(fl, "ctrace_entries_max") == t["max"]
    assert get(fl, "ctrace_entries_peak") == t["peak_count"]
    assert get(fl, "ctrace_inserts_total") == rep["events"]["by_kind"].get("new", 0)
    assert get(fl, "ctrace_events_total") == rep["events"]["total"]
    for reason in REMOVAL_REASONS:
        assert get(fl, "ctrace_removals_total", reason=reason) == rep["removals"].get(reason, 0)
    for kind, n in rep["orphans_by_kind"].items():
        assert get(fl, "ctrace_orphans_total", kind=kind) == n
    for reason in ("table-full", "insert-failed"):
        assert get(fl, "ctrace_drops_total", reason=reason) == rep["drops_by_reason"].get(reason, 0)
    assert sum(v for (n, _), v in fl.items() if n == "ctrace_events_lost_total") == rep["events"]["lost"]
    assert get(fl, "ctrace_insert_rate_per_second") == pytest.approx(t["insert_rate_per_s"], abs=1e-3)
    assert get(fl, "ctrace_expiry_rate_per_second") == pytest.approx(t["expire_rate_per_s"], abs=1e-3)
    if t["time_to_full_s"] is None:
        assert get(fl, "ctrace_time_to_full_seconds") == float("inf")
    else:
        assert get(fl, "ctrace_time_to_full_seconds") == pytest.approx(t["time_to_full_s"], abs=0.1)
    for row in rep["netns"]:
        ns = str(row["netns"])
        assert get(fl, "ctrace_netns_entries", netns=ns) == row["live"]
        assert get(fl, "ctrace_netns_inserts_total", netns=ns) == row["created"]
        assert get(fl, "ctrace_netns_orphans_total", netns=ns) == row["orphans"]
        assert get(fl, "ctrace_netns_drops_total", netns=ns) == row["drops"]
        for reason in REMOVAL_REASONS:
            assert get(fl, "ctrace_netns_removals_total", netns=ns, reason=reason) == row["removals"].get(reason, 0)
    top_ips = {(r["ip"], str(r["netns"])): r["live"] for r in rep["ips"] if r["live"] > 0}
    ours = {(dict(k[1])["ip"], dict(k[1])["netns"]): v for k, v in fl.items() if k[0] == "ctrace_ip_entries"}
    for key, live in list(top_ips.items())[:20]:
        assert ours[key] == live
    # per-address and per-netns entries add up to the table (the rest in `other`)
    assert sum(ours.values()) == t["end_count"]
    assert sum(v for (n, _), v in fl.items() if n == "ctrace_netns_entries") == t["end_count"]
    assert sum(v for (n, _), v in fl.items() if n == "ctrace_prefix_entries") == t["end_count"]


def test_counters_never_go_down_while_replaying(recordings):
    """Snapshots every 5 s of recorded time, with room for only one netns: every
    counter series (per netns and `other` included) is monotonic."""
    rec = open_recording(recordings["nat-churn"])
    feed = ReplayFeed(rec, ModelOptions())
    sel = NetnsSelection(max_netns=1)
    prev = {}
    steps = 0
    while not feed.exhausted:
        feed.step(5)
        snap = feed.snapshot()
        fams = families(snap, top_k=3, netns=sel.update(*netns_ids(snap)))
        assert series_count(fams) <= series_bound(3, 1)
        for f in fams:
            if f.kind != COUNTER:
                continue
            for labels, v in f.samples:
                key = (f.name, labels)
                assert v >= prev.get(key, 0.0), (key, prev.get(key), v)
                prev[key] = v
        steps += 1
    assert steps > 10
    assert any(k[0] == "ctrace_netns_inserts_total" and k[1] == ("other",) and v > 0 for k, v in prev.items())


def test_netns_selection_never_takes_back_from_other():
    sel = NetnsSelection(max_netns=2)
    assert sel.update(np.array([1, 2, 3]), np.array([5, 9, 1])) == {1, 2}  # 3 goes to other for good
    assert sel.update(np.array([1, 2, 3]), np.array([5, 9, 100])) == {1, 2}
    # 1 empties: it may be retired to make room for a newcomer, but 3 never comes back
    assert sel.update(np.array([1, 2, 3, 4]), np.array([0, 9, 100, 7])) == {2, 4}
    assert sel.update(np.array([1, 2, 3, 4]), np.array([50, 9, 100, 7])) == {2, 4}
    assert sel.retired == {1, 3}


def _flood(n_ips: int, first: int, netns_count: int) -> np.ndarray:
    ev = abi.empty(n_ips)
    ev["kind"] = abi.Kind.NEW
    ev["ct_id"] = np.arange(first + 1, first + n_ips + 1)
    ev["ts_boot_ns"] = (first + np.arange(n_ips)) * 1000
    ev["family"] = abi.AF_INET
    ev["l4proto"] = abi.IPPROTO_TCP
    ev["ct_state"] = abi.TcpState.ESTABLISHED
    ev["netns_ino"] = 4026531840 + (np.arange(first, first + n_ips) % netns_count)
    ip = (0x0A000000 + first + np.arange(n_ips)).astype(">u4")
    ev["orig_src"][:, :4] = ip.view(np.uint8).reshape(-1, 4)
    return ev


def test_a_million_source_ips_stay_under_the_bound():
    info = SourceInfo("t", "t", 0, 0, sysctls={"nf_conntrack_max": 2_000_000})
    m = Model(info, ModelOptions(max_keys=65536))
    step = 200_000
    for lo in range(0, 1_000_000, step):
        m.apply(_flood(step, lo, netns_count=300))
    snap = m.snapshot()
    sel = NetnsSelection(max_netns=128)
    fams = families(snap, top_k=20, netns=sel.update(*netns_ids(snap)))
    n = series_count(fams)
    assert n <= series_bound(20, 128), n
    by_name = defaultdict(int)
    for f in fams:
        by_name[f.name] += len(f.samples)
    assert by_name["ctrace_ip_entries"] == 21 and by_name["ctrace_prefix_entries"] == 21
    assert by_name["ctrace_netns_entries"] == 129
    assert by_name["ctrace_netns_removals_total"] == 129 * len(REMOVAL_REASONS)
    fl = flat(fams)
    assert get(fl, "ctrace_entries") == 1_000_000
    assert sum(v for (name, _), v in fl.items() if name == "ctrace_ip_entries") == 1_000_000
    assert sum(v for (name, _), v in fl.items() if name == "ctrace_netns_entries") == 1_000_000
    print(f"1M distinct source IPs, 300 netns: {n} series (bound {series_bound(20, 128)})")


def test_bound_formula_matches_the_docs():
    assert series_bound(20, 128) == export._global_series() + 129 * (7 + len(REMOVAL_REASONS)) + 2 * 21 * 4


def test_skipped_runs_family_has_a_series_only_where_the_kernel_counts():
    fam = skipped_runs_family({"sock_state_rtp": 36, "kfunc__nf_conntrack__nf_ct_destroy": 0, "tcp_e": None})
    assert (fam.name, fam.kind, fam.labels) == ("ctrace_probe_skipped_runs_total", COUNTER, ("program",))
    assert fam.samples == ((("kfunc__nf_conntrack__nf_ct_destroy",), 0.0), (("sock_state_rtp",), 36.0))
    text = render([fam]).decode()
    assert 'ctrace_probe_skipped_runs_total{program="sock_state_rtp"} 36.0' in text
    assert "tcp_e" not in text
    assert skipped_runs_family({}).samples == ()


def test_ring_buffer_gauges_follow_the_counter_records():
    m = Model(SourceInfo("t", "t", 0, 0))
    recs = abi.empty(4)
    recs["kind"] = abi.Kind.COUNTER
    recs["ts_boot_ns"] = [NS, NS, 2 * NS, 2 * NS]
    recs["reason"] = [abi.Counter.RING_BYTES, abi.Counter.RING_PEAK_BYTES] * 2
    recs["value"] = [1 << 20, 700_000, 1 << 20, 5_000]
    m.apply(recs)
    fl = flat(families(m.snapshot()))
    assert get(fl, "ctrace_ring_buffer_bytes") == 1 << 20
    assert get(fl, "ctrace_ring_buffer_peak_bytes") == 5_000  # the last second's, not the run's
    bare = flat(families(Model(SourceInfo("t", "t", 0, 0)).snapshot()))
    assert not any(name.startswith("ctrace_ring_buffer") for name, _ in bare)
