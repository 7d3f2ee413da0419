"""ctrace report FILE: what a recording shows, as text or as ctrace.report/1 JSON."""

import json
from typing import Optional

import click

from ctrace.commands.options import build_model_options, model_options
from ctrace.env import Environment
from ctrace.heap import keep_freed_memory
from ctrace.pipeline import damage_lines, damage_status, fold_file, warn_damage
from ctrace.status import ExitStatus
from ctrace.views import report


@click.command("report")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the ctrace.report/1 JSON document (see docs/REPORT.md).")
@click.option("--top", type=click.IntRange(1, None), default=None, help="Only the N largest addresses and prefixes [text: 20].")
@model_options
@click.pass_obj
def command(env: Environment, file: str, as_json: bool, top: Optional[int], by: str, prefix4: int, prefix6: int, max_keys: int) -> ExitStatus:
    """Summarise a recording: table fill, rates, removals by reason, who holds the table, orphans, drops.

    \b
    Example:
      ctrace report incident.ctr
      ctrace report --json --top 50 incident.ctr | jq .ips
    """
    keep_freed_memory()
    model, rec, end = fold_file(file, build_model_options(by, prefix4, prefix6, max_keys))
    warn_damage(env, rec)
    snap = model.snapshot(end)
    if as_json:
        env.stdout.write(json.dumps(report.to_json(snap, top, damage_lines(rec)), indent=1, sort_keys=False) + "\n")
    else:
        env.stdout.write(report.render_text(snap, top or 20, damage_lines(rec)))
    env.stdout.flush()
    return damage_status(rec)
