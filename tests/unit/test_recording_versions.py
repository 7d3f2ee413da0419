"""Format versions: version 2 stores records field by field; version 1 files (packed
records, written by ctrace before 2.0 of the format) still read to the same events."""

import json
import struct
import zlib

import numpy as np

from ctrace import abi, recording
from ctrace.columns import FIELDS, Columns
from ctrace.sources import synthetic


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    head = struct.pack("<4sII", ctype, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def _v1_file(info, existing: np.ndarray, events: np.ndarray, end: int, record_size: int = abi.EVENT_SIZE) -> bytes:
    """A version 1.x file written the way format 1 was specified (packed records)."""
    header = dict(info.to_json(), abi_major=1, abi_minor=0, record_size=record_size, writer="v1", host="h")
    blob = json.dumps(header).encode()
    out = [recording.PREAMBLE.pack(recording.MAGIC, 1, 0, len(blob)), blob, struct.pack("<I", zlib.crc32(blob))]

    def packed(rec: np.ndarray) -> bytes:
        raw = np.zeros((len(rec), record_size), np.uint8)  # a later minor's longer records
        raw[:, : abi.EVENT_SIZE] = rec.view(np.uint8).reshape(-1, abi.EVENT_SIZE)
        raw[:, abi.EVENT_SIZE :] = 0xAB
        return raw.tobytes()

    out.append(_chunk(recording.T_EXISTING, packed(existing)))
    for lo in range(0, len(events), 1000):
        out.append(_chunk(recording.T_EVENTS, packed(events[lo : lo + 1000])))
    out.append(_chunk(recording.T_TRAILER, json.dumps({"end_boot_ns": end}).encode()))
    return b"".join(out)


def _scenario():
    info, existing, events = synthetic.generate("lost-fin", seed=5, events=5000)
    return info, existing, events, int(info.extra["end_boot_ns"])


def _write(path: str, chunk: int, existing: bool = True, mixed: bool = False):
    """The scenario written in chunks of `chunk` events (mixed: every other one as Columns)."""
    info, ex, events, end = _scenario()
    w = recording.RecordingWriter.create(path, info)
    if existing:
        w.write_existing(ex)
    for lo in range(0, len(events), chunk):
        part = events[lo : lo + chunk]
        w.write_events(Columns.of(part) if mixed and lo % 2 else part)
    w.close(end_boot_ns=end)
    return ex, events


def test_version2_stores_fields_contiguously(tmp_path):
    info, existing, events, end = _scenario()
    p = str(tmp_path / "v2.ctr")
    w = recording.RecordingWriter.create(p, info)
    w.write_events(events[:10])
    w.close(end_boot_ns=end)
    data = open(p, "rb").read()
    _, major, _, hlen = recording.PREAMBLE.unpack_from(data, 0)
    assert major == 2
    at = recording.PREAMBLE.size + hlen + 4
    ctype, plen, _, _ = recording.CHUNK_HEAD.unpack_from(data, at)
    payload = data[at + recording.CHUNK_HEAD.size : at + recording.CHUNK_HEAD.size + plen]
    assert ctype == recording.T_EVENTS and plen == 10 * abi.EVENT_SIZE
    # kind of record i sits at 10 * offset(kind) + i; ct_id i at 10 * offset(ct_id) + 8 i
    off = abi.FIELD_OFFSETS
    assert list(payload[10 * off["kind"] : 10 * off["kind"] + 10]) == events["kind"][:10].tolist()
    ids = np.frombuffer(payload, "<u8", count=10, offset=10 * off["ct_id"])
    assert ids.tolist() == events["ct_id"][:10].tolist()
    assert FIELDS[0] == "ts_boot_ns" and FIELDS[-1] == "_pad"


def test_version1_reads_the_same(tmp_path):
    info, existing, events, end = _scenario()
    for record_size in (abi.EVENT_SIZE, abi.EVENT_SIZE + 8):
        p = tmp_path / f"v1-{record_size}.ctr"
        p.write_bytes(_v1_file(info, existing, events, end, record_size))
        rec = recording.read(str(p))
        assert rec.major == 1 and rec.complete
        assert rec.existing.tobytes() == existing.tobytes()
        assert rec.events.tobytes() == events.tobytes()
        r = recording.open_reader(str(p))
        got = Columns.concat([b.copy() for b in r.batches(777)])
        assert got.records().tobytes() == events.tobytes()


def test_version2_batches_equal_the_events(tmp_path):
    p = str(tmp_path / "v2.ctr")
    existing, events = _write(p, 333, mixed=True)
    r = recording.open_reader(p)
    assert r.existing().records().tobytes() == existing.tobytes()
    sizes = []
    parts = []
    for b in r.batches(1000):
        sizes.append(len(b))
        parts.append(b.copy())
    assert max(sizes) <= 1000 and sum(sizes) == len(events)
    assert Columns.concat(parts).records().tobytes() == events.tobytes()


def test_read_ahead_gives_the_same_batches_and_stops_cleanly(tmp_path):
    import threading

    p = str(tmp_path / "ra.ctr")
    _write(p, 100)
    plain = [b.copy() for b in recording.open_reader(p).batches(450)]
    ahead = []
    for b in recording.open_reader(p).batches(450, read_ahead=True):
        ahead.append(b.copy())
        # the batch held must not change while the thread reads the next ones
        assert b.records().tobytes() == plain[len(ahead) - 1].records().tobytes()
    assert len(ahead) == len(plain) > 3
    before = threading.active_count()
    r = recording.open_reader(p)
    it = r.batches(450, read_ahead=True)
    next(it)
    it.close()  # a caller that stops early leaves no thread behind
    assert threading.active_count() == before


def test_a_small_first_batch_then_full_ones(tmp_path):
    # fold_file asks for a small first batch so folding starts sooner: batch 1 holds up
    # to `first` records (whole 100-record chunks), the others up to max_records.
    p = str(tmp_path / "first.ctr")
    _, events = _write(p, 100)
    for ahead in (False, True):
        sizes, parts = [], []
        for b in recording.open_reader(p).batches(450, read_ahead=ahead, first=250):
            sizes.append(len(b))
            parts.append(b.copy())
        assert sizes[0] == 200 and sizes[1:-1] and all(s == 400 for s in sizes[1:-1]) and sizes[-1] <= 400
        assert Columns.concat(parts).records().tobytes() == events.tobytes()


def test_read_ahead_passes_damage_on(tmp_path):
    p = tmp_path / "cut.ctr"
    _, events = _write(str(p), 100, existing=False)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    r = recording.open_reader(str(p))
    n = sum(len(b) for b in r.batches(450, read_ahead=True))
    assert 0 < n < len(events) and r.damage and r.damage[0].kind == "truncated"
