"""TCP churn workers, each run as its own process inside a namespace (used by
bench/lab_churn.py and the probes' preemption test):

    python3 tcp_churn.py serve PORT SECONDS             accept and close; prints "ready", then
                                                        {"accepted": N}
    python3 tcp_churn.py client SRC... -- DST PORT SECONDS
                                                        connect as fast as it can, each socket
                                                        closed by an RST right after connect (no
                                                        TIME_WAIT, so source ports never run out);
                                                        prints {"connects", "failed", "seconds"}

Every completed connect is one conntrack entry where conntrack is on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Dict, List

PATH = os.path.abspath(__file__)


def serve(port: int, seconds: float) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    ls.settimeout(0.5)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        try:
            s, _ = ls.accept()
        except socket.timeout:
            continue
        s.close()
        n += 1
    print(json.dumps({"accepted": n}))


def client(srcs: List[str], dst: str, port: int, seconds: float) -> None:
    linger = struct.pack("ii", 1, 0)
    n = failed = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    i = 0
    while time.monotonic() < deadline:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        c.settimeout(5)
        c.bind((srcs[i % len(srcs)], 0))
        i += 1
        try:
            c.connect((dst, port))
            n += 1
        except OSError:
            failed += 1
        c.close()
    print(json.dumps({"connects": n, "failed": failed, "seconds": time.monotonic() - t0}))


def serve_argv(port: int, seconds: float) -> List[str]:
    return [sys.executable, PATH, "serve", str(port), str(seconds)]


def client_argv(srcs: List[str], dst: str, port: int, seconds: float) -> List[str]:
    return [sys.executable, PATH, "client", *srcs, "--", dst, str(port), str(seconds)]


def client_result(stdout: str) -> Dict[str, float]:
    return json.loads(stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1:2] == ["client"] and "--" in sys.argv:
        sep = sys.argv.index("--")
        client(sys.argv[2:sep], sys.argv[sep + 1], int(sys.argv[sep + 2]), float(sys.argv[sep + 3]))
    else:
        sys.exit("usage: tcp_churn.py serve PORT SECONDS | client SRC... -- DST PORT SECONDS")
