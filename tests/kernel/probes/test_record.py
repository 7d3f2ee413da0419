"""ctrace record as a process: ready file, signals, clean detach (lab guest only).

Two compiles (one per process): SIGTERM must close the recording properly and
detach everything; after SIGKILL no probe may be left behind either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lab_toolkit import Topology, close_fin, conntrack_flush

from ctrace import abi
from ctrace.recording import read


def start(tmp_path, name):  # type: ignore[no-untyped-def]
    out = tmp_path / f"{name}.ctr"
    ready = tmp_path / f"{name}.ready"
    p = subprocess.Popen([sys.executable, "-m", "ctrace", "record", "-o", str(out), "--ready-file", str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not ready.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.5)
    return p, out


def bpf_progs() -> set:
    """(id, name) of every loaded BPF program, from bpftool."""
    try:
        out = subprocess.run(["bpftool", "-j", "prog", "show"], stdout=subprocess.PIPE, text=True).stdout
    except OSError:
        return set()
    import json

    return {(p.get("id"), p.get("name", "")) for p in json.loads(out or "[]")}


def leftovers(pid: int, before: set) -> list:
    """kprobes the recorder (pid) registered, and programs loaded since `before` (other
    tracers in this test session, e.g. the probes fixture, keep theirs)."""
    found = []
    for path in ("/sys/kernel/tracing/kprobe_events", "/sys/kernel/debug/tracing/kprobe_events"):
        try:
            found += [ln for ln in open(path).read().splitlines() if f"_bcc_{pid}" in ln]
        except OSError:
            pass
    found += [f"prog {i} {n}" for i, n in bpf_progs() - before]
    return found


def test_sigterm_closes_recording(tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = bpf_progs()
    p, out = start(tmp_path, "term")
    with Topology.create() as topo:
        server = topo.tcp_server()
        conns = topo.connect(topo.client_v4[0], 5, server)
        close_fin(conns)
        conntrack_flush(topo.server_ns)
        time.sleep(1.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "recording to" in err and "wrote" in err, err
    rec = read(str(out))
    assert rec.trailer is not None and rec.trailer.get("stopped_by", {}).get("signal") == "SIGTERM"
    new = rec.events[rec.events["kind"] == abi.Kind.NEW]
    assert len(new) >= 5
    assert not leftovers(p.pid, before)


def test_sigkill_leaves_no_probe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = bpf_progs()
    p, out = start(tmp_path, "kill")
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    time.sleep(1)
    assert not leftovers(p.pid, before)
