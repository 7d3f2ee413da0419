"""ctrace export: a Prometheus exporter fed by the live kernel or by a recording."""

import os
import signal
import threading
import time
from typing import Any, List, Optional

import click

from ctrace.commands.options import build_model_options, live_source_options, model_options
from ctrace.env import Environment
from ctrace.exporter import DEFAULT_PORT, OUTCOMES, MetricsServer, Publisher, is_loopback, parse_listen
from ctrace.feeds import Feed, LiveFeed, ReplayFeed
from ctrace.pipeline import damage_status, open_recording, warn_damage
from ctrace.status import CtraceError, ExitStatus
from ctrace.views.export import Family, NetnsSelection, families, netns_ids, series_bound, skipped_runs_family

NS = 1_000_000_000
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _speed(text: str) -> Optional[float]:
    """'fast' -> None (fold everything at once), else a positive factor."""
    if text == "fast":
        return None
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if v <= 0:
        raise CtraceError(f"--replay-speed {text!r}: expected a positive number or 'fast'", ExitStatus.USAGE)
    return v


def _write_ready(path: str, url: str) -> None:
    """The URL, written to a fresh temporary file renamed into place (never through a symlink)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    os.replace(tmp, path)


@click.command("export")
@click.option("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", show_default=True,
              help="ADDR:PORT to serve /metrics on. Anything but loopback must be asked for here.")
@click.option("--top", "top_k", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Addresses and prefixes with their own series (by live entries); the rest are summed into `other`.")
@click.option("--max-netns", type=click.IntRange(1, 100_000), default=128, show_default=True,
              help="Network namespaces with their own series; the rest are summed into `other`.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between snapshots published to scrapers.")
@click.option("--replay", "replay_file", default=None, help="Serve a recording instead of the kernel (demos, tests).")
@click.option("--replay-speed", default="1", show_default=True,
              help="Recorded seconds per second, or 'fast': fold the whole recording, then serve its final state.")
@click.option("--duration", type=click.FloatRange(0.1, None), default=None, help="Stop after S seconds [until a signal].")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics URL to PATH once the first snapshot is served.")
@click.option("-v", "--verbose", is_flag=True, help="Print compiler and verifier logs in full on failure.")
@model_options
@live_source_options
@click.pass_obj
def command(env: Environment, listen: str, top_k: int, max_netns: int, interval: float, replay_file: Optional[str],
            replay_speed: str, duration: Optional[float], ready_file: Optional[str], verbose: bool,
            by: str, prefix4: int, prefix6: int, max_keys: int, ring_pages: int, attach_method: Optional[str]) -> ExitStatus:
    """Serve conntrack metrics to Prometheus: global and per-netns counters, rates and
    time to full, and the top K source addresses and prefixes (series count bounded:
    see docs/EXPORT.md).

    \b
    Example:
      sudo ctrace export                          # http://127.0.0.1:9737/metrics
      sudo ctrace export --listen 10.0.0.5:9737 --top 50
      ctrace export --replay incident.ctr --replay-speed fast
    """
    if by == "dport":
        raise CtraceError("export counts addresses: --by src or --by dst", ExitStatus.USAGE)
    host, port = parse_listen(listen)
    speed = _speed(replay_speed)
    opts = build_model_options(by, prefix4, prefix6, max_keys)
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise CtraceError("prometheus_client is not installed: install python3-prometheus-client",
                          ExitStatus.ERROR) from None

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    src: Any = None
    rec = None
    feed: Feed
    if replay_file:
        rec = open_recording(replay_file)
        warn_damage(env, rec)
        feed = ReplayFeed(rec, opts, speed=speed or 1.0)
        if speed is None:
            feed.step((feed.end - feed.start) / NS + 1)
    else:
        from ctrace.sources.live import LiveSource

        src = LiveSource(interval=0.1, ring_pages=ring_pages, verbose=verbose, log=env.stderr, method=attach_method)
        feed = LiveFeed(src, opts)
    server: Optional[MetricsServer] = None
    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        server = MetricsServer(host, port)
        selection = NetnsSelection(max_netns)
        window = not (replay_file and speed is None)

        def make() -> List[Family]:
            snap = feed.snapshot()
            fams = families(snap, top_k, selection.update(*netns_ids(snap)), window=window)
            if src is not None:
                fams.append(skipped_runs_family(src.streamed_losses()[1]))
            return fams

        pub = Publisher(server, make)
        pub.refresh()
        server.start()
        if not is_loopback(server.address[0]):
            env.warn(f"serving on {server.address[0]}, not loopback: anyone who can reach it can read the metrics")
        # at most: the snapshot's families, the server's own counts, one skip count per program
        bound = series_bound(top_k, max_netns) + len(OUTCOMES) + (len(src.streamed_losses()[1]) if src is not None else 0)
        what = f"recording {replay_file}" if replay_file else \
            f"{sum(1 for p in src.plan.probes if p.attached)} probes attached"
        env.error(f"serving {server.url} ({what}; at most {bound} series)")
        if ready_file:
            _write_ready(ready_file, server.url)
        started = last_pub = last_pump = time.monotonic()
        fast = bool(replay_file) and speed is None
        while not stop.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            stop.wait(min(interval, 0.2))
            now = time.monotonic()
            if not fast:
                feed.pump(now - last_pump)  # live: drain the ring buffer; replay: advance recorded time
                last_pump = now
            if now - last_pub >= interval:
                pub.refresh(resnapshot=not fast)  # fast replay: the final state; only the server's counts move
                last_pub = now
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.close()
        if src is not None:
            try:
                lost = sum(src.lost_counts().values())
            except Exception:
                lost = 0
            src.close()
            if lost:
                env.error(f"{lost} events were lost while tracing (ctrace_events_lost_total)")
        for s, h in old.items():
            signal.signal(s, h)
    return damage_status(rec) if rec is not None else ExitStatus.OK
