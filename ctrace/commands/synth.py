"""ctrace synth SCENARIO -o FILE: write a recording of a modelled scenario with known ground truth."""

from typing import Optional

import click

from ctrace.env import Environment
from ctrace.recording import RecordingWriter
from ctrace.sources import synthetic
from ctrace.status import ExitStatus


@click.command("synth")
@click.argument("scenario", type=click.Choice(sorted(synthetic.SCENARIOS)))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Recording to create (must not exist).")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed: same seed, same recording.")
@click.option("--events", type=click.IntRange(1000, 50_000_000), default=None, help="Scale the scenario to about N events.")
@click.pass_obj
def command(env: Environment, scenario: str, output: str, seed: int, events: Optional[int]) -> ExitStatus:
    """Write a synthetic recording. Its header says it is synthetic and carries the ground truth.

    \b
    Scenarios:
      lost-fin   web servers whose clients in one /24 and one /64 lose FIN/RST: orphans pile up
      syn-flood  a SYN flood from one /24 fills a small table: early drops, then refused inserts
      nat-churn  a NAT gateway for three pod netns at a steady state (UDP DNS, HTTPS, SNAT)

    \b
    Example:
      ctrace synth lost-fin -o lost-fin.ctr && ctrace report lost-fin.ctr
    """
    info, existing, events_arr = synthetic.generate(scenario, seed=seed, events=events)
    writer = RecordingWriter.create(output, info)
    try:
        writer.write_existing(existing)
        writer.write_events(events_arr)
    finally:
        writer.close(end_boot_ns=int(info.extra["end_boot_ns"]))
    env.error(f"wrote {output}: scenario {scenario}, {len(existing)} existing entries, {len(events_arr)} events (synthetic)")
    return ExitStatus.OK
