"""Formatting shared by the views."""

from typing import Optional


def seconds(v: Optional[float], digits: int = 1) -> str:
    """12.3s, 4.5m, 2.0h, 5.0d; '-' for unknown."""
    if v is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if v >= size:
            return f"{v / size:.{digits}f}{unit}"
    return f"{v:.{digits}f}s"


RING_HIGH = 0.75  # a ring this full when read is close to losing records


def ring_fill(peak_bytes: int, size_bytes: int) -> str:
    """How full the ring buffer was when read: '12%', or '93% HIGH' near full."""
    share = peak_bytes / size_bytes if size_bytes else 0.0
    return f"{100 * share:.0f}%" + (" HIGH" if share >= RING_HIGH else "")
