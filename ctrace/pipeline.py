"""Wiring shared by commands: read a recording, fold it into a model, say what was damaged."""

from typing import List, Sequence, Tuple, Union

from ctrace import recording
from ctrace.env import Environment
from ctrace.model import EVENT_FIELDS, Model, ModelOptions
from ctrace.status import ExitStatus

Damaged = Union[recording.Recording, recording.Reader]


def open_recording(path: str) -> recording.Recording:
    return recording.read(path)


def damage_lines(rec: Damaged) -> List[str]:
    return [d.message for d in rec.damage]


def damage_status(rec: Damaged) -> ExitStatus:
    """OK for a whole recording, else the status of the first damage found."""
    return rec.damage[0].error().status if rec.damage else ExitStatus.OK


def warn_damage(env: Environment, rec: Damaged) -> None:
    for line in damage_lines(rec):
        env.warn(line + " (data before it is used)")


def fold_file(path: str, options: ModelOptions, batch: int = 1 << 19) -> Tuple[Model, recording.Reader, int]:
    """Stream a recording through a model at full speed, a batch at a time (memory stays
    flat whatever the file's size; 2^19 records per batch was the fastest size measured,
    docs/PERFORMANCE.md). The first batch is an eighth of that, so folding starts while
    little has been read. Returns the model, the reader (damage, trailer) and where the
    recording ends."""
    reader = recording.open_reader(path)
    try:
        model = Model(reader.info, options)
        model.seed(reader.existing())
        for b in reader.batches(batch, read_ahead=True, fields=EVENT_FIELDS, first=batch >> 3):
            model.apply(b)
    finally:
        reader.close()
    end = int(reader.trailer["end_boot_ns"]) if reader.trailer and "end_boot_ns" in reader.trailer else model.now_boot_ns
    return model, reader, end
