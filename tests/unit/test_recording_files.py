"""Recording files: private, never clobbered, and readable after the recorder is SIGKILLed."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from ctrace import recording
from ctrace.sources.base import SourceInfo
from ctrace.status import CtraceError, ExitStatus

from tests.unit.conftest import ROOT, run_cli

INFO = SourceInfo("h", "k", 0, 1000)


def test_created_0600(tmp_path):
    p = str(tmp_path / "a.ctr")
    old = os.umask(0)
    try:
        recording.RecordingWriter.create(p, INFO).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_existing_file_refused(tmp_path):
    p = tmp_path / "a.ctr"
    p.write_text("precious")
    with pytest.raises(CtraceError) as exc:
        recording.RecordingWriter.create(str(p), INFO)
    assert exc.value.status == ExitStatus.CANNOT_WRITE and p.read_text() == "precious"


def test_planted_symlink_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_text("do not touch")
    link = tmp_path / "trace.ctr"
    link.symlink_to(target)
    status, _, err = run_cli(["synth", "nat-churn", "--events", "1000", "-o", str(link)])
    assert status == ExitStatus.CANNOT_WRITE and "symbolic link" in err
    assert target.read_text() == "do not touch"
    dangling = tmp_path / "dangling.ctr"
    dangling.symlink_to(tmp_path / "nowhere")
    status, _, err = run_cli(["synth", "nat-churn", "--events", "1000", "-o", str(dangling)])
    assert status == ExitStatus.CANNOT_WRITE and not (tmp_path / "nowhere").exists()


WRITER = r"""
import sys, numpy as np
from ctrace import abi, recording
from ctrace.sources.base import SourceInfo
w = recording.RecordingWriter.create(sys.argv[1], SourceInfo("h", "k", 0, 1000))
i = 0
while True:
    e = abi.empty(50)
    e["kind"] = abi.Kind.NEW
    e["ct_id"] = np.arange(i, i + 50)
    e["ts_boot_ns"] = 1000 + np.arange(i, i + 50)
    w.write_events(e)
    i += 50
    if i == 5000:
        print("ready", flush=True)
"""


def test_sigkill_mid_write_replays(tmp_path):
    p = str(tmp_path / "killed.ctr")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, p], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = recording.read(p)
    assert rec.trailer is None and len(rec.events) >= 5000 and len(rec.events) % 50 == 0 or rec.damage[0].kind == "truncated"
    assert [d.kind for d in rec.damage] == ["truncated"]
    ids = rec.events["ct_id"]
    assert (ids == range(len(ids))).all()  # every complete chunk, in order, nothing lost before the cut
    status, out, err = run_cli(["report", p])
    assert status == ExitStatus.TRUNCATED and f"entries 0 -> {len(ids)}" in out
