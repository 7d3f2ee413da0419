"""ctrace replay FILE: the top view over a recording, at recorded pace, faster, or stepped."""

from typing import Optional

import click

from ctrace.commands.frames import show
from ctrace.commands.options import build_model_options, model_options
from ctrace.env import Environment
from ctrace.feeds import ReplayFeed
from ctrace.pipeline import damage_status, open_recording, warn_damage
from ctrace.status import ExitStatus
from ctrace.views.top import GROUPS, ViewState


@click.command("replay")
@click.argument("file")
@click.option("--speed", type=click.FloatRange(0.001, None), default=1.0, show_default=True, help="Replay N times faster than recorded.")
@click.option("--fast", is_flag=True, help="Frames as fast as they are computed (not on a terminal: implied by --json).")
@click.option("--step", "stepped", is_flag=True, help="Start paused; n steps one interval (terminal).")
@click.option("--start", type=click.FloatRange(0, None), default=0.0, help="Seek to S seconds after the recording began.")
@click.option("--interval", type=click.FloatRange(0.01, None), default=1.0, show_default=True, help="Recorded seconds per frame.")
@click.option("--count", type=click.IntRange(1, None), default=None, help="Stop after N frames.")
@click.option("--rows", type=click.IntRange(1, None), default=20, show_default=True, help="Rows per frame.")
@click.option("--group", type=click.Choice(GROUPS), default="ip", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per frame (report keys plus `window`).")
@click.option("--plain", is_flag=True, help="Text frames even on a terminal.")
@model_options
@click.pass_obj
def command(env: Environment, file: str, speed: float, fast: bool, stepped: bool, start: float, interval: float,
            count: Optional[int], rows: int, group: str, as_json: bool, plain: bool,
            by: str, prefix4: int, prefix6: int, max_keys: int) -> ExitStatus:
    """Replay a recording through the same model and view as `ctrace top`.

    On a terminal this is the interactive view (h for keys; [ and ] seek a minute);
    otherwise it prints one frame per --interval of recorded time.

    \b
    Example:
      ctrace replay --speed 10 incident.ctr
      ctrace replay --fast --interval 60 incident.ctr | less
      ctrace replay --json --interval 10 incident.ctr | jq .table.end_count
    """
    rec = open_recording(file)
    warn_damage(env, rec)
    feed = ReplayFeed(rec, build_model_options(by, prefix4, prefix6, max_keys), speed=speed, start_s=start)
    pace = None if (fast or as_json) else interval / speed
    show(env, feed, interval, count, as_json, plain, rows, group, pace, state=ViewState(group=group, paused=stepped))
    return damage_status(rec)
