"""Parsers for the kernel's text formats. Each takes text (or lines) and returns plain
data; damaged lines are counted and reported, never raised.

Formats (checked against net/netfilter/nf_conntrack_standalone.c and net/ipv4/tcp_ipv4.c):
- /proc/net/nf_conntrack: `ipv4 2 tcp 6 431999 ESTABLISHED src= dst= sport= dport=
  [UNREPLIED] src= dst= sport= dport= [ASSURED] mark=0 zone=0 delta-time=12 use=2`.
  The timeout column (seconds left) is absent for offloaded entries; `conntrack -L`
  prints the same without the two leading l3 columns.
- /proc/net/stat/nf_conntrack: a header of column names, then one row of hex numbers
  per possible CPU. Names differ between kernels (clashres/searched, chainlength/delete_list).
- /proc/net/tcp{,6}: addresses as hex 32-bit words in the host's byte order.
"""

import ipaddress
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple

# --- sysctls -------------------------------------------------------------------


def parse_int(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


# --- statistics ----------------------------------------------------------------

# Header labels that name a counter differently from the kernel's struct field.
_STAT_ALIASES = {"clashres": "clash_resolve", "chainlength": "chaintoolong", "icmp_error": "error"}


@dataclass
class Stats:
    columns: List[str]  # canonical counter names, in file order, "entries" excluded
    per_cpu: List[Dict[str, int]]  # one dict per row (row i = i-th possible CPU)
    source: str  # which input they came from
    bad_rows: int = 0

    def total(self, name: str) -> Optional[int]:
        if name not in self.columns:
            return None
        return sum(row.get(name, 0) for row in self.per_cpu)

    def by_cpu(self, name: str) -> List[int]:
        return [row.get(name, 0) for row in self.per_cpu]


def parse_stat_table(text: str, source: str) -> Optional[Stats]:
    """/proc/net/stat/nf_conntrack. None if there is no header."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    header = lines[0].split()
    if not header or header[0] != "entries":
        return None
    names = [_STAT_ALIASES.get(h, h) for h in header]
    stats = Stats(columns=[n for n in names if n != "entries"], per_cpu=[], source=source)
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != len(names):
            stats.bad_rows += 1
            continue
        try:
            row = {n: int(c, 16) for n, c in zip(names, cells)}
        except ValueError:
            stats.bad_rows += 1
            continue
        row.pop("entries", None)
        stats.per_cpu.append(row)
    return stats


def parse_conntrack_s(text: str, source: str) -> Optional[Stats]:
    """`conntrack -S`: `cpu=0 found=0 invalid=0 insert=0 insert_failed=0 drop=0 ...`."""
    columns: List[str] = []
    stats = Stats(columns=columns, per_cpu=[], source=source)
    for line in text.splitlines():
        if not line.strip().startswith("cpu="):
            continue
        row: Dict[str, int] = {}
        try:
            for cell in line.split():
                key, _, value = cell.partition("=")
                if key != "cpu":
                    row[key] = int(value)
                    if key not in columns:
                        columns.append(key)
        except ValueError:
            stats.bad_rows += 1
            continue
        stats.per_cpu.append(row)
    return stats if stats.per_cpu else None


# --- the conntrack table -------------------------------------------------------


class Tuple4(NamedTuple):
    src: str
    dst: str
    sport: Optional[int]
    dport: Optional[int]


class CtEntry(NamedTuple):
    l3: str  # "ipv4" | "ipv6"
    proto: str  # "tcp", "udp", "icmp", ...
    timeout: Optional[int]  # seconds until expiry (None: offloaded)
    state: Optional[str]  # TCP/SCTP/DCCP state name, None for UDP/ICMP
    orig: Tuple4
    reply: Tuple4
    unreplied: bool
    assured: bool
    offload: bool
    zone: Optional[int]
    delta_time: Optional[int]  # seconds since creation (nf_conntrack_timestamp=1)


_addr_cache: Dict[str, str] = {}


def norm_addr(text: str) -> str:
    """Canonical text of an address: conntrack prints IPv6 in full (%pI6), sockets
    and conntrack-tools compressed; IPv4-mapped IPv6 becomes IPv4. IPv4 text from
    the kernel is already canonical."""
    if ":" not in text:
        return text
    got = _addr_cache.get(text)
    if got is not None:
        return got
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    got = str(ip)
    if len(_addr_cache) < 1_000_000:
        _addr_cache[text] = got
    return got


_PORTLESS = {"icmp", "icmpv6", "gre", "unknown"}
_L3 = {"ipv4", "ipv6", "unknown"}
_TUPLE_KEYS = {"src", "dst", "sport", "dport"}


def _port(d: Dict[str, str], key: str) -> Optional[int]:
    v = d.get(key)
    return None if v is None else int(v)


def parse_ct_line(line: str) -> Optional[CtEntry]:
    """One line of /proc/net/nf_conntrack or `conntrack -L [-o extended]`; None if damaged."""
    tok = line.split()
    n = len(tok)
    if n < 4:
        return None
    try:
        i = 2 if tok[0] in _L3 else 0
        l3 = tok[0] if i else ""
        proto = tok[i]
        int(tok[i + 1])  # protocol number: must be numeric
        i += 2
        timeout: Optional[int] = None
        t = tok[i] if i < n else ""
        if t.isdigit():
            timeout = int(t)
            i += 1
            t = tok[i] if i < n else ""
        state: Optional[str] = None
        if t and "=" not in t and t[0] != "[":
            state = t
            i += 1
        o: Dict[str, str] = {}
        r: Dict[str, str] = {}
        cur = o
        unreplied = assured = offload = False
        zone: Optional[int] = None
        delta: Optional[int] = None
        for t in tok[i:]:
            if t[0] == "[":
                if t == "[ASSURED]":
                    assured = True
                elif t == "[UNREPLIED]":
                    unreplied = True
                elif t in ("[OFFLOAD]", "[HW_OFFLOAD]"):
                    offload = True
                continue
            k, sep, v = t.partition("=")
            if not sep:
                continue
            if k in _TUPLE_KEYS:
                if k == "src" and cur is o and "src" in o:
                    cur = r
                if k not in cur:
                    cur[k] = v
            elif k == "zone" and v.isdigit():
                zone = int(v)
            elif k == "delta-time" and v.isdigit():
                delta = int(v)
        if "src" not in o or "dst" not in o or "src" not in r or "dst" not in r:
            return None
        portless = proto in _PORTLESS
        orig = Tuple4(norm_addr(o["src"]), norm_addr(o["dst"]),
                      None if portless else _port(o, "sport"), None if portless else _port(o, "dport"))
        reply = Tuple4(norm_addr(r["src"]), norm_addr(r["dst"]),
                       None if portless else _port(r, "sport"), None if portless else _port(r, "dport"))
        if not l3:
            l3 = "ipv6" if ":" in orig.src else "ipv4"
    except (ValueError, IndexError):
        return None
    return CtEntry(l3, proto, timeout, state, orig, reply, unreplied, assured, offload, zone, delta)


# --- sockets -------------------------------------------------------------------

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}


class Socket(NamedTuple):
    local: str
    lport: int
    remote: str
    rport: int
    state: str


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _hex_addr(text: str, byteorder: str) -> str:
    if len(text) == 8:
        return socket.inet_ntoa(int(text, 16).to_bytes(4, byteorder))  # type: ignore[arg-type]
    if len(text) == 32:
        raw = b"".join(int(text[k : k + 8], 16).to_bytes(4, byteorder) for k in range(0, 32, 8))  # type: ignore[arg-type]
        if raw[:12] == _V4_MAPPED:
            return socket.inet_ntoa(raw[12:])
        return socket.inet_ntop(socket.AF_INET6, raw)
    raise ValueError(f"bad address {text!r}")


@dataclass
class SocketTable:
    """Local TCP sockets, folded as they are read (the lists can be large): the
    4-tuples of every non-listening socket, states per local address, and peers."""

    keys: Set[Tuple[str, int, str, int]] = field(default_factory=set)  # (local, lport, remote, rport)
    states: Dict[str, Counter] = field(default_factory=dict)  # local address -> state -> sockets
    peers: Counter = field(default_factory=Counter)  # remote address -> sockets
    addresses: Set[str] = field(default_factory=set)  # local addresses bound by some socket
    count: int = 0
    bad_lines: int = 0

    def add(self, k: Socket) -> None:
        self.count += 1
        if k.local not in ("0.0.0.0", "::"):
            self.addresses.add(k.local)
        if k.state == "LISTEN":
            return
        self.keys.add((k.local, k.lport, k.remote, k.rport))
        st = self.states.get(k.local)
        if st is None:
            st = self.states[k.local] = Counter()
        st[k.state] += 1
        self.peers[k.remote] += 1


def iter_proc_tcp(lines: Iterable[str], byteorder: str, table: Optional[SocketTable] = None) -> Iterator[Socket]:
    """Sockets of /proc/net/tcp or tcp6 (header skipped; damaged lines counted in `table`)."""
    for n, line in enumerate(lines):
        cells = line.split()
        if not cells or (n == 0 and cells[0] == "sl"):
            continue
        try:
            laddr, lport = cells[1].split(":")
            raddr, rport = cells[2].split(":")
            state = TCP_STATES.get(int(cells[3], 16), f"0x{cells[3]}")
            sock = Socket(_hex_addr(laddr, byteorder), int(lport, 16), _hex_addr(raddr, byteorder), int(rport, 16), state)
        except (ValueError, IndexError):
            if table is not None:
                table.bad_lines += 1
            continue
        yield sock


def parse_proc_tcp(lines: Iterable[str], byteorder: str, into: Optional[SocketTable] = None) -> SocketTable:
    table = into or SocketTable()
    for sock in iter_proc_tcp(lines, byteorder, table):
        table.add(sock)
    return table


# --- local addresses -----------------------------------------------------------


def parse_fib_trie(text: str) -> Set[str]:
    """Local IPv4 addresses: a `|-- A.B.C.D` leaf followed by `/32 host LOCAL`."""
    local: Set[str] = set()
    last = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|--"):
            last = s[3:].strip()
        elif s.startswith("/32 host LOCAL") and last:
            local.add(norm_addr(last))
    return local


def parse_if_inet6(text: str) -> Set[str]:
    """Local IPv6 addresses: 32 hex digits in network order, first column."""
    local: Set[str] = set()
    for line in text.splitlines():
        cells = line.split()
        if cells and len(cells[0]) == 32:
            try:
                local.add(norm_addr(str(ipaddress.IPv6Address(bytes.fromhex(cells[0])))))
            except ValueError:
                continue
    return local


# --- modules and slab ----------------------------------------------------------


def parse_modules(text: str) -> Dict[str, List[str]]:
    """/proc/modules: module name -> modules that depend on it ("used by")."""
    users: Dict[str, List[str]] = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 4:
            users[cells[0]] = [u for u in cells[3].split(",") if u and u != "-"]
    return users


def parse_slab_objsize(text: str, cache: str = "nf_conntrack") -> Optional[int]:
    """Object size in bytes of one slab cache from /proc/slabinfo (v2.1)."""
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0] == cache:
            try:
                return int(cells[3])
            except ValueError:
                return None
    return None


def prefix_of(addr: str) -> Tuple[str, int]:
    """The /24 (IPv4) or /64 (IPv6) holding `addr`, as text, with its length."""
    if ":" in addr:
        try:
            net = ipaddress.IPv6Network(f"{addr}/64", strict=False)
        except ValueError:
            return addr, 128
        return str(net), 64
    head, _, _ = addr.rpartition(".")
    return f"{head}.0/24", 24
