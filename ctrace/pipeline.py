"""Wiring shared by commands: read a recording, fold it into a model, say what was damaged."""

from typing import List, Tuple

from ctrace import recording
from ctrace.env import Environment
from ctrace.model import Model, ModelOptions
from ctrace.sources.replay import ReplaySource
from ctrace.status import ExitStatus


def open_recording(path: str) -> recording.Recording:
    return recording.read(path)


def damage_lines(rec: recording.Recording) -> List[str]:
    return [d.message for d in rec.damage]


def damage_status(rec: recording.Recording) -> ExitStatus:
    """OK for a whole recording, else the status of the first damage found."""
    return rec.damage[0].error().status if rec.damage else ExitStatus.OK


def warn_damage(env: Environment, rec: recording.Recording) -> None:
    for line in damage_lines(rec):
        env.warn(line + " (data before it is used)")


def fold_recording(rec: recording.Recording, options: ModelOptions) -> Tuple[Model, ReplaySource]:
    """The whole recording folded at full speed."""
    src = ReplaySource(rec)
    model = Model(src.info, options)
    model.seed(src.existing())
    for batch in src.batches():
        model.apply(batch)
    return model, src
