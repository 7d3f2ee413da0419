"""The .ctr recording format: writer and vectorised reader. Layout in docs/RECORDING.md.

    file    = preamble header_json header_crc chunk* [trailer-chunk]
    preamble= MAGIC(8) major(u16) minor(u16) header_len(u32)
    chunk   = type(4) payload_len(u32) payload_crc(u32) head_crc(u32) payload
    EXST/EVNT payloads hold n struct ct_event records stored field by field (version 2:
    each field's n values in turn; version 1, still read: packed records); TRLR's
    payload is JSON. All integers little-endian; CRCs are CRC-32 (zlib's; ctrace.crc).

Every chunk is written with one write() call, so a recorder killed at any moment
leaves every chunk it finished readable.
"""

import io
import json
import os
import queue
import socket
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ctrace import abi
from ctrace.crc import crc32
from ctrace.columns import FIELDS, Columns, field_dtype, field_shape
from ctrace.files import create_private
from ctrace.sources.base import SourceInfo
from ctrace.status import CtraceError, ExitStatus

MAGIC = b"\x89CTRACE\n"
MAJOR = 2  # 2: records stored field by field; 1: packed records (read, not written)
MINOR = 0
PREAMBLE = struct.Struct("<8sHHI")
CHUNK_HEAD = struct.Struct("<4sIII")  # type, payload_len, payload_crc, head_crc (of the first 12 bytes)
T_EXISTING = b"EXST"
T_EVENTS = b"EVNT"
T_TRAILER = b"TRLR"
MAX_CHUNK_RECORDS = 65536
MAX_PAYLOAD = 64 << 20
MAX_HEADER = 16 << 20


class TraceFormatError(CtraceError):
    """Base of every error reading a recording raises."""

    status = ExitStatus.CORRUPT


class TruncatedRecording(TraceFormatError):
    status = ExitStatus.TRUNCATED


class CorruptRecording(TraceFormatError):
    status = ExitStatus.CORRUPT


class NewerRecording(TraceFormatError):
    status = ExitStatus.NEWER_FORMAT


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    head = struct.pack("<4sII", ctype, len(payload), crc32(payload))
    return head + struct.pack("<I", crc32(head)) + payload


class RecordingWriter:
    """Append-only writer. Use `create()`; call `close()` for a clean trailer."""

    def __init__(self, fd: int, path: str, info: SourceInfo) -> None:
        self._fd = fd
        self.path = path
        self.info = info
        self.events_written = 0
        self.lost_by_cause: Dict[str, int] = {}
        self.last_ts_boot_ns = info.start_boot_ns
        self._closed = False

    @classmethod
    def create(cls, path: str, info: SourceInfo) -> "RecordingWriter":
        fd = create_private(path)
        writer = cls(fd, path, info)
        header = dict(info.to_json())
        header.update(
            abi_major=abi.ABI_MAJOR,
            abi_minor=abi.ABI_MINOR,
            record_size=abi.EVENT_SIZE,
            writer=f"ctrace {__import__('ctrace').__version__}",
            host=socket.gethostname(),
        )
        blob = json.dumps(header, sort_keys=True).encode()
        writer._write(PREAMBLE.pack(MAGIC, MAJOR, MINOR, len(blob)) + blob + struct.pack("<I", crc32(blob)))
        return writer

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _records(self, ctype: bytes, events: Union[Columns, np.ndarray]) -> None:
        if not isinstance(events, Columns) and events.dtype != abi.EVENT_DTYPE:
            raise TypeError("events must be abi.EVENT_DTYPE records or Columns")
        cols = Columns.of(events)
        for lo in range(0, len(cols), MAX_CHUNK_RECORDS):
            hi = min(lo + MAX_CHUNK_RECORDS, len(cols))
            self._write(_chunk(ctype, b"".join(np.ascontiguousarray(cols[name][lo:hi]).tobytes() for name in FIELDS)))

    def write_existing(self, events: Union[Columns, np.ndarray]) -> None:
        """The entries present when recording began (Kind.EXISTING)."""
        self._records(T_EXISTING, events)

    def write_events(self, events: Union[Columns, np.ndarray]) -> None:
        if not len(events):
            return
        self._records(T_EVENTS, events)
        self.events_written += len(events)
        self.last_ts_boot_ns = max(self.last_ts_boot_ns, int(events["ts_boot_ns"].max()))
        lost = events[events["kind"] == abi.Kind.LOST]
        for cause, count in zip(lost["reason"], lost["value"]):
            name = abi.LostCause(int(cause)).name.lower() if int(cause) in abi.LostCause._value2member_map_ else str(cause)
            self.lost_by_cause[name] = self.lost_by_cause.get(name, 0) + int(count)

    def close(self, end_boot_ns: Optional[int] = None, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write the trailer and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        trailer = {
            "end_boot_ns": int(end_boot_ns if end_boot_ns is not None else self.last_ts_boot_ns),
            "events": self.events_written,
            "lost": self.lost_by_cause,
        }
        trailer.update(extra or {})
        try:
            self._write(_chunk(T_TRAILER, json.dumps(trailer, sort_keys=True).encode()))
            os.fsync(self._fd)
        finally:
            os.close(self._fd)


@dataclass(frozen=True)
class _Head:
    """A chunk whose head was read and checked, its payload next in the file."""

    ctype: bytes
    plen: int
    pcrc: int
    at: int


@dataclass
class Damage:
    """What went wrong while reading, if anything: the reader keeps every complete chunk."""

    kind: str  # "truncated" | "corrupt"
    offset: int
    message: str

    def error(self) -> TraceFormatError:
        cls = TruncatedRecording if self.kind == "truncated" else CorruptRecording
        return cls(self.message)


@dataclass
class Recording:
    """A recording read into memory: header, initial snapshot, events, trailer."""

    path: str
    major: int
    minor: int
    header: Dict[str, Any]
    info: SourceInfo
    existing: np.ndarray
    events: np.ndarray
    trailer: Optional[Dict[str, Any]]
    damage: List[Damage] = field(default_factory=list)
    skipped_chunks: int = 0

    @property
    def end_boot_ns(self) -> int:
        if self.trailer and "end_boot_ns" in self.trailer:
            return int(self.trailer["end_boot_ns"])
        if len(self.events):
            return int(self.events["ts_boot_ns"].max())
        return self.info.start_boot_ns

    @property
    def complete(self) -> bool:
        return not self.damage


def _open_file(path: str) -> Tuple[BinaryIO, int]:
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise CtraceError(f"{path}: no such file", ExitStatus.NO_INPUT) from None
    except IsADirectoryError:
        raise CtraceError(f"{path}: is a directory, not a recording", ExitStatus.NO_INPUT) from None
    except OSError as exc:
        raise CtraceError(f"{path}: cannot open: {exc.strerror}", ExitStatus.NO_INPUT) from None
    st = os.fstat(f.fileno())
    if stat.S_ISDIR(st.st_mode):
        f.close()
        raise CtraceError(f"{path}: is a directory, not a recording", ExitStatus.NO_INPUT)
    return f, st.st_size


class Reader:
    """Streams a recording: the header at once, then the initial snapshot, then events
    in batches of whole records. Damage is recorded, not raised, once the header is
    sound: every chunk whose head and payload check out is delivered."""

    def __init__(self, f: BinaryIO, size: int, path: str) -> None:
        self.f, self.size, self.path = f, size, path
        self.pos = 0
        self.damage: List[Damage] = []
        self.trailer: Optional[Dict[str, Any]] = None
        self.skipped_chunks = 0
        self._buf = bytearray(0)
        self._pending: Optional[_Head] = None
        self._done = False
        self.major, self.minor, self.header = self._read_header()
        self.record_size = int(self.header["record_size"])
        self.info = SourceInfo.from_json(self.header)

    def _read_into(self, view: memoryview) -> int:
        """Fill `view` from the file; the number of bytes read (fewer only at the end)."""
        got = self.f.readinto(view) or 0
        while got < len(view):
            more = self.f.readinto(view[got:]) or 0
            if not more:
                break
            got += more
        self.pos += got
        return got

    def _scratch(self, n: int) -> memoryview:
        if len(self._buf) < n:
            self._buf = bytearray(max(n, 2 * len(self._buf)))
        return memoryview(self._buf)[:n]

    def _read(self, n: int) -> memoryview:
        view = self._scratch(n)
        return view[: self._read_into(view)]

    def _read_header(self) -> Tuple[int, int, Dict[str, Any]]:
        path, size = self.path, self.size
        pre = bytes(self._read(PREAMBLE.size))
        if len(pre) < PREAMBLE.size:
            if pre[:8] == MAGIC[: min(len(pre), 8)]:
                raise TruncatedRecording(f"{path}: truncated inside the file header ({size} bytes)")
            raise CorruptRecording(f"{path}: not a ctrace recording (bad magic)")
        magic, major, minor, hlen = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise CorruptRecording(f"{path}: not a ctrace recording (bad magic)")
        if major > MAJOR:
            raise NewerRecording(
                f"{path}: recording format {major}.{minor} is newer than this ctrace reads ({MAJOR}.{MINOR}); upgrade ctrace"
            )
        if major < 1 or hlen > MAX_HEADER:
            raise CorruptRecording(f"{path}: corrupt file header (version {major}.{minor}, header length {hlen})")
        blob = bytes(self._read(hlen + 4))
        if len(blob) < hlen + 4:
            raise TruncatedRecording(f"{path}: truncated inside the file header")
        (crc,) = struct.unpack_from("<I", blob, hlen)
        if crc32(blob[:hlen]) != crc:
            raise CorruptRecording(f"{path}: corrupt file header (CRC mismatch)")
        try:
            header = json.loads(blob[:hlen].decode())
            if not isinstance(header, dict):
                raise ValueError("not an object")
            record_size = int(header["record_size"])
            if record_size < abi.EVENT_SIZE:
                raise ValueError(f"record size {record_size}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptRecording(f"{path}: corrupt file header ({exc})") from None
        return major, minor, header

    def _next_records(self) -> Optional[_Head]:
        """The head of the next chunk of whole records (EXST or EVNT), its payload still
        to read (_read_records); handles trailers, unknown types and damage on the way.
        None at the end."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        path = self.path
        while not self._done:
            at = self.pos
            head = bytes(self._read(CHUNK_HEAD.size))
            if not head:
                self._done = True
                if self.trailer is None and not self.damage:
                    self.damage.append(Damage("truncated", at, f"{path}: ends without a trailer (recorder did not close it); all complete chunks used"))
                return None
            if len(head) < CHUNK_HEAD.size:
                self.damage.append(Damage("truncated", at, f"{path}: truncated at byte {self.pos} inside a chunk header"))
                break
            ctype, plen, pcrc, hcrc = CHUNK_HEAD.unpack(head)
            if crc32(head[:12]) != hcrc or plen > MAX_PAYLOAD:
                self.damage.append(Damage("corrupt", at, f"{path}: corrupt chunk header at byte {at}"))
                break
            chunk = _Head(ctype, plen, pcrc, at)
            if ctype in (T_EXISTING, T_EVENTS) and plen % self.record_size == 0:
                return chunk
            payload = self._scratch(plen)
            if not self._read_checked(chunk, [payload]):
                continue
            if ctype in (T_EXISTING, T_EVENTS):
                self.damage.append(Damage("corrupt", at, f"{path}: chunk at byte {at} is not whole records, skipped"))
                continue
            if ctype == T_TRAILER:
                try:
                    trailer = json.loads(bytes(payload).decode())
                    if not isinstance(trailer, dict):
                        raise ValueError
                    self.trailer = trailer
                except ValueError:
                    self.damage.append(Damage("corrupt", at, f"{path}: unreadable trailer at byte {at}"))
            # unknown chunk types from newer minor versions are skipped
        self._done = True
        return None

    def _read_checked(self, chunk: "_Head", views: List[memoryview]) -> bool:
        """Read a chunk's payload into `views` in turn, checking its length and CRC on
        the way (damage is recorded; True if the payload is sound)."""
        path, at = self.path, chunk.at
        got, crc = 0, 0
        for view in views:
            n = self._read_into(view)
            crc = crc32(view[:n], crc)
            got += n
            if n < len(view):
                break
        if got < chunk.plen:
            self.damage.append(Damage("truncated", at, f"{path}: truncated at byte {self.pos} inside a chunk of {chunk.plen} bytes at byte {at}"))
            self._done = True
            return False
        if crc != chunk.pcrc:
            self.damage.append(Damage("corrupt", at, f"{path}: corrupt chunk at byte {at} (CRC mismatch), skipped"))
            self.skipped_chunks += 1
            return False
        if self.trailer is not None:
            self.damage.append(Damage("corrupt", at, f"{path}: data after the trailer at byte {at}, ignored"))
            self._done = True
            return False
        return True

    def _read_records(self, chunk: "_Head", into: "_ColumnBuffer") -> bool:
        """Read a chunk of records into `into` (appended if the chunk is sound). Version 2
        payloads are read straight into the columns, each field's values into its own."""
        k = chunk.plen // self.record_size
        if self.major == 1:
            payload = self._scratch(chunk.plen)
            if not self._read_checked(chunk, [payload]):
                return False
            into.add_packed(abi.decode(payload, self.record_size))
            return True
        # Fields of a newer minor version (records larger than ours) follow ours: skipped.
        if not self._read_checked(chunk, into.free_fields(k) + [self._scratch(chunk.plen - k * abi.EVENT_SIZE)]):
            return False
        into.n += k
        return True

    def _chunks(self, ctype: bytes) -> Iterator["_Head"]:
        """Heads of the next run of record chunks of one type (the next one of another
        type waits for the next call). Read each one's payload before the next."""
        while True:
            item = self._next_records()
            if item is None:
                return
            if item.ctype != ctype:
                self._pending = item
                return
            yield item

    def existing(self) -> Columns:
        """The initial snapshot (the EXST chunks the writer puts first)."""
        parts = []
        for chunk in self._chunks(T_EXISTING):
            buf = _ColumnBuffer(chunk.plen // self.record_size)
            if self._read_records(chunk, buf):
                parts.append(buf.take())
        return Columns.concat(parts)

    def batches(self, max_records: int = 1 << 20, read_ahead: bool = False, fields: Sequence[str] = FIELDS,
                first: Optional[int] = None) -> Iterator[Columns]:
        """Events in batches of up to max_records (more only when one chunk is larger).
        A batch is valid until the next one is asked for: copy what you keep. The initial
        snapshot is skipped if existing() was not called. read_ahead: a thread reads,
        checks and lays out the next batch while the caller works on this one. fields:
        the fields the batches hold (the others are read and checked, not kept). first:
        the first batch holds up to this many records (a small one gets a reading-ahead
        caller started sooner)."""
        for chunk in self._chunks(T_EXISTING):
            self._read_checked(chunk, [self._scratch(chunk.plen)])
        cap = max(1, min(max_records, (self.size - self.pos) // self.record_size))
        first_cap = cap if first is None else max(1, min(first, cap))
        if not read_ahead:
            yield from self._batches(fields, first_cap, _ColumnBuffer(cap, fields))
            return
        yield from _read_ahead(self._batches(fields, first_cap, _ColumnBuffer(cap, fields), _ColumnBuffer(cap, fields)))

    def _batches(self, fields: Sequence[str], first_cap: int, *buffers: "_ColumnBuffer") -> Iterator[Columns]:
        """Batches filled into `buffers` in turn, the first one only up to first_cap records."""
        turn = 0
        out = buffers[0]
        limit = first_cap
        for chunk in self._chunks(T_EVENTS):
            k = chunk.plen // self.record_size
            if out.n + k > limit and out.n:
                yield out.take()
                turn += 1
                out = buffers[turn % len(buffers)]
                limit = out.cap
            if k > out.cap:
                big = _ColumnBuffer(k, fields)
                if self._read_records(chunk, big):
                    yield big.take()
                continue
            self._read_records(chunk, out)
        if out.n:
            yield out.take()

    def close(self) -> None:
        self.f.close()


# (field, byte offset in the record, bytes per record) of struct ct_event, in order.
_LAYOUT = tuple((name, abi.FIELD_OFFSETS[name], abi.EVENT_DTYPE.fields[name][0].itemsize) for name in FIELDS)
assert sum(size for _, _, size in _LAYOUT) == abi.EVENT_SIZE, "struct ct_event has a gap the format does not store"
_WIDEST = max(size for _, _, size in _LAYOUT)


class _ColumnBuffer:
    """Columns of the wanted fields for up to `cap` records in one block of memory, filled
    chunk by chunk (no per-record work, few numpy calls). Values of other fields are read
    into a small spare buffer, overwritten chunk after chunk."""

    def __init__(self, cap: int, fields: Sequence[str] = FIELDS) -> None:
        self.cap, self.n = cap, 0
        wanted = [(name, size) for name, _, size in _LAYOUT if name in fields]
        self.raw = np.empty(cap * sum(size for _, size in wanted), dtype=np.uint8)  # only rows below n are ever read
        self.view = memoryview(self.raw)
        self.at: Dict[str, int] = {}  # field -> its column's first byte in raw
        self.cols: Dict[str, np.ndarray] = {}
        at = 0
        for name, size in wanted:
            self.at[name] = at
            self.cols[name] = self.raw[at : at + cap * size].view(field_dtype(name)).reshape((cap,) + field_shape(name))
            at += cap * size
        self.spare = bytearray(0)

    def free_fields(self, k: int) -> List[memoryview]:
        """Where the next k records go, field by field in the order of the record's layout
        (format version 2 stores a chunk's records that way): fill them, then add k to n."""
        if self.n + k > self.cap:
            raise ValueError("column buffer full")
        if len(self.spare) < k * _WIDEST:
            self.spare = bytearray(k * _WIDEST)
        spare = memoryview(self.spare)
        n = self.n
        return [self.view[self.at[name] + n * size : self.at[name] + (n + k) * size] if name in self.at else spare[: k * size]
                for name, _, size in _LAYOUT]

    def add_packed(self, records: np.ndarray) -> None:
        """Packed records (format version 1)."""
        k = len(records)
        for name, col in self.cols.items():
            col[self.n : self.n + k] = records[name]
        self.n += k

    def take(self) -> Columns:
        """The records so far (views into the buffer), and start over."""
        n, self.n = self.n, 0
        return Columns({name: c[:n] for name, c in self.cols.items()}, n)


_END = object()


def _read_ahead(batches: Iterator[Columns]) -> Iterator[Columns]:
    """Run a generator of batches that alternates between two buffers in a thread, one
    batch ahead: the thread fills batch i+1 while the caller holds batch i, and starts
    on batch i+2 (reusing batch i's buffer) only once the caller asks for batch i+1.
    CRC checks and file reads release the GIL, so reading overlaps the caller's numpy work."""
    ready: "queue.Queue[Any]" = queue.Queue(maxsize=1)
    free = threading.Semaphore(2)
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                free.acquire()
                if stop.is_set():
                    return
                item = next(batches, _END)
                ready.put(item)
                if item is _END:
                    return
        except BaseException as exc:  # handed to the caller's thread
            ready.put(exc)

    worker = threading.Thread(target=produce, name="ctrace-read-ahead", daemon=True)
    worker.start()
    held = False
    try:
        while True:
            item = ready.get()
            if held:
                free.release()  # the caller is done with the previous batch
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            held = True
            yield item
    finally:
        stop.set()
        free.release()
        while worker.is_alive():
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


def open_reader(path: str) -> Reader:
    f, size = _open_file(path)
    try:
        return Reader(f, size, path)
    except BaseException:
        f.close()
        raise


def _whole(reader: Reader) -> Recording:
    existing = reader.existing().records()
    events = Columns.concat([b.copy() for b in reader.batches()]).records()
    return Recording(
        reader.path, reader.major, reader.minor, reader.header, reader.info, existing,
        events, reader.trailer, reader.damage, reader.skipped_chunks,
    )


def read(path: str) -> Recording:
    """Read a whole recording file into memory (see Reader for streaming)."""
    reader = open_reader(path)
    try:
        return _whole(reader)
    finally:
        reader.close()


def parse(buf: Any, size: int, path: str = "<recording>") -> Recording:
    """Decode a recording held in memory. Raises TraceFormatError if nothing is usable;
    otherwise returns every complete chunk, with `damage` saying what was lost and where."""
    return _whole(Reader(io.BytesIO(bytes(buf[:size])), size, path))
