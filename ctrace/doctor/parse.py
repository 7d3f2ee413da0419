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
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

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


@dataclass
class Tuple4:
    src: str
    dst: str
    sport: Optional[int]
    dport: Optional[int]


@dataclass
class CtEntry:
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
    and conntrack-tools compressed; IPv4-mapped IPv6 becomes IPv4."""
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


def parse_ct_line(line: str) -> Optional[CtEntry]:
    """One line of /proc/net/nf_conntrack or `conntrack -L [-o extended]`; None if damaged."""
    tok = line.split()
    if len(tok) < 4:
        return None
    try:
        i = 0
        l3 = ""
        if tok[0] in ("ipv4", "ipv6", "unknown"):
            l3 = tok[0]
            i = 2
        proto = tok[i]
        int(tok[i + 1])  # protocol number: must be numeric
        i += 2
        timeout: Optional[int] = None
        if i < len(tok) and tok[i].lstrip("-").isdigit():
            timeout = max(0, int(tok[i]))
            i += 1
        state: Optional[str] = None
        if i < len(tok) and "=" not in tok[i] and not tok[i].startswith("["):
            state = tok[i]
            i += 1
        tuples: List[Dict[str, str]] = [{}, {}]
        side = 0
        flags = set()
        extra: Dict[str, str] = {}
        for t in tok[i:]:
            if t.startswith("["):
                flags.add(t.strip("[]"))
                continue
            key, sep, value = t.partition("=")
            if not sep:
                continue
            if key == "src" and "src" in tuples[0]:
                side = 1
            if key in ("src", "dst", "sport", "dport"):
                tuples[side].setdefault(key, value)
            else:
                extra.setdefault(key, value)
        o, r = tuples
        if "src" not in o or "dst" not in o or "src" not in r or "dst" not in r:
            return None
        portless = proto in _PORTLESS
        orig = Tuple4(
            norm_addr(o["src"]),
            norm_addr(o["dst"]),
            None if portless or "sport" not in o else int(o["sport"]),
            None if portless or "dport" not in o else int(o["dport"]),
        )
        reply = Tuple4(
            norm_addr(r["src"]),
            norm_addr(r["dst"]),
            None if portless or "sport" not in r else int(r["sport"]),
            None if portless or "dport" not in r else int(r["dport"]),
        )
        if not l3:
            l3 = "ipv6" if ":" in orig.src else "ipv4"
        zone = int(extra["zone"]) if extra.get("zone", "").isdigit() else None
        delta = int(extra["delta-time"]) if extra.get("delta-time", "").isdigit() else None
    except (ValueError, IndexError):
        return None
    return CtEntry(
        l3=l3,
        proto=proto,
        timeout=timeout,
        state=state,
        orig=orig,
        reply=reply,
        unreplied="UNREPLIED" in flags,
        assured="ASSURED" in flags,
        offload="OFFLOAD" in flags or "HW_OFFLOAD" in flags,
        zone=zone,
        delta_time=delta,
    )


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


@dataclass(frozen=True)
class Socket:
    local: str
    lport: int
    remote: str
    rport: int
    state: str


def _hex_addr(text: str, byteorder: str) -> str:
    if len(text) == 8:
        return str(ipaddress.IPv4Address(int(text, 16).to_bytes(4, byteorder)))  # type: ignore[arg-type]
    if len(text) == 32:
        raw = b"".join(int(text[k : k + 8], 16).to_bytes(4, byteorder) for k in range(0, 32, 8))  # type: ignore[arg-type]
        ip6 = ipaddress.IPv6Address(raw)
        return str(ip6.ipv4_mapped) if ip6.ipv4_mapped is not None else str(ip6)
    raise ValueError(f"bad address {text!r}")


@dataclass
class SocketTable:
    sockets: List[Socket] = field(default_factory=list)
    bad_lines: int = 0


def parse_proc_tcp(lines: Iterable[str], byteorder: str, into: Optional[SocketTable] = None) -> SocketTable:
    """/proc/net/tcp or tcp6 (header line skipped)."""
    table = into or SocketTable()
    for n, line in enumerate(lines):
        cells = line.split()
        if not cells or (n == 0 and cells[0] == "sl"):
            continue
        try:
            laddr, lport = cells[1].split(":")
            raddr, rport = cells[2].split(":")
            state = TCP_STATES.get(int(cells[3], 16), f"0x{cells[3]}")
            table.sockets.append(
                Socket(_hex_addr(laddr, byteorder), int(lport, 16), _hex_addr(raddr, byteorder), int(rport, 16), state)
            )
        except (ValueError, IndexError):
            table.bad_lines += 1
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
