"""Options shared by the commands that build a model."""

from typing import Any, Callable

import click

from ctrace.keys import BY_CHOICES, KeySpace
from ctrace.model import ModelOptions
from ctrace.sources.base import DEFAULT_RING_PAGES
from ctrace.status import CtraceError, ExitStatus


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--by, --prefix4, --prefix6, --max-keys."""
    fn = click.option("--max-keys", type=click.IntRange(1, 10_000_000), default=65536, show_default=True,
                      help="Addresses (and prefixes) tracked before the least recent are evicted and counted as untracked.")(fn)
    fn = click.option("--prefix6", type=click.IntRange(0, 128), default=64, show_default=True, help="IPv6 prefix length for rollups.")(fn)
    fn = click.option("--prefix4", type=click.IntRange(0, 32), default=24, show_default=True, help="IPv4 prefix length for rollups.")(fn)
    fn = click.option("--by", type=click.Choice(BY_CHOICES), default="src", show_default=True,
                      help="Count entries under their original source, destination, or destination port.")(fn)
    return fn


def build_model_options(by: str, prefix4: int, prefix6: int, max_keys: int) -> ModelOptions:
    try:
        return ModelOptions(keys=KeySpace(by=by, prefix_v4=prefix4, prefix_v6=prefix6), max_keys=max_keys)
    except ValueError as exc:
        raise CtraceError(str(exc), ExitStatus.USAGE) from None


ATTACH_METHODS = ("auto", "kprobe", "fentry")  # ctrace.kernel.METHODS (kept import-light)


def attach_method_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--attach-method auto|kprobe|fentry (default: $CTRACE_ATTACH_METHOD, else auto)."""
    return click.option("--attach-method", "attach_method", type=click.Choice(ATTACH_METHODS), default=None,
                        help="How to attach the kernel function probes: fentry/fexit where BTF and the loader "
                             "allow, else kprobes (auto); kprobes only; or fentry/fexit or fail. "
                             "[default: $CTRACE_ATTACH_METHOD, else auto]")(fn)


def live_source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--ring-pages and --attach-method: how a command that traces the running kernel does it."""
    fn = attach_method_option(fn)
    return click.option("--ring-pages", type=click.IntRange(8, 1 << 20), default=DEFAULT_RING_PAGES, show_default=True,
                        help="BPF ring buffer size in pages (rounded up to a power of two): raise it when the "
                             "ring shows HIGH or events are lost to ringbuf_full.")(fn)
