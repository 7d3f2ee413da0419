"""How events are grouped: per IP (by source, destination or destination port),
per prefix and per netns. A key is three uint64 words:

    w0 = netns_ino | family << 32 | proto << 40 | prefix_len << 48
    w1, w2 = the 16 address bytes (masked to the prefix), little-endian words

For `--by dport` the "address" is the port and proto the L4 protocol.
"""

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ctrace import abi

Key = Tuple[int, int, int]
BY_CHOICES = ("src", "dst", "dport")
_PROTO_NAMES = {abi.IPPROTO_TCP: "tcp", abi.IPPROTO_UDP: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 33: "dccp"}


def proto_name(proto: int) -> str:
    return _PROTO_NAMES.get(int(proto), str(int(proto)))


# An address key's first word is netns | family << 32 | address bits << 48: the last two
# parts for each family byte.
_FAMILY_BITS = np.array([(f << 32) | ((128 if f == abi.AF_INET6 else 32) << 48) for f in range(256)], dtype=np.uint64)


def _addr_words(addr: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(n, 16) uint8 -> two (n,) uint64 words."""
    flat = np.ascontiguousarray(addr).view("<u8").reshape(-1, 2)
    return flat[:, 0], flat[:, 1]


def _prefix_masks(bits: int) -> Tuple[np.uint64, np.uint64]:
    """The two little-endian word masks keeping the first `bits` bits of 16 bytes."""
    mask = (((1 << 128) - 1) >> (128 - bits) << (128 - bits)) if bits else 0
    raw = mask.to_bytes(16, "big")
    return np.frombuffer(raw[:8], "<u8")[0], np.frombuffer(raw[8:], "<u8")[0]


@dataclass(frozen=True)
class KeySpace:
    """Which address an event is counted under, and the prefix lengths used for rollups."""

    by: str = "src"
    prefix_v4: int = 24
    prefix_v6: int = 64

    def __post_init__(self) -> None:
        if self.by not in BY_CHOICES:
            raise ValueError(f"--by must be one of {', '.join(BY_CHOICES)}")
        if not 0 <= self.prefix_v4 <= 32 or not 0 <= self.prefix_v6 <= 128:
            raise ValueError("prefix lengths must be 0-32 for IPv4 and 0-128 for IPv6")

    def words(self, ev: np.ndarray) -> List[np.ndarray]:
        """Per-address key words of event (or live) records."""
        netns = ev["netns_ino"].astype(np.uint64)
        if self.by == "dport":
            family = ev["family"].astype(np.uint64)
            w0 = netns | (family << np.uint64(32)) | (ev["l4proto"].astype(np.uint64) << np.uint64(40))
            return [w0, ev["orig_dport_be"].astype(np.uint64), np.zeros(len(ev), np.uint64)]
        w0 = netns | _FAMILY_BITS[ev["family"]]
        w1, w2 = _addr_words(ev["orig_src" if self.by == "src" else "orig_dst"])
        return [w0, w1, w2]

    def prefix_words(self, w: List[np.ndarray]) -> List[np.ndarray]:
        """Address key words -> prefix key words (ports and netns keys pass through)."""
        if self.by == "dport":
            return w
        family = (w[0] >> np.uint64(32)) & np.uint64(0xFF)
        v6 = family == abi.AF_INET6
        m4 = _prefix_masks(self.prefix_v4)
        m6 = _prefix_masks(self.prefix_v6)
        lo = np.where(v6, m6[0], m4[0])
        hi = np.where(v6, m6[1], m4[1])
        plen = np.where(v6, np.uint64(self.prefix_v6), np.uint64(self.prefix_v4))
        w0 = (w[0] & np.uint64((1 << 48) - 1)) | (plen << np.uint64(48))
        return [w0, w[1] & lo, w[2] & hi]

    @staticmethod
    def netns_words(w: List[np.ndarray]) -> List[np.ndarray]:
        z = np.zeros(len(w[0]), np.uint64)
        return [w[0] & np.uint64(0xFFFFFFFF), z, z]


@dataclass(frozen=True)
class EventFilter:
    """Which events a model counts: by netns, L4 protocol, port (either side of the
    original tuple). Records without a tuple (LOST, COUNTER) always pass."""

    netns: Optional[int] = None
    proto: Optional[int] = None
    port: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.netns is not None or self.proto is not None or self.port is not None

    def mask(self, ev: np.ndarray) -> np.ndarray:
        keep = np.ones(len(ev), dtype=bool)
        if self.netns is not None:
            keep &= ev["netns_ino"] == self.netns
        if self.proto is not None:
            keep &= ev["l4proto"] == self.proto
        if self.port is not None:
            keep &= (ev["orig_sport_be"] == self.port) | (ev["orig_dport_be"] == self.port)
        untupled = (ev["kind"] == abi.Kind.LOST) | (ev["kind"] == abi.Kind.COUNTER)
        return keep | untupled

    def describe(self) -> str:
        parts = []
        if self.netns is not None:
            parts.append(f"netns={self.netns}")
        if self.proto is not None:
            parts.append(f"proto={proto_name(self.proto)}")
        if self.port is not None:
            parts.append(f"port={self.port}")
        return " ".join(parts)


def parse_filter(text: str) -> Tuple[EventFilter, str]:
    """'netns=4026531840 proto=tcp port=443 addr=10.1.' -> (event filter, address substring).
    A bare word is an address substring. Raises ValueError with a one-line reason."""
    f: Dict[str, Any] = {}
    addr = ""
    names = {v: k for k, v in _PROTO_NAMES.items()}
    for term in text.split():
        key, eq, value = term.partition("=")
        if not eq:
            addr = term
            continue
        if key == "addr":
            addr = value
        elif key == "netns" and value.isdigit():
            f["netns"] = int(value)
        elif key == "proto" and (value.lower() in names or value.isdigit()):
            f["proto"] = names.get(value.lower(), int(value) if value.isdigit() else 0)
        elif key == "port" and value.isdigit() and int(value) < 65536:
            f["port"] = int(value)
        else:
            raise ValueError(f"bad filter term {term!r}: use netns=INODE proto=tcp|udp|N port=N addr=TEXT")
    return EventFilter(**f), addr


def netns_of(key: Key) -> int:
    return key[0] & 0xFFFFFFFF


def label(key: Key, by: str = "src") -> str:
    """Human form: '10.1.2.3', '10.1.2.0/24', '2001:db8::/64', 'tcp/443', 'netns'."""
    w0 = int(key[0])
    family = (w0 >> 32) & 0xFF
    proto = (w0 >> 40) & 0xFF
    plen = (w0 >> 48) & 0xFF
    if family == 0:
        return f"netns:{netns_of(key)}"
    if by == "dport":
        return f"{proto_name(proto)}/{key[1]}"
    raw = int(key[1]).to_bytes(8, "little") + int(key[2]).to_bytes(8, "little")
    if family == abi.AF_INET:
        text = socket.inet_ntop(socket.AF_INET, raw[:4])
        return text if plen in (0, 32) else f"{text}/{plen}"
    text = socket.inet_ntop(socket.AF_INET6, raw)
    return text if plen in (0, 128) else f"{text}/{plen}"


def addr_text(family: int, raw: np.ndarray) -> str:
    """One 16-byte address field -> text."""
    b = bytes(raw)
    if int(family) == abi.AF_INET:
        return socket.inet_ntop(socket.AF_INET, b[:4])
    if int(family) == abi.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, b)
    return b.hex()


def parse_addr(text: str) -> Tuple[int, bytes]:
    """'10.0.0.1' / '2001:db8::1' -> (family, 16 bytes)."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return abi.AF_INET, ip.packed + bytes(12)
    return abi.AF_INET6, ip.packed
