"""Properties of the format: what is written is read back byte for byte, however it is
chunked; arbitrary bytes never make the reader raise anything but TraceFormatError."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrace import abi, recording
from ctrace.sources.base import SourceInfo

INFO = SourceInfo("h", "k", 0, 5)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=abi.EVENT_SIZE * 40), cuts=st.lists(st.integers(0, 40), max_size=6),
       existing=st.integers(0, 5))
def test_round_trip(tmp_path_factory, data, cuts, existing):
    n = len(data) // abi.EVENT_SIZE
    ev = np.frombuffer(data[: n * abi.EVENT_SIZE], dtype=abi.EVENT_DTYPE).copy()
    ex = abi.empty(existing)
    ex["ct_id"] = np.arange(existing)
    path = str(tmp_path_factory.mktemp("rt") / "r.ctr")
    w = recording.RecordingWriter.create(path, INFO)
    w.write_existing(ex)
    bounds = sorted({0, n, *[c for c in cuts if c <= n]})
    for lo, hi in zip(bounds, bounds[1:]):
        w.write_events(ev[lo:hi])
    w.close(end_boot_ns=99)
    rec = recording.read(path)
    assert rec.complete and rec.trailer["end_boot_ns"] == 99
    assert rec.events.tobytes() == ev.tobytes() and rec.existing.tobytes() == ex.tobytes()


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=600), keep=st.integers(0, 2000))
def test_arbitrary_bytes_only_raise_format_errors(tmp_path_factory, blob, keep):
    path = str(tmp_path_factory.mktemp("fz") / "r.ctr")
    w = recording.RecordingWriter.create(path, INFO)
    e = abi.empty(3)
    w.write_events(e)
    w.close()
    good = open(path, "rb").read()
    for data in (blob, good[:keep] + blob, good + blob, blob + good):
        try:
            recording.parse(data, len(data))
        except recording.TraceFormatError:
            pass
