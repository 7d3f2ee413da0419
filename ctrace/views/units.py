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
