"""ctrace replay FILE: show what the live tool would have shown, frame by frame."""

import time

import click

from ctrace.commands.options import build_model_options, model_options
from ctrace.env import Environment
from ctrace.model import Model
from ctrace.pipeline import damage_status, open_recording, warn_damage
from ctrace.sources.replay import ReplaySource
from ctrace.status import ExitStatus
from ctrace.views.top import GROUPS, render_frame


@click.command("replay")
@click.argument("file")
@click.option("--speed", type=click.FloatRange(0.001, None), default=1.0, show_default=True, help="Replay N times faster than recorded.")
@click.option("--fast", is_flag=True, help="No waiting between frames.")
@click.option("--interval", type=click.FloatRange(0.01, None), default=1.0, show_default=True, help="Recorded seconds per frame.")
@click.option("--rows", type=click.IntRange(1, None), default=20, show_default=True, help="Rows per frame.")
@click.option("--group", type=click.Choice(GROUPS), default="ip", show_default=True)
@model_options
@click.pass_obj
def command(env: Environment, file: str, speed: float, fast: bool, interval: float, rows: int, group: str,
            by: str, prefix4: int, prefix6: int, max_keys: int) -> ExitStatus:
    """Replay a recording through the same model and view as `ctrace top`, as text frames.

    \b
    Example:
      ctrace replay --speed 10 incident.ctr
      ctrace replay --fast --interval 60 incident.ctr | less
    """
    rec = open_recording(file)
    warn_damage(env, rec)
    src = ReplaySource(rec)
    model = Model(src.info, build_model_options(by, prefix4, prefix6, max_keys))
    model.seed(src.existing())
    for end, batch in src.windows(int(interval * 1e9)):
        model.apply(batch)
        env.stdout.write(render_frame(model.snapshot(end), limit=rows, group=group) + "\n")
        env.stdout.flush()
        if not fast:
            time.sleep(interval / speed)
    return damage_status(rec)
