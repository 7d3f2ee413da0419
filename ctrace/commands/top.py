"""ctrace top [INTERVAL [COUNT]]: the live incident view."""

import signal
from typing import Any, Optional

import click

from ctrace.commands.frames import show
from ctrace.commands.options import build_model_options, live_source_options, model_options
from ctrace.env import Environment
from ctrace.feeds import Feed, LiveFeed, ReplayFeed
from ctrace.pipeline import damage_status, open_recording, warn_damage
from ctrace.status import ExitStatus
from ctrace.views.top import GROUPS, ViewState


@click.command("top")
@click.argument("interval", type=click.FloatRange(0.1, None), default=1.0, required=False)
@click.argument("count", type=click.IntRange(1, None), default=None, required=False)
@click.option("--once", is_flag=True, help="Print one frame after INTERVAL and exit.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per frame (report keys plus `window`).")
@click.option("--plain", is_flag=True, help="Text frames even on a terminal.")
@click.option("-C", "--noclear", is_flag=True, help="Text frames: don't clear the screen between them.")
@click.option("--rows", type=click.IntRange(1, None), default=20, show_default=True, help="Rows per text frame.")
@click.option("--group", type=click.Choice(GROUPS), default="ip", show_default=True)
@click.option("--replay", "replay_file", default=None, help="Drive the view from a recording instead of the kernel.")
@click.option("-v", "--verbose", is_flag=True, help="Print compiler and verifier logs in full on failure.")
@model_options
@live_source_options
@click.pass_obj
def command(env: Environment, interval: float, count: Optional[int], once: bool, as_json: bool, plain: bool,
            noclear: bool, rows: int, group: str, replay_file: Optional[str], verbose: bool,
            by: str, prefix4: int, prefix6: int, max_keys: int, ring_pages: int, attach_method: Optional[str]) -> ExitStatus:
    """Who fills the conntrack table, live: entries vs max, new vs gone per second,
    time to full, per address / prefix / netns, orphans and drops.

    On a terminal: full screen (h for keys). Otherwise, or with COUNT, --once or
    --json: one frame per INTERVAL seconds.

    \b
    Example:
      sudo ctrace top
      sudo ctrace top 5 12 --plain        # twelve frames, five seconds apart
      sudo ctrace top --once --json | jq .table
      ctrace top --replay incident.ctr    # the same view over a recording
    """
    opts = build_model_options(by, prefix4, prefix6, max_keys)
    if once:
        count = 1
    feed: Feed
    if replay_file:
        rec = open_recording(replay_file)
        warn_damage(env, rec)
        feed = ReplayFeed(rec, opts)
        show(env, feed, interval, count, as_json, plain, rows, group, pace=interval, noclear=noclear,
             state=ViewState(group=group))
        return damage_status(rec)
    from ctrace.sources.live import LiveSource

    src = LiveSource(interval=0.1, ring_pages=ring_pages, verbose=verbose, log=env.stderr, method=attach_method)
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        env.error(f"tracing: {sum(1 for p in src.plan.probes if p.attached)} probes attached; "
                  f"{len(src.existing())} existing entries")
        show(env, LiveFeed(src, opts), interval, count, as_json, plain, rows, group, pace=None, noclear=noclear,
             state=ViewState(group=group))
    except KeyboardInterrupt:
        pass
    finally:
        lost = sum(src.lost_counts().values())
        src.close()
        for s, h in old.items():
            signal.signal(s, h)
        if lost:
            env.error(f"{lost} events were lost while tracing (shown in the view's banner)")
    return ExitStatus.OK


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
