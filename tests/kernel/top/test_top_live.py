"""`ctrace top` live on a real kernel, driven through tmux like a person would, while
traffic runs. One kernel of the matrix (one bcc compile is dear under emulation)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from lab_toolkit import Topology, close_fin, conntrack_list

SUITE = "bullseye"  # the quickest compile, and Debian 11's Python 3.9 stack
SESSION = "ctrace-top"

pytestmark = pytest.mark.skipif(os.environ.get("CTRACE_LAB_SUITE") != SUITE, reason=f"live top runs on {SUITE} only")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


ERR = os.path.join(os.environ.get("CTRACE_LAB_OUT", "/tmp"), "top.err")


def screen() -> str:
    r = subprocess.run(["tmux", "capture-pane", "-p", "-t", SESSION], stdout=subprocess.PIPE, text=True)
    if r.returncode:
        err = open(ERR).read() if os.path.exists(ERR) else ""
        raise AssertionError(f"ctrace top is gone; its stderr: {err[-2000:]}")
    return r.stdout


def wait_screen(pred, timeout: float, what: str) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        out = screen()
        if pred(out):
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{out}")
        time.sleep(0.5)


def row(out: str, label: str) -> list:
    """A table row's cells: label, NETNS, LIVE, NEW/s, GONE/s, ESTAB, T_WAIT, OTHER, ORPH, DROP, AGE."""
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == label:
            return parts
    return []


def test_top_live_follows_traffic_and_keys() -> None:
    assert shutil.which("tmux"), "tmux missing from the lab image"
    tree = os.environ.get("CTRACE_LAB_TREE", os.getcwd())
    cmd = f"cd {tree} && PYTHONPATH={tree} TERM=screen exec {sys.executable} -m ctrace top 1 --ring-pages 512 2>{ERR}"
    tmux("new-session", "-d", "-s", SESSION, "-x", "120", "-y", "40", cmd)
    try:
        wait_screen(lambda s: "ADDRESS" in s, 600, "the top screen (bcc compile)")
        # once the first counter records are folded (within about a second), the header's
        # probes line shows the ring's headroom (a 2 MiB ring, nearly idle)
        wait_screen(lambda s: re.search(r"^probes \S+  ring \d+%  filter ", s, re.M) is not None, 10,
                    "the ring's headroom in the header")
        with Topology.create(prefix="cttop") as topo:
            server = topo.tcp_server(port=9090)
            a, b = topo.client_v4[0], topo.client_v4[1]
            conns = topo.connect(a, 12, server) + topo.connect(b, 5, server)
            ino = os.stat(f"/run/netns/{topo.server_ns}").st_ino
            truth = {e.tuple[0]: 0 for e in conntrack_list(topo.server_ns)}
            for e in conntrack_list(topo.server_ns):
                truth[e.tuple[0]] += 1
            assert truth == {a: 12, b: 5}
            out = wait_screen(lambda s: row(s, a)[2:3] == ["12"] and row(s, b)[2:3] == ["5"], 20, "12 and 5 live entries")
            assert row(out, a)[5] == "12" and row(out, a)[1] == str(ino)  # ESTAB; NETNS on a wide terminal
            # group by prefix: both clients' /24s
            tmux("send-keys", "-t", SESSION, "g")
            out = wait_screen(lambda s: "PREFIX" in s, 10, "prefix grouping")
            pa = a.rsplit(".", 1)[0] + ".0/24"
            assert row(out, pa)[2:3] == ["12"], out
            tmux("send-keys", "-t", SESSION, "G")
            wait_screen(lambda s: "ADDRESS" in s, 10, "address grouping")
            # filter to the server's netns and the second client's address
            tmux("send-keys", "-t", SESSION, "f")
            tmux("send-keys", "-t", SESSION, f"netns={ino} addr={b}", "Enter")
            # the header names the filter once it applies (the prompt line shows it while it is typed)
            out = wait_screen(lambda s: f"filter netns={ino} addr~{b}" in s and row(s, b)[2:3] == ["5"], 10,
                              "the filter")
            assert not row(out, a), out
            # clean closes: the entries move to TIME_WAIT on screen
            close_fin(conns[12:])
            out = wait_screen(lambda s: row(s, b)[6:7] == ["5"], 20, "5 TIME_WAIT entries")
            tmux("send-keys", "-t", SESSION, "h")
            wait_screen(lambda s: "ctrace top -- keys" in s, 10, "help")
            tmux("send-keys", "-t", SESSION, "x", "q")
        deadline = time.monotonic() + 30
        while subprocess.run(["tmux", "has-session", "-t", SESSION], stderr=subprocess.DEVNULL).returncode == 0:
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], stderr=subprocess.DEVNULL)
