"""`ctrace doctor`: run the usual conntrack-table-full checks and explain the findings."""

import json
from typing import Optional

import click

from ctrace.env import Environment
from ctrace.status import ExitStatus

_EXIT = {
    "ok": ExitStatus.OK,
    "warning": ExitStatus.DOCTOR_WARNING,
    "critical": ExitStatus.DOCTOR_CRITICAL,
    "incomplete": ExitStatus.DOCTOR_INCOMPLETE,
}


@click.command("doctor")
@click.option("--root", "root", metavar="DIR|BUNDLE", default=None,
              help="Analyse a tree laid out like / (DIR/proc/...) or a bundle from --collect, not this machine.")
@click.option("--collect", "collect_to", metavar="FILE", default=None,
              help="Save this machine's inputs to FILE (tar.gz, mode 0600) to analyse elsewhere. Refuses an existing FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema ctrace.doctor/1, see docs/DOCTOR.md).")
@click.option("--interval", default=0.0, show_default=True, type=click.FloatRange(0, 3600), metavar="SECONDS",
              help="Read the kernel's counters twice, SECONDS apart, to tell whether drops still happen (live and --collect).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 1000), help="Rows per table.")
@click.pass_obj
def command(env: Optional[Environment], root: Optional[str], collect_to: Optional[str], as_json: bool,
            interval: float, top: int) -> int:
    """Find out why the conntrack table fills up, and what to do about it.

    Checks count vs max, hash size, every TCP/UDP timeout, the kernel's conntrack
    statistics, the table itself (per address, per /24, per state) next to the local
    sockets (lost FIN/RST), and which firewall rules need conntrack at all. No BPF;
    without root, what could not be read is listed.

    \b
    Examples:
      ctrace doctor                        # this machine (root sees the most)
      ctrace doctor --json                 # schema ctrace.doctor/1
      ctrace doctor --interval 30          # are drops still happening?
      ctrace doctor --collect host1.tgz    # save the inputs here ...
      ctrace doctor --root host1.tgz       # ... and analyse them anywhere

    Exit status: 0 no findings (info only), 20 warnings, 21 critical,
    22 nothing could be judged (the count/max sysctls were not readable).
    """
    from ctrace.doctor.analyze import analyze
    from ctrace.doctor.inputs import open_root
    from ctrace.doctor.render import render_json, render_text
    from ctrace.doctor.snapshot import load

    env = env if isinstance(env, Environment) else Environment()
    if collect_to is not None:
        if root is not None:
            raise click.UsageError("--collect saves this machine's inputs; it cannot be combined with --root")
        return _collect(env, collect_to, as_json, interval)
    if interval and root is not None:
        raise click.UsageError("--interval reads this machine twice; a saved tree has what it has")
    inp = open_root(root, interval=interval)
    try:
        snap = load(inp)
    finally:
        inp.close()
    report = analyze(snap, top=top)
    status = _EXIT[report.status]
    env.stdout.write(render_json(report, int(status)) if as_json else render_text(report, int(status)))
    env.stdout.flush()
    return int(status)


def _collect(env: Environment, path: str, as_json: bool, interval: float) -> int:
    from ctrace.doctor.collect import collect

    _snap, written, missing = collect(path, interval=interval)
    if as_json:
        doc = {"bundle": path, "files": written, "missing": [{"input": k, "reason": v} for k, v in sorted(missing.items())]}
        env.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        env.stdout.write(f"wrote {path}: {len(written)} inputs\n")
        for k, v in sorted(missing.items()):
            env.stdout.write(f"  not read: {k}: {v}\n")
        env.stdout.write(f"analyse it with: ctrace doctor --root {path}\n")
    env.stdout.flush()
    return int(ExitStatus.OK)
