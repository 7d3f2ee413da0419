"""Reading a BPF ring buffer's positions from its mapping (no kernel: a buffer laid out
as the kernel maps it)."""

import struct

import numpy as np

from ctrace import abi
from ctrace.sources.live import RINGBUF_BUSY_BIT, ring_positions

PAGE, SIZE = 4096, 4 * 4096


def mapping(cons: int, prod: int, pend: int, head: int, rec: bytes = b"") -> bytearray:
    m = bytearray(2 * PAGE + 2 * SIZE)
    struct.pack_into("<Q", m, 0, cons)
    struct.pack_into("<QQ", m, PAGE, prod, pend)
    at = 2 * PAGE + (cons & (SIZE - 1))
    struct.pack_into("<I", m, at, head)
    m[at + 8:at + 8 + len(rec)] = rec
    return m


def test_caught_up():
    st = ring_positions(mapping(1 << 20, 1 << 20, (1 << 20) - 144, 0), PAGE, SIZE)
    assert st == {"consumer": 1 << 20, "producer": 1 << 20, "pending": (1 << 20) - 144, "head_len": 0,
                  "head_busy": 0}


def test_held_at_a_record_never_submitted():
    """The consumer stops at a busy record: its length, and what its program wrote so far."""
    r = abi.empty(1)
    r["kind"] = abi.Kind.NEW
    r["ts_boot_ns"] = 123456789
    cons = 3 * SIZE + 288  # positions only grow; the data offset wraps
    st = ring_positions(mapping(cons, cons + 1440, cons, abi.EVENT_SIZE | RINGBUF_BUSY_BIT, r.tobytes()),
                        PAGE, SIZE)
    assert st["head_busy"] == 1 and st["head_len"] == abi.EVENT_SIZE
    assert st["head_kind"] == abi.Kind.NEW and st["head_ts_boot_ns"] == 123456789
    assert st["producer"] - st["consumer"] == 1440


def test_busy_bit_past_the_producer_is_no_stall():
    """A header beyond the producer is stale memory, not a held record."""
    st = ring_positions(mapping(SIZE, SIZE, SIZE, 136 | RINGBUF_BUSY_BIT), PAGE, SIZE)
    assert st["head_busy"] == 0 and "head_kind" not in st
    assert np.uint32(st["head_len"]) == 136
