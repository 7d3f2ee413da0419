"""How often the kernel skipped one of our BPF programs: its `recursion_misses`.

The kernel does not run a tracing program that would nest inside another on
the same CPU: kprobe programs share one per-CPU guard (also held during BPF map
syscalls), fentry/fexit and raw tracepoint programs guard each program. Every
skipped run may lose one record. The kernel counts skips per program and shows
the count in the program fd's fdinfo (`recursion_misses:`): for fentry/fexit
since 5.12, for kprobes and raw tracepoints since 6.7 (before, their skips are
not counted anywhere).
"""

from typing import Optional


def parse_recursion_misses(fdinfo: str) -> Optional[int]:
    """The `recursion_misses` count in a BPF program's fdinfo text; None when the kernel has none."""
    for line in fdinfo.splitlines():
        key, _, value = line.partition(":")
        if key == "recursion_misses":
            return int(value)
    return None


def recursion_misses(prog_fd: int) -> Optional[int]:
    """Runs of the program behind `prog_fd` (ours) the kernel skipped; None when it does not say."""
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        return parse_recursion_misses(f.read())
