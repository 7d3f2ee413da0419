"""Replay a recording as a source: the same stream the live run produced."""

from typing import Iterator, Optional, Tuple

import numpy as np

from ctrace.recording import Recording
from ctrace.sources.base import Source

NS = 1_000_000_000


class ReplaySource(Source):
    """Batches of a recording's events. `step_ns` cuts them on recorded-time
    boundaries (for frame-by-frame views); without it, large batches for speed."""

    def __init__(self, rec: Recording, step_ns: Optional[int] = None, batch: int = 4_000_000) -> None:
        self.rec = rec
        self.info = rec.info
        self.step_ns = step_ns
        self.batch = batch
        self._stop = False

    def existing(self) -> np.ndarray:
        return self.rec.existing

    def end_boot_ns(self) -> Optional[int]:
        return self.rec.end_boot_ns

    def stop(self) -> None:
        self._stop = True

    def batches(self) -> Iterator[np.ndarray]:
        ev = self.rec.events
        if self.step_ns is None:
            for lo in range(0, len(ev), self.batch):
                if self._stop:
                    return
                yield ev[lo : lo + self.batch]
            return
        for _, batch in self.windows(self.step_ns):
            yield batch

    def windows(self, step_ns: int) -> Iterator[Tuple[int, np.ndarray]]:
        """(window end, its events) for each step of recorded time, empty ones included."""
        ev = self.rec.events
        ts = ev["ts_boot_ns"]
        t = self.info.start_boot_ns
        end = max(self.rec.end_boot_ns, t)
        lo = 0
        while t < end and not self._stop:
            t = min(t + step_ns, end)
            hi = int(np.searchsorted(ts, t, side="right"))
            yield t, ev[lo:hi]
            lo = hi
