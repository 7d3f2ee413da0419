#!/usr/bin/env python3
"""Benchmark: `ctrace report`'s vectorised pipeline against a straightforward per-event
Python loop over the same recording, measured side by side (A, B, A, B, ...) in one run.

    python3 bench/report_throughput.py [--events 10000000] [--pairs 3] [--file F]

The recording is a synthetic NAT-churn scenario tiled in time until it holds --events
records (kept in a temporary directory unless --file names one to reuse).
"""

import argparse
import os
import struct
import sys
import tempfile
import time
from collections import defaultdict
from statistics import median
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ctrace import abi, crc, recording  # noqa: E402
from ctrace.heap import keep_freed_memory  # noqa: E402
from ctrace.model import ModelOptions, _R, REMOVAL_REASONS  # noqa: E402
from ctrace.pipeline import fold_file  # noqa: E402
from ctrace.sources import synthetic  # noqa: E402
from ctrace.views import report  # noqa: E402


def build(path: str, events: int) -> int:
    info, existing, base = synthetic.generate("nat-churn", seed=1, events=250_000)
    span = int(info.extra["end_boot_ns"]) - info.start_boot_ns
    w = recording.RecordingWriter.create(path, info)
    w.write_existing(existing)
    total, k = 0, 0
    while total < events:
        tile = base.copy()
        tile["ts_boot_ns"] += np.uint64(k * span)
        tile["ct_id"] += np.uint64(k << 40)
        w.write_events(tile)
        total += len(tile)
        k += 1
    w.close(end_boot_ns=info.start_boot_ns + k * span)
    return total + len(existing)


def vectorised(path: str) -> Dict[str, Any]:
    """What `ctrace report --json` does."""
    model, _, end = fold_file(path, ModelOptions())
    return report.to_json(model.snapshot(end))


def per_event_loop(path: str) -> Dict[str, Any]:
    """What one would write first: walk the chunks, take each record's fields, update dicts."""
    data = open(path, "rb").read()
    _, _, _, hlen = recording.PREAMBLE.unpack_from(data, 0)
    pos = recording.PREAMBLE.size + hlen + 4
    off = abi.FIELD_OFFSETS
    live: Dict[int, tuple] = {}
    created: Dict[tuple, int] = defaultdict(int)
    destroyed: Dict[tuple, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    orphans: Dict[tuple, int] = defaultdict(int)
    T = abi.TcpState
    total = 0
    while pos < len(data):
        ctype, plen, pcrc, _ = recording.CHUNK_HEAD.unpack_from(data, pos)
        start = pos + recording.CHUNK_HEAD.size
        payload = memoryview(data)[start : start + plen]
        pos = start + plen
        if crc.crc32(payload) != pcrc or ctype not in (recording.T_EVENTS, recording.T_EXISTING):
            continue
        n = plen // abi.EVENT_SIZE  # format 2: each field's n values in turn

        def field(name: str, fmt: str, size: int) -> memoryview:
            return payload[n * off[name] : n * (off[name] + size)].cast(fmt)

        ct_ids, netnss, statuses = field("ct_id", "Q", 8), field("netns_ino", "I", 4), field("status_raw", "I", 4)
        kinds, families, protos, states, reasons = (field(f, "B", 1) for f in ("kind", "family", "l4proto", "ct_state", "reason"))
        srcs = off["orig_src"] * n
        for i in range(n):
            total += 1
            ct_id, netns, status = ct_ids[i], netnss[i], statuses[i]
            kind, family, proto, state = kinds[i], families[i], protos[i], states[i]
            src = bytes(payload[srcs + 16 * i : srcs + 16 * i + (4 if family == abi.AF_INET else 16)])
            key = (netns, src)
            if kind in (abi.Kind.NEW, abi.Kind.EXISTING, abi.Kind.STATE):
                live[ct_id] = (key, proto, state, status)
                if kind == abi.Kind.NEW:
                    created[key] += 1
            elif kind == abi.Kind.ORPHAN:
                orphans[key] += 1
            elif kind == abi.Kind.DESTROY:
                live.pop(ct_id, None)
                mech = reasons[i]
                if mech == abi.DestroyReason.TIMEOUT and proto == abi.IPPROTO_TCP:
                    reason = {T.TIME_WAIT: "fin", T.CLOSE: "rst", T.ESTABLISHED: "timeout-established"}.get(state, "timeout-closing")
                elif mech == abi.DestroyReason.TIMEOUT:
                    reason = "timeout"
                else:
                    reason = REMOVAL_REASONS[_R.get({2: "early-drop", 3: "delete", 4: "netns"}.get(mech, "unknown"), 10)]
                destroyed[key][reason] += 1
    per_ip: Dict[tuple, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, proto, state, status in live.values():
        per_ip[key]["live"] += 1
    return {"events": total, "live": len(live), "keys": len(per_ip), "created": sum(created.values())}


def main() -> None:
    keep_freed_memory()  # as `ctrace report` does before folding (both sides run under it)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--file", default=None, help="reuse (or create) this recording")
    ap.add_argument("--only", choices=("vectorised", "loop"), default=None,
                    help="run one side once on --file (for timing whole processes from outside)")
    ap.add_argument("--crc", choices=("auto", "zlib"), default="auto",
                    help="zlib: check CRCs with zlib even where libdeflate is installed (both sides)")
    args = ap.parse_args()
    if args.crc == "zlib":
        crc.use_zlib()
    if args.only:
        out = (vectorised if args.only == "vectorised" else per_event_loop)(args.file)
        print(args.only, out["events"]["total"] if isinstance(out.get("events"), dict) else out["events"])
        return
    if args.file:
        run(args, args.file)
        return
    with tempfile.TemporaryDirectory(prefix="ctrace-bench-") as tmp:
        run(args, os.path.join(tmp, "bench.ctr"))


def run(args: argparse.Namespace, path: str) -> None:
    if not os.path.exists(path):
        t = time.perf_counter()
        n = build(path, args.events)
        print(f"built {path}: {n} records, {os.path.getsize(path) / 1e6:.0f} MB in {time.perf_counter() - t:.0f} s")
    reader = recording.open_reader(path)
    n = len(reader.existing()) + sum(len(b) for b in reader.batches())
    reader.close()
    print(f"CRC-32 by {crc.implementation()}")
    a_rates, b_rates, ratios = [], [], []
    for i in range(args.pairs):
        t = time.perf_counter()
        out_a = vectorised(path)
        ta = time.perf_counter() - t
        t = time.perf_counter()
        out_b = per_event_loop(path)
        tb = time.perf_counter() - t
        assert out_a["events"]["total"] == out_b["events"] == n
        assert out_a["table"]["end_count"] == out_b["live"], (out_a["table"]["end_count"], out_b["live"])
        a_rates.append(n / ta)
        b_rates.append(n / tb)
        ratios.append(tb / ta)
        print(f"pair {i + 1}: vectorised {ta:6.2f} s ({n / ta / 1e6:5.2f} M events/s)   per-event loop {tb:6.2f} s ({n / tb / 1e6:5.2f} M events/s)   ratio {tb / ta:5.1f}x")
    print(f"median over {args.pairs} pairs, {n} events: vectorised {median(a_rates) / 1e6:.2f} M events/s, "
          f"per-event loop {median(b_rates) / 1e6:.2f} M events/s, ratio {median(ratios):.1f}x")


if __name__ == "__main__":
    main()
