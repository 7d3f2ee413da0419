"""The .ctr recording format: writer and vectorised reader. Layout in docs/RECORDING.md.

    file    = preamble header_json header_crc chunk* [trailer-chunk]
    preamble= MAGIC(8) major(u16) minor(u16) header_len(u32)
    chunk   = type(4) payload_len(u32) payload_crc(u32) head_crc(u32) payload
    EXST/EVNT payloads are packed struct ct_event records (header's record_size each);
    TRLR's payload is JSON. All integers little-endian; CRCs are CRC-32 (zlib).

Every chunk is written with one write() call, so a recorder killed at any moment
leaves every chunk it finished readable.
"""

import errno
import json
import mmap
import os
import socket
import stat
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ctrace import abi
from ctrace.sources.base import SourceInfo
from ctrace.status import CtraceError, ExitStatus

MAGIC = b"\x89CTRACE\n"
MAJOR = 1
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
    head = struct.pack("<4sII", ctype, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def create_private(path: str) -> int:
    """Open a new file 0600 for writing; refuse an existing file or any symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        what = "a symlink" if os.path.islink(path) else "an existing file"
        raise CtraceError(f"{path}: refusing to overwrite {what}", ExitStatus.CANNOT_WRITE) from None
    except OSError as exc:
        raise CtraceError(f"{path}: cannot create: {exc.strerror}", ExitStatus.CANNOT_WRITE) from None


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
        writer._write(PREAMBLE.pack(MAGIC, MAJOR, MINOR, len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)))
        return writer

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _records(self, ctype: bytes, events: np.ndarray) -> None:
        if events.dtype != abi.EVENT_DTYPE:
            raise TypeError("events must be abi.EVENT_DTYPE records")
        for lo in range(0, len(events), MAX_CHUNK_RECORDS):
            part = np.ascontiguousarray(events[lo : lo + MAX_CHUNK_RECORDS])
            self._write(_chunk(ctype, part.tobytes()))

    def write_existing(self, events: np.ndarray) -> None:
        """The entries present when recording began (Kind.EXISTING)."""
        self._records(T_EXISTING, events)

    def write_events(self, events: np.ndarray) -> None:
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


def _open_map(path: str) -> Tuple[Any, int]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CtraceError(f"{path}: no such file", ExitStatus.NO_INPUT) from None
    except IsADirectoryError:
        raise CtraceError(f"{path}: is a directory, not a recording", ExitStatus.NO_INPUT) from None
    except OSError as exc:
        raise CtraceError(f"{path}: cannot open: {exc.strerror}", ExitStatus.NO_INPUT) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CtraceError(f"{path}: is a directory, not a recording", ExitStatus.NO_INPUT)
        size = st.st_size
        if size == 0:
            return b"", 0
        try:
            return mmap.mmap(fd, size, prot=mmap.PROT_READ), size
        except (OSError, ValueError) as exc:
            if getattr(exc, "errno", None) == errno.ENODEV or isinstance(exc, ValueError):
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
                return data, len(data)
            raise CtraceError(f"{path}: cannot read: {exc}", ExitStatus.NO_INPUT) from None
    finally:
        os.close(fd)


def _read_header(buf: Any, size: int, path: str) -> Tuple[int, int, Dict[str, Any], int]:
    if size < PREAMBLE.size:
        if bytes(buf[: min(size, 8)]) == MAGIC[: min(size, 8)]:
            raise TruncatedRecording(f"{path}: truncated inside the file header ({size} bytes)")
        raise CorruptRecording(f"{path}: not a ctrace recording (bad magic)")
    magic, major, minor, hlen = PREAMBLE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptRecording(f"{path}: not a ctrace recording (bad magic)")
    if major > MAJOR:
        raise NewerRecording(
            f"{path}: recording format {major}.{minor} is newer than this ctrace reads ({MAJOR}.{MINOR}); upgrade ctrace"
        )
    if major < 1 or hlen > MAX_HEADER:
        raise CorruptRecording(f"{path}: corrupt file header (version {major}.{minor}, header length {hlen})")
    end = PREAMBLE.size + hlen + 4
    if end > size:
        raise TruncatedRecording(f"{path}: truncated inside the file header")
    blob = bytes(buf[PREAMBLE.size : PREAMBLE.size + hlen])
    (crc,) = struct.unpack_from("<I", buf, PREAMBLE.size + hlen)
    if zlib.crc32(blob) != crc:
        raise CorruptRecording(f"{path}: corrupt file header (CRC mismatch)")
    try:
        header = json.loads(blob.decode())
        if not isinstance(header, dict):
            raise ValueError("not an object")
        record_size = int(header["record_size"])
        if record_size < abi.EVENT_SIZE:
            raise ValueError(f"record size {record_size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptRecording(f"{path}: corrupt file header ({exc})") from None
    return major, minor, header, end


def _chunks(buf: Any, size: int, pos: int, path: str) -> Iterator[Tuple[bytes, int, int, Optional[Damage], bool]]:
    """Yield (type, payload offset, payload length, damage, payload ok) for each chunk;
    stop at the first chunk whose head is unreadable."""
    while pos < size:
        if size - pos < CHUNK_HEAD.size:
            yield b"", pos, 0, Damage("truncated", pos, f"{path}: truncated at byte {size} inside a chunk header"), False
            return
        ctype, plen, pcrc, hcrc = CHUNK_HEAD.unpack_from(buf, pos)
        if zlib.crc32(buf[pos : pos + 12]) != hcrc or plen > MAX_PAYLOAD:
            yield b"", pos, 0, Damage("corrupt", pos, f"{path}: corrupt chunk header at byte {pos}"), False
            return
        start = pos + CHUNK_HEAD.size
        if start + plen > size:
            yield ctype, start, plen, Damage(
                "truncated", pos, f"{path}: truncated at byte {size} inside a chunk of {plen} bytes at byte {pos}"
            ), False
            return
        ok = zlib.crc32(buf[start : start + plen]) == pcrc
        damage = None if ok else Damage("corrupt", pos, f"{path}: corrupt chunk at byte {pos} (CRC mismatch), skipped")
        yield ctype, start, plen, damage, ok
        pos = start + plen


def read(path: str) -> Recording:
    """Read a whole recording file (see parse)."""
    buf, size = _open_map(path)
    return parse(buf, size, path)


def parse(buf: Any, size: int, path: str = "<recording>") -> Recording:
    """Decode a recording held in memory. Raises TraceFormatError if nothing is usable;
    otherwise returns every complete chunk, with `damage` saying what was lost and where."""
    major, minor, header, pos = _read_header(buf, size, path)
    record_size = int(header["record_size"])
    parts: Dict[bytes, List[np.ndarray]] = {T_EXISTING: [], T_EVENTS: []}
    trailer: Optional[Dict[str, Any]] = None
    damage: List[Damage] = []
    skipped = 0
    view = memoryview(buf)
    for ctype, start, plen, dmg, ok in _chunks(view, size, pos, path):
        if dmg is not None:
            damage.append(dmg)
        if not ok:
            if ctype and dmg is not None and dmg.kind == "corrupt":
                skipped += 1  # its head was sound, so reading goes on after it
            continue
        if trailer is not None:
            damage.append(Damage("corrupt", start, f"{path}: data after the trailer at byte {start}, ignored"))
            break
        if ctype in parts:
            if plen % record_size:
                damage.append(Damage("corrupt", start, f"{path}: chunk at byte {start} is not whole records, skipped"))
                continue
            parts[ctype].append(abi.decode(view[start : start + plen], record_size))
        elif ctype == T_TRAILER:
            try:
                trailer = json.loads(bytes(view[start : start + plen]).decode())
                if not isinstance(trailer, dict):
                    raise ValueError
            except ValueError:
                damage.append(Damage("corrupt", start, f"{path}: unreadable trailer at byte {start}"))
                trailer = None
        # unknown chunk types from newer minor versions are skipped
    if trailer is None and not damage:
        damage.append(Damage("truncated", size, f"{path}: ends without a trailer (recorder did not close it); all complete chunks used"))
    info = SourceInfo.from_json(header)

    def join(arrs: List[np.ndarray]) -> np.ndarray:
        if not arrs:
            return abi.empty(0)
        return np.concatenate(arrs) if len(arrs) > 1 else np.array(arrs[0])

    return Recording(path, major, minor, header, info, join(parts[T_EXISTING]), join(parts[T_EVENTS]), trailer, damage, skipped)
