"""How top and replay show a feed: full screen on a terminal, else frames (text or JSON)."""

import json
import time
from typing import Any, Dict, Optional

from ctrace.env import Environment
from ctrace.feeds import Feed
from ctrace.model import Snapshot
from ctrace.views import report
from ctrace.views.top import ViewState, render_frame

TICK_S = 0.1


def frame_json(s: Snapshot, rows: int) -> Dict[str, Any]:
    """One frame: the report's keys, plus the sliding-window rates the screen shows."""
    out = report.to_json(s, rows)
    ins, exp = s.rates(window=True)
    ttf = s.time_to_full_s(window=True)
    out["window"] = {"seconds": s.window_s, "insert_rate_per_s": round(ins, 3), "expire_rate_per_s": round(exp, 3),
                     "net_growth_per_s": round(ins - exp, 3), "time_to_full_s": None if ttf is None else round(ttf, 1)}
    return out


def show(env: Environment, feed: Feed, interval: float, count: Optional[int], as_json: bool, plain: bool,
         rows: int, group: str, pace: Optional[float], noclear: bool = True, state: Optional[ViewState] = None) -> None:
    """Interactive when stdout is a terminal and nothing asked for frames; frames otherwise.
    A frame covers `interval` seconds of (recorded) time; replays wait `pace` wall seconds
    per frame (None: no waiting), live feeds take in events for `interval` seconds."""
    if env.stdout_isatty and not (plain or as_json or count):
        from ctrace.terminal import run_interactive  # curses only when needed

        run_interactive(feed, interval, state or ViewState(group=group))
        return
    n = 0
    while count is None or n < count:
        if feed.can_seek:
            if pace:
                time.sleep(pace)
            feed.step(interval)
        else:
            deadline = time.monotonic() + interval
            while True:
                feed.pump(TICK_S)
                now = time.monotonic()
                if now >= deadline:
                    break
                time.sleep(min(TICK_S, deadline - now))
        snap = feed.snapshot()
        if as_json:
            env.stdout.write(json.dumps(frame_json(snap, rows)) + "\n")
        else:
            if not noclear and env.stdout_isatty:
                env.stdout.write("\x1b[H\x1b[2J")
            env.stdout.write(render_frame(snap, limit=rows, group=group) + "\n")
        env.stdout.flush()
        n += 1
        if feed.exhausted:
            break
