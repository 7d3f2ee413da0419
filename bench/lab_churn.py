"""Connection churn with and without ctrace, and event loss of `conntrack -E` vs ctrace.

Runs inside a lab guest only (it needs a real kernel, root and bcc); one command:

    python3 tests/vm/lab.py run -s bookworm --results /var/tmp/churn -- bench/lab_churn.py -s

(pytest is only the lab's way to start it; `pytest tests/` does not collect bench/,
and outside a guest it skips). It writes churn.json and churn.txt to the guest's
result directory ($CTRACE_LAB_OUT, on the host /var/tmp/churn/<suite>/).

Workload: a client process in the toolkit's client namespace opens TCP connections to
a server process in the server namespace (conntrack on) as fast as it can, each
closed by an RST from the client right after connect (no TIME_WAIT, so source ports
never run out); the server accepts and closes. Every completed connect is one
conntrack entry (one NEW). A run lasts RUN_S seconds; its rate is completed
connects / elapsed.

Run kinds, interleaved in blocks so that drift hits both sides alike:

    off        nothing attached
    conntrack  `conntrack -E` listening in the server namespace (its output to a file)
    ctrace     `ctrace record` running (its own process, default options)
    both       ctrace and `conntrack -E` at once: the same traffic, each one's loss

Blocks: off, [record starts] ctrace, [record stops] off, [record starts] ctrace,
[record stops] off -- two record sessions, so two bcc compiles per boot.

Loss: `conntrack -E` lost = generated - its [NEW] lines for the run's port (each run
has its own server port); ctrace lost = the LOST records (counted in BPF) in the
run's window, and delivered = its NEW events for that port; delivered + lost must
equal generated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
RUN_S = 5.0  # seconds per run
SETTLE_S = 1.5
FIRST_PORT = 9000

# ------------------------------------------------------------------ driver (pytest in a lab guest)

import pytest  # noqa: E402

if os.environ.get("CTRACE_LAB_GUEST") != "1":
    pytest.skip("benchmark: runs only in a lab guest (tests/vm/lab.py run -- bench/lab_churn.py)",
                allow_module_level=True)
sys.path.insert(0, os.path.join(TREE, "tests", "kernel"))
import tcp_churn  # noqa: E402  (the workers, tests/kernel/tcp_churn.py)


def nsenter(ns: str, argv: List[str]) -> List[str]:
    return ["nsenter", f"--net=/run/netns/{ns}"] + argv


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Recorder:
    """`ctrace record` as its own process, as an operator would run it."""

    def __init__(self, path: str, log_path: str) -> None:
        from lab_toolkit import PATH

        self.path = path
        ready = path + ".ready"
        self.log = open(log_path, "a")
        t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "ctrace", "record", "-o", path, "--ready-file", ready],
                                  stdout=self.log, stderr=self.log, env=dict(os.environ, PATH=PATH))
        while not os.path.exists(ready):
            assert self.p.poll() is None, f"ctrace record exited {self.p.returncode}"
            assert time.monotonic() - t0 < 600, "ctrace record never became ready"
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0

    def cpu(self) -> float:
        return cpu_seconds(self.p.pid)

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=120)
        self.log.close()
        assert self.p.returncode == 0, f"ctrace record exited {self.p.returncode}"


class EventListener:
    """`conntrack -E` in the server namespace, its output to a file."""

    def __init__(self, ns: str, path: str) -> None:
        from lab_toolkit import PATH

        self.path = path
        self.out = open(path, "w")
        self.err = open(path + ".err", "w")
        self.p = subprocess.Popen(nsenter(ns, ["conntrack", "-E"]), stdout=self.out, stderr=self.err,
                                  env=dict(os.environ, PATH=PATH))
        time.sleep(0.5)  # subscribed

    def stop(self, port: int) -> Dict[str, object]:
        self.p.send_signal(signal.SIGINT)
        self.p.wait(timeout=30)
        self.out.close()
        self.err.close()
        new = 0
        pat = re.compile(rf"\[NEW\] tcp .*? dport={port} ")
        with open(self.path) as f:
            for line in f:
                if pat.search(line):
                    new += 1
        err = open(self.path + ".err").read()
        return {"new_lines": new, "enobufs": "ENOBUFS" in err, "stderr_tail": err.strip().splitlines()[-1:]}


def one_run(topo, kind: str, port: int, rec: Optional[Recorder], workdir: str) -> Dict[str, object]:  # type: ignore[no-untyped-def]
    from lab_toolkit import PATH

    env = dict(os.environ, PATH=PATH)
    srv = subprocess.Popen(nsenter(topo.server_ns, tcp_churn.serve_argv(port, RUN_S + 3)),
                           stdout=subprocess.PIPE, text=True, env=env)
    assert srv.stdout.readline().strip() == "ready"
    listener = EventListener(topo.server_ns, os.path.join(workdir, f"events-{port}.txt")) \
        if kind in ("conntrack", "both") else None
    cpu0 = rec.cpu() if rec else 0.0
    t_start = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    cli = subprocess.run(nsenter(topo.client_ns, tcp_churn.client_argv(topo.client_v4, topo.server_v4, port, RUN_S)),
                         stdout=subprocess.PIPE, text=True, env=env, timeout=RUN_S + 60)
    t_end = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    res = tcp_churn.client_result(cli.stdout)
    time.sleep(SETTLE_S)
    run: Dict[str, object] = {"kind": kind, "port": port, "generated": res["connects"], "failed": res["failed"],
                              "seconds": round(res["seconds"], 3),
                              "rate": round(res["connects"] / res["seconds"], 1),
                              "t_start": t_start, "t_end": t_end}
    if rec:
        run["ctrace_cpu_s"] = round(rec.cpu() - cpu0, 2)
        run["recording"] = os.path.basename(rec.path)
    if listener:
        run["conntrack_E"] = listener.stop(port)
    srv.wait(timeout=30)
    return run


def ctrace_loss(path: str, runs: List[Dict[str, object]]) -> None:
    """Per run of this recording: ctrace's delivered NEW events and counted losses."""
    from ctrace import abi
    from ctrace.recording import read

    rec = read(path)
    ev = rec.events
    new = ev[ev["kind"] == abi.Kind.NEW]
    lost = ev[ev["kind"] == abi.Kind.LOST]
    for r in runs:
        if r.get("recording") != os.path.basename(path):
            continue
        m = new["orig_dport_be"] == r["port"]
        w0, w1 = int(r["t_start"]), int(r["t_end"]) + int(SETTLE_S * 1e9)
        lw = lost[(lost["ts_boot_ns"] >= w0) & (lost["ts_boot_ns"] <= w1)]
        r["ctrace"] = {"delivered_new": int(m.sum()), "lost": int(lw["value"].sum())}
    r_all = rec.trailer or {}
    runs_meta = {"trailer_lost_bpf": r_all.get("lost_bpf"), "events": int(len(ev))}
    for r in runs:
        if r.get("recording") == os.path.basename(path):
            r["recording_meta"] = runs_meta


def summarize(runs: List[Dict[str, object]], meta: Dict[str, object]) -> str:
    by: Dict[str, List[float]] = {}
    for r in runs:
        by.setdefault(str(r["kind"]), []).append(float(r["rate"]))  # type: ignore[arg-type]
    lines = [f"kernel {meta['kernel']}, bcc {meta['bcc']}, {meta['cpus']} vCPU, {RUN_S:.0f} s per run",
             "", "run  kind       generated   rate/s   ctrace cpu s   conntrack -E NEW (lost)   ctrace NEW + lost"]
    for i, r in enumerate(runs):
        e = r.get("conntrack_E")
        c = r.get("ctrace")
        ecol = f"{e['new_lines']} ({int(r['generated']) - int(e['new_lines'])}{', ENOBUFS' if e['enobufs'] else ''})" if e else "-"
        ccol = f"{c['delivered_new']} + {c['lost']}" if c else "-"
        cpu = f"{r['ctrace_cpu_s']:.2f}" if "ctrace_cpu_s" in r else "-"
        lines.append(f"{i + 1:>3}  {r['kind']:<9}  {r['generated']:>9}  {r['rate']:>7}  {cpu:>13}   {ecol:<24}  {ccol}")
    lines.append("")
    for k, v in sorted(by.items()):
        lines.append(f"{k:<10} mean {statistics.mean(v):8.1f}/s  median {statistics.median(v):8.1f}/s  runs {len(v)}")
    off = statistics.mean(by["off"])
    for k, v in bracketed(runs).items():
        lines.append(f"ratio {k}/off: {statistics.mean(by[k]) / off:.3f} (means); per run against the off runs "
                     f"either side: median {statistics.median(v):.3f}, range {min(v):.3f}-{max(v):.3f}")
    return "\n".join(lines) + "\n"


def bracketed(runs: List[Dict[str, object]]) -> Dict[str, List[float]]:
    """Each attached run's rate over the mean of the nearest off runs before and after it
    (the host's load drifts; neighbours share it)."""
    out: Dict[str, List[float]] = {}
    offs = [i for i, r in enumerate(runs) if r["kind"] == "off"]
    for i, r in enumerate(runs):
        if r["kind"] == "off":
            continue
        near = [max((j for j in offs if j < i), default=None), min((j for j in offs if j > i), default=None)]
        rates = [float(runs[j]["rate"]) for j in near if j is not None]  # type: ignore[arg-type]
        out.setdefault(str(r["kind"]), []).append(float(r["rate"]) / statistics.mean(rates))  # type: ignore[arg-type]
    return out


def test_churn() -> None:
    from lab_toolkit import Topology, sysctls

    lab_out = os.environ.get("CTRACE_LAB_OUT", "/tmp")

    workdir = "/tmp/churn"
    os.makedirs(workdir, exist_ok=True)
    runs: List[Dict[str, object]] = []
    port = FIRST_PORT
    recordings: List[str] = []
    meta = {"kernel": os.uname().release, "cpus": os.cpu_count(), "run_s": RUN_S,
            "bcc": open(os.path.join(lab_out, "bcc-version")).read().strip()
            if os.path.exists(os.path.join(lab_out, "bcc-version")) else "?"}
    with sysctls({"net.netfilter.nf_conntrack_max": 262144}), Topology.create(prefix="churn") as topo:
        topo.client_ips(0, 4)

        def block(kinds: List[str], rec: Optional[Recorder]) -> None:
            nonlocal port
            for kind in kinds:
                runs.append(one_run(topo, kind, port, rec, workdir))
                print(runs[-1], flush=True)
                port += 1

        block(["off", "conntrack", "off"], None)
        for session in range(2):
            path = os.path.join(workdir, f"churn-{session}.ctr")
            rec = Recorder(path, os.path.join(lab_out, "churn-record.log"))
            meta[f"record_startup_s_{session}"] = round(rec.startup_s, 1)
            block(["ctrace", "both", "ctrace"], rec)
            rec.stop()
            recordings.append(path)
            block(["off", "conntrack", "off"] if session == 0 else ["off"], None)
    for path in recordings:
        ctrace_loss(path, runs)
    text = summarize(runs, meta)
    with open(os.path.join(lab_out, "churn.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    with open(os.path.join(lab_out, "churn.txt"), "w") as f:
        f.write(text)
    print(text)
    for r in runs:
        assert r["failed"] == 0, r
        if "ctrace" in r:
            c = r["ctrace"]
            assert c["delivered_new"] + c["lost"] == r["generated"], r  # type: ignore[index]

