"""The interactive top: a curses loop around a feed and the pure top view."""

import curses
import errno
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

from ctrace.feeds import Feed
from ctrace.model import Snapshot
from ctrace.views.top import ViewState, handle_key, render_screen

TICK_S = 0.1


class _HangUp(Exception):
    """The terminal went away (SIGHUP, or EIO from the tty): leave like q does."""


def _draw(scr: Any, lines: "list[str]", height: int, width: int) -> None:
    scr.erase()
    for y, line in enumerate(lines[:height]):
        attr = curses.A_REVERSE if line.startswith("!!") else (curses.A_BOLD if y and lines[y - 1] == "" else 0)
        try:
            scr.addnstr(y, 0, line, width - 1, attr)
        except curses.error:
            pass
    try:
        scr.refresh()
    except curses.error:  # the terminal may have just gone; the next tick's size check tells
        pass


def _sync_size(scr: Any) -> "tuple[int, int]":
    """The terminal's size now; tells curses when a resize slipped past its SIGWINCH handler."""
    try:
        cols, rows = os.get_terminal_size(sys.__stdout__.fileno())
    except OSError as exc:
        if exc.errno == errno.EIO:  # hung up, and the SIGHUP went to a shell that ignores it
            raise _HangUp from None
        return scr.getmaxyx()
    if (rows, cols) != scr.getmaxyx():
        curses.resizeterm(rows, cols)
    return rows, cols


def _hang_up(signum: int, frame: Any) -> None:
    raise _HangUp


def _restore(scr: Any) -> None:
    """Undo curses' terminal modes; a terminal that hung up refuses, and that is fine."""
    for undo in (lambda: scr.keypad(False), curses.echo, curses.nocbreak, curses.endwin):
        try:
            undo()
        except curses.error:
            pass


def _in_curses(loop: Callable[[Any], None]) -> None:
    """curses.wrapper, except that restoring a closed terminal is not an error and SIGHUP quits."""
    old = signal.signal(signal.SIGHUP, _hang_up)
    scr = curses.initscr()
    try:
        curses.noecho()
        curses.cbreak()
        scr.keypad(True)
        loop(scr)
    except _HangUp:
        pass
    finally:
        _restore(scr)
        signal.signal(signal.SIGHUP, old)


def run_interactive(feed: Feed, interval_s: float, state: Optional[ViewState] = None) -> None:
    """Until q or a hang-up: pump the feed every tick, a new snapshot every interval, keys as they come."""

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
    _in_curses(loop)
