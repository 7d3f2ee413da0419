#!/usr/bin/env python3
"""Benchmark: the top view's cost with many distinct source addresses.

    python3 bench/top_frame.py [--ips 100000] [--flood 1000000]

1. A model holding --ips distinct addresses (each with a live entry): the time to take a
   snapshot and render one 80x24 frame (target: well under a 1 s refresh; goal < 100 ms).
2. A churn of --flood distinct addresses (each one entry, inserted and removed) through a
   model bounded at 65,536 tracked keys: peak RSS against the same churn over --ips
   addresses, and how many keys were evicted ("untracked"). Live entries themselves are
   bounded by nf_conntrack_max, not by ctrace.
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ctrace import abi  # noqa: E402
from ctrace.model import Model, ModelOptions  # noqa: E402
from ctrace.sources.base import SourceInfo  # noqa: E402
from ctrace.views.top import ViewState, render_screen  # noqa: E402

NS = 1_000_000_000
INFO = SourceInfo("bench", "bench", 0, 0, sysctls={"nf_conntrack_max": 4_000_000})


def events(n_ips: int, per_ip: int = 2, churn: bool = False, first: int = 0) -> np.ndarray:
    """per_ip records for each of n_ips distinct IPv4 sources (10.0.0.0/8 and up): NEW
    entries that stay, or with churn a NEW and a DESTROY (so the live table stays small)."""
    n = n_ips * per_ip
    ev = abi.empty(n)
    ev["kind"] = abi.Kind.NEW
    ev["ct_id"] = np.arange(1, n + 1)
    if churn:
        ev["kind"][1::2] = abi.Kind.DESTROY
        ev["ct_id"] = np.arange(n) // 2 + 1
        ev["reason"] = abi.DestroyReason.TIMEOUT
    ev["ts_boot_ns"] = np.sort(np.random.default_rng(first).integers(first * NS, (first + 60) * NS, n))
    ev["family"] = abi.AF_INET
    ev["l4proto"] = abi.IPPROTO_TCP
    ev["ct_state"] = abi.TcpState.ESTABLISHED
    ev["netns_ino"] = 4026531840
    ip = (0x0A000000 + first + (np.arange(n) // 2 if churn else np.arange(n) % n_ips)).astype(">u4")
    ev["orig_src"][:, :4] = ip.view(np.uint8).reshape(-1, 4)
    return ev


def fold(n_ips: int, max_keys: int, churn: bool = False) -> Model:
    m = Model(INFO, ModelOptions(max_keys=max_keys))
    step = 100_000  # addresses per batch: the input is made batch by batch, as a source would deliver it
    for lo in range(0, n_ips, step):
        m.apply(events(min(step, n_ips - lo), churn=churn, first=lo))
    return m


def frame_times(n_ips: int, repeat: int) -> list:
    m = fold(n_ips, max(65536, n_ips))
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        lines = render_screen(m.snapshot(), ViewState(), 80, 24)
        out.append(time.perf_counter() - t)
        assert len(lines) <= 24
    return out


def child_rss(n_ips: int) -> float:
    """Peak RSS (MiB) of a fresh process folding n_ips distinct addresses, bounded model."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import top_frame as t, resource;"
            f"m = t.fold({n_ips}, 65536, churn=True); s = m.snapshot();"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, s.untracked['keys_evicted'], len(s.ips))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ips", type=int, default=100_000)
    ap.add_argument("--flood", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    small = frame_times(1000, args.repeat)
    big = frame_times(args.ips, args.repeat)
    print(f"snapshot+frame: 1,000 addresses {median(small) * 1e3:.1f} ms; {args.ips:,} addresses {median(big) * 1e3:.1f} ms "
          f"(median of {args.repeat}); ratio {median(big) / median(small):.1f}x")
    rss_a, ev_a, kept_a = child_rss(args.ips)
    rss_b, ev_b, kept_b = child_rss(args.flood)
    print(f"bounded model (65,536 keys): {args.ips:,} addresses peak RSS {rss_a:.0f} MiB ({ev_a:,} evicted); "
          f"{args.flood:,} addresses peak RSS {rss_b:.0f} MiB ({ev_b:,} evicted, {kept_b:,} tracked); ratio {rss_b / rss_a:.2f}x")


if __name__ == "__main__":
    main()
