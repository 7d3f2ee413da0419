"""ctrace.crc gives zlib's CRC-32 whichever implementation computes it."""

import ctypes.util
import random
import zlib

import numpy as np
import pytest

from ctrace import crc, recording
from ctrace.sources import synthetic

from tests.unit.conftest import run_cli


@pytest.fixture(params=["libdeflate", "zlib"])
def implementation(request, monkeypatch):
    if request.param == "zlib":
        monkeypatch.setattr(crc, "_fast", None)
    elif crc.implementation() != "libdeflate":
        pytest.skip("libdeflate (Debian package libdeflate0) is not installed here")
    assert crc.implementation() == request.param
    return request.param


def test_libdeflate_is_used_where_installed():
    if ctypes.util.find_library("deflate"):
        assert crc.implementation() == "libdeflate"


def test_agrees_with_zlib_on_every_kind_of_buffer(implementation):
    rng = random.Random(5)
    for _ in range(300):
        n = rng.choice([0, 1, 7, 4095, 4096, 4097, rng.randrange(1, 1 << 17)])
        data = rng.randbytes(n) if hasattr(rng, "randbytes") else bytes(rng.getrandbits(8) for _ in range(n))
        seed = rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])
        want = zlib.crc32(data, seed)
        lo = rng.randrange(n + 1)
        assert crc.crc32(data, seed) == want
        assert crc.crc32(bytearray(data), seed) == want
        assert crc.crc32(memoryview(bytearray(data)), seed) == want
        assert crc.crc32(memoryview(data), seed) == want  # read-only
        assert crc.crc32(np.frombuffer(data, np.uint8).copy(), seed) == want
        # in two pieces, the first's value seeding the second
        assert crc.crc32(memoryview(bytearray(data))[lo:], crc.crc32(memoryview(bytearray(data))[:lo], seed)) == want


def test_typed_and_offset_buffers(implementation):
    words = np.random.default_rng(1).integers(0, 2**63, 50_000, dtype=np.uint64)
    view = memoryview(words)
    assert view.format != "B"
    assert crc.crc32(view) == zlib.crc32(view)
    assert crc.crc32(view[3:]) == zlib.crc32(view[3:])
    assert crc.crc32(words[::2].copy()) == zlib.crc32(words[::2].copy())


def test_recordings_read_alike(monkeypatch, tmp_path):
    """A recording reports the same, whole or damaged, whichever implementation checks it."""
    info, existing, events = synthetic.generate("nat-churn", seed=2, events=20_000)
    path = str(tmp_path / "r.ctr")
    w = recording.RecordingWriter.create(path, info)
    w.write_existing(existing)
    w.write_events(events)
    w.close(end_boot_ns=info.extra["end_boot_ns"])
    damaged = str(tmp_path / "d.ctr")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(damaged, "wb").write(data)
    runs = [(run_cli(["report", "--json", path]), run_cli(["report", "--json", damaged]))]
    monkeypatch.setattr(crc, "_fast", None)
    runs.append((run_cli(["report", "--json", path]), run_cli(["report", "--json", damaged])))
    assert runs[0] == runs[1]
    (status, out, err), (bad_status, _, bad_err) = runs[0]
    assert status == 0 and err == "" and '"total": %d' % (len(events) + len(existing)) in out
    assert bad_status != 0 and "CRC mismatch" in bad_err
