"""Keep freed memory in the process heap (glibc) while folding a recording.

A batch fold makes many short-lived arrays of 4-70 MB. By default glibc maps each one
fresh and returns it when freed, so the kernel hands out (and zeroes) new pages for every
batch: folding 10 M events took about 78,000 page faults, 32,000 with this, and about a
tenth less time (docs/PERFORMANCE.md). The cost: up to 512 MiB of freed memory stays
with the process until it exits, which suits a command that folds a file and ends.
"""

from ctrace import libc

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations up to 256 MiB from the heap and to keep up to 512 MiB
    of freed memory. True if it agreed; with another C library nothing changes."""
    mallopt = libc.function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 512 << 20))
