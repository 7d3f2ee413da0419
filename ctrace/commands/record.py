"""ctrace record -o FILE: trace the running kernel into a recording."""

import os
import signal
import time
from typing import Any, Dict, Optional

import click

from ctrace import abi
from ctrace.env import Environment
from ctrace.commands.options import live_source_options
from ctrace.status import CtraceError, ExitStatus

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _touch(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)


@click.command("record")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Recording to create (must not exist).")
@click.option("--duration", type=click.FloatRange(0.1, None), default=None, help="Stop after S seconds [until a signal].")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Touch PATH once every probe is attached and recording has begun.")
@click.option("--interval", type=click.FloatRange(0.05, 5.0), default=0.2, show_default=True,
              help="Seconds between drains of the event buffer.")
@click.option("-v", "--verbose", is_flag=True, help="Print compiler and verifier logs in full on failure.")
@live_source_options
@click.pass_obj
def command(env: Environment, output: str, duration: Optional[float], ready_file: Optional[str],
            interval: float, ring_pages: int, verbose: bool, attach_method: Optional[str]) -> ExitStatus:
    """Record conntrack events from the running kernel until SIGINT/SIGTERM/SIGHUP or --duration.

    The recording starts with the entries that already exist, then every
    insert, removal (with its reason), TCP state change, refused entry and
    orphan, with lost events counted in-band.

    \b
    Example:
      sudo ctrace record -o incident.ctr --duration 60
      sudo ctrace record -o incident.ctr --ready-file /run/ctrace.ready &
    """
    from ctrace.recording import RecordingWriter  # the lead's format
    from ctrace.sources.live import LiveSource, boot_ns

    if os.path.lexists(output):
        what = "a symbolic link" if os.path.islink(output) else "an existing file"
        raise CtraceError(f"{output} is {what}: refusing to overwrite it", ExitStatus.CANNOT_WRITE)  # before the compile

    stop_reason: Dict[str, Any] = {}
    src: Optional[LiveSource] = None

    def on_signal(signum: int, frame: Any) -> None:
        stop_reason.setdefault("signal", signal.Signals(signum).name)
        if src is not None:
            src.stop()

    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    writer = None
    try:
        src = LiveSource(interval=interval, ring_pages=ring_pages, verbose=verbose, log=env.stderr,
                         method=attach_method)
        if stop_reason:
            return ExitStatus.OK
        writer = RecordingWriter.create(output, src.info)
        writer.write_existing(src.existing())
        attached = sum(1 for p in src.plan.probes if p.attached)
        env.error(f"recording to {output}: {attached} probes attached, {len(src.existing())} existing entries; "
                  f"stop with Ctrl-C")
        if ready_file:
            _touch(ready_file)
        deadline = time.monotonic() + duration if duration else None
        for batch in src.batches():
            writer.write_events(batch)
            if deadline is not None and time.monotonic() >= deadline:
                stop_reason.setdefault("duration", duration)
                src.stop()
        lost, skips = src.streamed_losses()
        produced = src.produced_counts()
        trailer = {
            "stopped_by": stop_reason or {"end": "source ended"},
            "lost_bpf": {abi.LostCause(c).name.lower(): v for c, v in lost.items()},
            "produced": {abi.Kind(k).name.lower(): v for k, v in produced.items() if v},
            "skipped_runs": skips,
        }
        writer.close(end_boot_ns=boot_ns(), extra=trailer)
        total_lost = sum(lost.values())
        env.error(f"wrote {output}: {writer.events_written} events, "
                  + (f"{total_lost} lost ({', '.join(f'{k} {v}' for k, v in trailer['lost_bpf'].items() if v)})"
                     if total_lost else "none lost"))
        return ExitStatus.OK
    finally:
        if writer is not None:
            writer.close(end_boot_ns=boot_ns(), extra={"stopped_by": stop_reason or {"error": True}})
        if src is not None:
            src.close()
        for s, h in old.items():
            signal.signal(s, h)
