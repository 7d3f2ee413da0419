"""Feeds drive the model for the top view: one from a live source, one from a recording.
Both are pumped with elapsed wall time and asked for snapshots; views never see them."""

import dataclasses
from typing import Optional

import numpy as np

from ctrace.keys import EventFilter
from ctrace.model import Model, ModelOptions, Snapshot
from ctrace.recording import Recording
from ctrace.sources.base import Source

NS = 1_000_000_000


class Feed:
    label = ""
    can_seek = False

    def pump(self, wall_s: float) -> None:
        """Take in what arrived (live) or advance recorded time (replay) by wall_s."""
        raise NotImplementedError

    def snapshot(self) -> Snapshot:
        raise NotImplementedError

    @property
    def exhausted(self) -> bool:
        return False

    def refilter(self, f: EventFilter) -> None:
        raise NotImplementedError

    def seek(self, delta_s: float) -> None:
        """Replay only: move recorded time by delta_s (backwards refolds from the start)."""

    def step(self, seconds: float) -> None:
        """Replay only: advance recorded time by exactly `seconds`."""


class ReplayFeed(Feed):
    can_seek = True

    def __init__(self, rec: Recording, options: ModelOptions, speed: float = 1.0, start_s: float = 0.0) -> None:
        self.rec = rec
        self.opt = options
        self.speed = speed
        self.start = rec.info.start_boot_ns
        self.end = max(rec.end_boot_ns, self.start)
        self.ts = rec.events["ts_boot_ns"]
        self._rebuild()
        self._fold_to(self.start + int(start_s * NS))

    def _rebuild(self) -> None:
        self.model = Model(self.rec.info, self.opt)
        self.model.seed(self.rec.existing)
        self.cursor = self.start
        self.index = 0

    def _fold_to(self, t: int) -> None:
        t = max(self.start, min(t, self.end))
        hi = int(np.searchsorted(self.ts, t, side="right"))
        if hi > self.index:
            self.model.apply(self.rec.events[self.index : hi])
        self.index = max(self.index, hi)
        self.cursor = t

    def pump(self, wall_s: float) -> None:
        self._fold_to(self.cursor + int(wall_s * self.speed * NS))

    def step(self, seconds: float) -> None:
        self._fold_to(self.cursor + int(seconds * NS))

    def seek(self, delta_s: float) -> None:
        target = self.cursor + int(delta_s * NS)
        if target < self.cursor:
            self._rebuild()
        self._fold_to(target)

    def refilter(self, f: EventFilter) -> None:
        self.opt = dataclasses.replace(self.opt, filter=f)
        cursor = self.cursor
        self._rebuild()
        self._fold_to(cursor)

    def snapshot(self) -> Snapshot:
        return self.model.snapshot(self.cursor)

    @property
    def exhausted(self) -> bool:
        return self.cursor >= self.end


class LiveFeed(Feed):
    """A live source. While a filter is set, a second model counts only matching
    events from that moment on, seeded with the matching live entries."""

    def __init__(self, source: Source, options: ModelOptions, poll: "Optional[object]" = None) -> None:
        self.source = source
        self.opt = options
        self.base = Model(source.info, options)
        self.base.seed(source.existing())
        self.view: Optional[Model] = None
        self._poll = poll or getattr(source, "poll")

    def pump(self, wall_s: float) -> None:
        batch = self._poll()  # type: ignore[operator]
        if len(batch):
            self.base.apply(batch)
            if self.view is not None:
                self.view.apply(batch)

    def refilter(self, f: EventFilter) -> None:
        if not f.active:
            self.view = None
            return
        self.view = Model(self.source.info, dataclasses.replace(self.opt, filter=f))
        self.view.now_boot_ns = self.view.start_boot_ns = self.view._prev_snapshot_ns = self.base.now_boot_ns
        self.view.seed(self.base.live)

    def snapshot(self) -> Snapshot:
        return (self.view or self.base).snapshot()
