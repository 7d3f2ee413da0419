"""Truncated, corrupt and newer recordings: the right status, one line, data before the damage kept."""

import json
import os
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from ctrace import abi, recording
from ctrace.sources import synthetic
from ctrace.status import ExitStatus

from tests.unit.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A recording of a few hundred KiB made of many small chunks, like a live recorder writes."""
    info, existing, events = synthetic.generate("nat-churn", seed=3, events=4000)
    path = str(tmp_path_factory.mktemp("dmg") / "s.ctr")
    w = recording.RecordingWriter.create(path, info)
    w.write_existing(existing[:200])
    for lo in range(0, len(events), 37):
        w.write_events(events[lo : lo + 37])
    w.close(end_boot_ns=info.extra["end_boot_ns"])
    data = open(path, "rb").read()
    return path, data, events


def _chunk_ends(data: bytes) -> list:
    """Byte offsets where each chunk ends (the points up to which a reader keeps data)."""
    _, _, _, hlen = recording.PREAMBLE.unpack_from(data, 0)
    pos = recording.PREAMBLE.size + hlen + 4
    ends = [pos]
    while pos < len(data):
        _, plen, _, _ = recording.CHUNK_HEAD.unpack_from(data, pos)
        pos += recording.CHUNK_HEAD.size + plen
        ends.append(pos)
    return ends


def _kept(ends: list, cut: int, data: bytes, record_size: int) -> int:
    """Records in the complete chunks before `cut`."""
    n = 0
    for a, b in zip(ends, ends[1:]):
        if b > cut:
            break
        ctype = data[a : a + 4]
        if ctype in (recording.T_EVENTS, recording.T_EXISTING):
            n += (b - a - recording.CHUNK_HEAD.size) // record_size
    return n


def test_whole_file_is_clean(sample):
    path, data, events = sample
    rec = recording.read(path)
    assert rec.complete and rec.trailer["events"] == len(events)
    assert len(rec.events) == len(events) and len(rec.existing) == 200


def test_every_cut_in_the_first_64k(sample):
    path, data, _ = sample
    ends = _chunk_ends(data)
    header_end = ends[0]
    for cut in range(0, min(len(data), 65536)):
        buf = data[:cut]
        try:
            rec = recording.parse(buf, len(buf))
        except recording.TruncatedRecording:
            assert cut < header_end
            continue
        except recording.CorruptRecording:
            assert cut < 8 and buf != recording.MAGIC[:cut]
            continue
        assert cut >= header_end
        assert [d.kind for d in rec.damage] == ["truncated"], cut
        assert len(rec.events) + len(rec.existing) == _kept(ends, cut, data, abi.EVENT_SIZE), cut


def test_random_cuts_beyond_64k(sample):
    path, data, _ = sample
    assert len(data) > 65536 + 1000
    ends = _chunk_ends(data)
    rng = random.Random(11)
    for cut in rng.sample(range(65536, len(data)), 1000):
        rec = recording.parse(data[:cut], cut)
        assert [d.kind for d in rec.damage] == ["truncated"]
        assert len(rec.events) + len(rec.existing) == _kept(ends, cut, data, abi.EVENT_SIZE)


def test_cli_on_cuts(sample, tmp_path):
    """The command line: documented status, one stderr line, the report of what was kept."""
    path, data, _ = sample
    ends = _chunk_ends(data)
    rng = random.Random(5)
    cuts = sorted(set(list(range(0, 400, 7)) + rng.sample(range(400, len(data) - 1), 300)))
    for i, cut in enumerate(cuts):
        p = str(tmp_path / f"c{i}.ctr")
        with open(p, "wb") as f:
            f.write(data[:cut])
        status, out, err = run_cli(["report", "--json", p])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (cut, err)
        if cut < ends[0]:
            assert status in (ExitStatus.TRUNCATED, ExitStatus.CORRUPT) and out == ""
            assert status == ExitStatus.TRUNCATED or cut < 8
        else:
            assert status == ExitStatus.TRUNCATED, (cut, err)
            assert "truncated" in lines[0] or "without a trailer" in lines[0]
            rep = json.loads(out)
            assert rep["events"]["total"] == _kept(ends, cut, data, abi.EVENT_SIZE)


def test_byte_flips(sample, tmp_path):
    path, data, events = sample
    ends = _chunk_ends(data)
    rng = random.Random(17)
    p = str(tmp_path / "flip.ctr")
    for i in range(1000):
        pos = rng.randrange(len(data))
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        with open(p, "wb") as f:
            f.write(bad)
        status, out, err = run_cli(["report", "--json", p])
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (pos, err)
        if pos < ends[0]:
            # magic, version, header length, header or its CRC: nothing is usable
            assert status in (ExitStatus.CORRUPT, ExitStatus.TRUNCATED, ExitStatus.NEWER_FORMAT), (pos, status, err)
            assert out == ""
            continue
        assert status == ExitStatus.CORRUPT, (pos, status, err)
        rep = json.loads(out)
        # everything before the damaged chunk is reported
        chunk_start = max(e for e in ends if e <= pos)
        assert rep["events"]["total"] >= _kept(ends, chunk_start, data, abi.EVENT_SIZE)


def test_newer_major_refused_newer_minor_read(sample, tmp_path):
    path, data, events = sample
    magic, major, minor, hlen = recording.PREAMBLE.unpack_from(data, 0)
    newer = bytearray(data)
    struct.pack_into("<H", newer, 8, major + 1)
    p = tmp_path / "major.ctr"
    p.write_bytes(bytes(newer))
    status, out, err = run_cli(["report", str(p)])
    assert status == ExitStatus.NEWER_FORMAT and "newer" in err and len(err.strip().splitlines()) == 1
    minor_up = bytearray(data)
    struct.pack_into("<H", minor_up, 10, minor + 5)
    # a newer minor may add chunk types: append one before the trailer-less end and read on
    extra = recording._chunk(b"XTRA", b"future data")
    p2 = tmp_path / "minor.ctr"
    p2.write_bytes(bytes(minor_up[: _chunk_ends(data)[-2]]) + extra + bytes(minor_up[_chunk_ends(data)[-2]:]))
    rec = recording.read(str(p2))
    assert rec.complete and len(rec.events) == len(events)


def test_not_a_recording_and_missing(tmp_path):
    p = tmp_path / "x.ctr"
    p.write_text("hello world, not a trace\n")
    status, _, err = run_cli(["report", str(p)])
    assert status == ExitStatus.CORRUPT and "not a ctrace recording" in err
    status, _, err = run_cli(["report", str(tmp_path / "nope.ctr")])
    assert status == ExitStatus.NO_INPUT and "no such file" in err
    status, _, err = run_cli(["report", str(tmp_path)])
    assert status == ExitStatus.NO_INPUT
    empty = tmp_path / "empty.ctr"
    empty.write_bytes(b"")
    status, _, err = run_cli(["report", str(empty)])
    assert status == ExitStatus.TRUNCATED and len(err.strip().splitlines()) == 1


def test_no_traceback_from_a_real_process(sample, tmp_path):
    path, data, _ = sample
    p = tmp_path / "cut.ctr"
    p.write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "ctrace", "report", str(p)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == ExitStatus.TRUNCATED
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "entries" in r.stdout
