"""The interactive top: a curses loop around a feed and the pure top view."""

import curses
import os
import sys
import time
from typing import Any, Optional

from ctrace.feeds import Feed
from ctrace.model import Snapshot
from ctrace.views.top import ViewState, handle_key, render_screen

TICK_S = 0.1


def _draw(scr: Any, lines: "list[str]", height: int, width: int) -> None:
    scr.erase()
    for y, line in enumerate(lines[:height]):
        attr = curses.A_REVERSE if line.startswith("!!") else (curses.A_BOLD if y and lines[y - 1] == "" else 0)
        try:
            scr.addnstr(y, 0, line, width - 1, attr)
        except curses.error:
            pass
    scr.refresh()


def _sync_size(scr: Any) -> "tuple[int, int]":
    """The terminal's size now; tells curses when a resize slipped past its SIGWINCH handler."""
    try:
        cols, rows = os.get_terminal_size(sys.__stdout__.fileno())
    except OSError:
        return scr.getmaxyx()
    if (rows, cols) != scr.getmaxyx():
        curses.resizeterm(rows, cols)
    return rows, cols


def run_interactive(feed: Feed, interval_s: float, state: Optional[ViewState] = None) -> None:
    """Until q: pump the feed every tick, a new snapshot every interval, keys as they come."""

    def loop(scr: Any) -> None:
        nonlocal state
        state = state or ViewState()
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        scr.timeout(int(TICK_S * 1000))
        last = time.monotonic()
        next_frame = last
        snap: Optional[Snapshot] = None
        while True:
            now = time.monotonic()
            if not (state.paused and feed.can_seek):
                feed.pump(now - last)
            last = now
            if snap is None or (now >= next_frame and not state.paused):
                snap = feed.snapshot()
                next_frame = now + interval_s
                if feed.exhausted and not state.message:
                    state = ViewState(**{**state.__dict__, "message": "end of recording -- q quits, [ seeks back"})
            height, width = _sync_size(scr)
            _draw(scr, render_screen(snap, state, width, height), height, width)
            try:
                key = scr.getkey()
            except curses.error:
                continue
            if key == "KEY_RESIZE":
                continue
            state, action = handle_key(state, key)
            if action == "quit":
                return
            if action == "refilter":
                feed.refilter(state.filter)
            elif action and action.startswith("seek:"):
                feed.seek(float(action[5:]))
            elif action == "step":
                feed.step(interval_s)
            if action:
                snap = feed.snapshot()

    curses.use_env(False)  # the terminal's real size, not stale LINES/COLUMNS
    curses.wrapper(loop)
