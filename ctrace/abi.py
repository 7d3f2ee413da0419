"""Python mirror of bpf/ctrace.h: the event record as a numpy dtype, and its codes.

tests/unit/test_abi.py compiles the header and proves this mirror exact.
"""

from enum import IntEnum
from typing import Dict, Tuple

import numpy as np

ABI_MAJOR = 1
ABI_MINOR = 0


class Kind(IntEnum):
    NEW = 1
    DESTROY = 2
    EXISTING = 3
    STATE = 4
    DROP = 5
    ORPHAN = 6
    SOCK = 7
    LOST = 8
    COUNTER = 9


class DestroyReason(IntEnum):
    UNKNOWN = 0
    TIMEOUT = 1
    EARLY_DROP = 2
    DELETE = 3
    NETNS = 4
    KILL = 5


class DropReason(IntEnum):
    TABLE_FULL = 1
    INSERT_FAILED = 2


class LostCause(IntEnum):
    RINGBUF_FULL = 1
    PERF_BUFFER = 2
    MAP_FULL = 3
    CONSUMER = 4
    PROBE_SKIPPED = 5


class Counter(IntEnum):
    COUNT = 1
    MAX = 2
    INSERT_FAILED = 3
    DROP = 4
    EARLY_DROP = 5
    BUCKETS = 6
    RING_BYTES = 7
    RING_PEAK_BYTES = 8


# Counters about ctrace's ring buffer, not the kernel's conntrack figures.
RING_COUNTERS = (Counter.RING_BYTES, Counter.RING_PEAK_BYTES)


class TcpState(IntEnum):
    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


FLAG_START_KNOWN = 0x01
FLAG_SYNTHETIC = 0x02
FLAG_ORPHANED = 0x04
FLAG_DUMP_ID = 0x08

IPS_SEEN_REPLY = 0x02
IPS_ASSURED = 0x04
IPS_CONFIRMED = 0x08

AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17

# (name, numpy type, byte offset) in the order of struct ct_event.
_FIELDS: Tuple[Tuple[str, str, int], ...] = (
    ("ts_boot_ns", "<u8", 0),
    ("ct_id", "<u8", 8),
    ("start_boot_ns", "<u8", 16),
    ("value", "<u8", 24),
    ("netns_ino", "<u4", 32),
    ("status_raw", "<u4", 36),
    ("timeout_s", "<u4", 40),
    ("pid", "<u4", 44),
    ("orig_src", "16u1", 48),
    ("orig_dst", "16u1", 64),
    ("reply_src", "16u1", 80),
    ("reply_dst", "16u1", 96),
    ("orig_sport_be", ">u2", 112),
    ("orig_dport_be", ">u2", 114),
    ("reply_sport_be", ">u2", 116),
    ("reply_dport_be", ">u2", 118),
    ("zone", "<u2", 120),
    ("kind", "u1", 122),
    ("family", "u1", 123),
    ("l4proto", "u1", 124),
    ("ct_state", "u1", 125),
    ("ct_oldstate", "u1", 126),
    ("reason", "u1", 127),
    ("sk_oldstate", "u1", 128),
    ("sk_newstate", "u1", 129),
    ("flags", "u1", 130),
    ("_pad", "5u1", 131),
)

EVENT_SIZE = 136

# Ports are declared big-endian in numpy, so reading a field yields host-order numbers.
EVENT_DTYPE = np.dtype(
    {
        "names": [f[0] for f in _FIELDS],
        "formats": [f[1] for f in _FIELDS],
        "offsets": [f[2] for f in _FIELDS],
        "itemsize": EVENT_SIZE,
    }
)

FIELD_OFFSETS: Dict[str, int] = {name: off for name, _, off in _FIELDS}


def empty(n: int) -> np.ndarray:
    """n zeroed event records."""
    return np.zeros(n, dtype=EVENT_DTYPE)


def concat(parts: "list[np.ndarray]") -> np.ndarray:
    """Event arrays joined, keeping EVENT_DTYPE (np.concatenate turns the big-endian
    port fields native, which would write wrong bytes)."""
    out = empty(sum(len(p) for p in parts))
    pos = 0
    for p in parts:
        out[pos : pos + len(p)] = p
        pos += len(p)
    return out


def decode(buf: bytes, record_size: int = EVENT_SIZE) -> np.ndarray:
    """Records packed at `record_size` bytes each (>= EVENT_SIZE: newer minor
    versions append fields, which are ignored) -> array of EVENT_DTYPE."""
    if record_size < EVENT_SIZE:
        raise ValueError(f"record size {record_size} is smaller than ABI v1's {EVENT_SIZE}")
    count = len(buf) // record_size
    if record_size == EVENT_SIZE:
        return np.frombuffer(buf, dtype=EVENT_DTYPE, count=count)
    wide = np.dtype(
        {"names": EVENT_DTYPE.names, "formats": [EVENT_DTYPE.fields[n][0] for n in EVENT_DTYPE.names],
         "offsets": [EVENT_DTYPE.fields[n][1] for n in EVENT_DTYPE.names], "itemsize": record_size}
    )
    return np.frombuffer(buf, dtype=wide, count=count).astype(EVENT_DTYPE)
