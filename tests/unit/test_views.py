"""Views are pure functions of a snapshot: exact frames."""

from ctrace import abi
from ctrace.model import Model
from ctrace.views.report import render_text, to_json
from ctrace.views.top import render_frame
from tests.unit.eventfactory import INFO, NS, T0, destroy, new, seq, state

S = abi.TcpState


def snapshot():
    m = Model(INFO)
    m.seed(seq([dict(kind=abi.Kind.EXISTING, ct_id=100, t=0, src="10.0.0.9")]))
    m.apply(seq([
        new(1, 1, src="10.0.0.1"), state(1, 1.5, S.ESTABLISHED, src="10.0.0.1"),
        new(2, 2, src="10.0.0.1"), state(2, 2.5, S.ESTABLISHED, src="10.0.0.1"), state(2, 3, S.TIME_WAIT, src="10.0.0.1"),
        new(3, 3, src="2001:db8::7"), destroy(3, 4, S.CLOSE, src="2001:db8::7"),
        dict(kind=abi.Kind.DROP, t=5, src="192.0.2.1", reason=abi.DropReason.TABLE_FULL),
    ]))
    return m.snapshot(T0 + 10 * NS)


FRAME = """\
ctrace testhost 22:15:10Z  entries 3/100   3.0%  ttf 8m
new      0.3/s  gone      0.1/s  net     +0.2/s  drops 1  orphans 0
probes -  filter none  by src  sort live

ADDRESS            LIVE   NEW/s  GONE/s  ESTAB T_WAIT  OTHER  ORPH  DROP   AGE
10.0.0.1              2     0.2     0.0      1      1      0     0     0    8s
10.0.0.9              1     0.0     0.0      1      0      0     0     0     -
2001:db8::7           0     0.1     0.1      0      0      0     0     0     -
192.0.2.1             0     0.0     0.0      0      0      0     0     1     -
"""


def test_top_frame_exact():
    assert render_frame(snapshot()) == FRAME


def test_frames_fit_80_columns_and_use_wider():
    s = snapshot()
    assert max(len(line) for line in render_frame(s).splitlines()) <= 80
    assert max(len(line) for line in render_frame(s, width=120).splitlines()) > 80


def test_loss_banner_first():
    m = Model(INFO)
    m.apply(seq([dict(kind=abi.Kind.LOST, t=1, reason=abi.LostCause.RINGBUF_FULL, value=42)]))
    assert render_frame(m.snapshot()).splitlines()[0] == "!! EVENTS LOST: 42 (ringbuf_full 42) -- counts below are incomplete !!"
    assert "LOST 42" in render_text(m.snapshot())


def test_report_names_removals_of_unborn_entries():
    m = Model(INFO)
    m.apply(seq([destroy(9, 2, S.ESTABLISHED)]))
    assert ("unborn: 1 removals of entries neither listed at start nor seen created "
            "(inserts the probes missed, or entries the start-up listing missed)") in render_text(m.snapshot())
    assert "unborn" not in render_text(snapshot())


def test_report_json_fields():
    j = to_json(snapshot())
    assert j["table"] == {"max": 100, "buckets": None, "start_count": 1, "end_count": 3, "peak_count": 4, "kernel_count": None,
                          "insert_rate_per_s": 0.3, "expire_rate_per_s": 0.1, "net_growth_per_s": 0.2, "time_to_full_s": 485.0}
    assert j["removals"] == {"rst": 1}
    assert [r["ip"] for r in j["ips"]] == ["10.0.0.1", "10.0.0.9", "2001:db8::7", "192.0.2.1"]
    assert j["ips"][0]["states"] == {"ESTABLISHED": 1, "TIME_WAIT": 1}
    assert j["drops"] == [{"ip": "192.0.2.1", "netns": 4026531840, "count": 1, "samples": [
        {"family": "ipv4", "proto": "tcp", "src": "192.0.2.1", "sport": 40000, "dst": "10.9.9.9", "dport": 443, "netns": 4026531840}]}]


def test_address_filter_on_labels():
    from ctrace.views.top import ViewState, render_screen

    lines = render_screen(snapshot(), ViewState(addr="10.0.0"), 80, 24)
    rows = [line for line in lines if line[:1].isdigit()]
    assert [r.split()[0] for r in rows] == ["10.0.0.1", "10.0.0.9"]


def ring_snapshot(peaks):
    """A live trace's COUNTER records about a 1 MiB ring: one peak per second."""
    m = Model(INFO)
    specs = []
    for i, peak in enumerate(peaks):
        specs += [dict(kind=abi.Kind.COUNTER, t=i + 1, reason=abi.Counter.RING_BYTES, value=1 << 20),
                  dict(kind=abi.Kind.COUNTER, t=i + 1, reason=abi.Counter.RING_PEAK_BYTES, value=peak)]
    m.apply(seq(specs))
    return m.snapshot()


def test_ring_headroom_shown_where_known():
    s = ring_snapshot([900_000, 120_000])  # 86% then 11% of the ring
    assert (s.ring.size_bytes, s.ring.peak_bytes, s.ring.max_peak_bytes) == (1 << 20, 120_000, 900_000)
    assert s.kernel_counters == {}  # ctrace's ring is not one of the kernel's conntrack figures
    assert render_frame(s).splitlines()[2] == "probes -  ring 11%  filter none  by src  sort live"
    assert render_frame(ring_snapshot([120_000, 900_000])).splitlines()[2].startswith("probes -  ring 86% HIGH  filter")
    assert to_json(s)["ring"] == {"size_bytes": 1 << 20, "peak_bytes": 900_000}
    assert "ring buffer at its fullest 86% HIGH of 1024 KiB when read" in render_text(s).splitlines()
    plain = snapshot()  # a recording without ring figures (replay, synthetic, perf buffer)
    assert plain.ring is None and to_json(plain)["ring"] is None
    assert "ring" not in render_frame(plain) and "ring buffer" not in render_text(plain)
