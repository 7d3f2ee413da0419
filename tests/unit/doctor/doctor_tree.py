"""Build root trees for doctor tests: the files the kernel would show, written the
way the kernel writes them (hex /proc/net/tcp words, hex stat rows, table lines)."""

import ipaddress
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ctrace.doctor.snapshot import DEFAULT_TIMEOUTS

STAT_HEADER_510 = (
    "entries  clashres found new invalid ignore delete delete_list insert insert_failed drop early_drop "
    "icmp_error  expect_new expect_create expect_delete search_restart"
)
STAT_HEADER_66 = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop "
    "icmp_error  expect_new expect_create expect_delete search_restart"
)

_TCP_CODES = {
    "ESTABLISHED": 1, "SYN_SENT": 2, "SYN_RECV": 3, "FIN_WAIT1": 4, "FIN_WAIT2": 5, "TIME_WAIT": 6,
    "CLOSE": 7, "CLOSE_WAIT": 8, "LAST_ACK": 9, "LISTEN": 10, "CLOSING": 11,
}


def _full6(addr: str) -> str:
    """IPv6 as the kernel's %pI6 prints it: eight groups of four hex digits."""
    return ipaddress.IPv6Address(addr).exploded


def ct_tcp(src: str, dst: str, sport: int, dport: int, state: str = "ESTABLISHED", remaining: int = 431999,
           assured: bool = True, rsrc: Optional[str] = None, rdst: Optional[str] = None,
           rsport: Optional[int] = None, rdport: Optional[int] = None, extra: str = "mark=0 zone=0 use=2") -> str:
    v6 = ":" in src
    f = _full6 if v6 else (lambda a: a)
    rsrc = rsrc or dst
    rdst = rdst or src
    rsport = dport if rsport is None else rsport
    rdport = sport if rdport is None else rdport
    l3 = "ipv6     10" if v6 else "ipv4     2"
    flags = "[ASSURED] " if assured else ""
    return (
        f"{l3} tcp      6 {remaining} {state} src={f(src)} dst={f(dst)} sport={sport} dport={dport} "
        f"src={f(rsrc)} dst={f(rdst)} sport={rsport} dport={rdport} {flags}{extra}"
    )


def ct_udp(src: str, dst: str, sport: int, dport: int, remaining: int = 29, unreplied: bool = True,
           assured: bool = False, rsrc: Optional[str] = None, rsport: Optional[int] = None) -> str:
    rsrc = rsrc or dst
    rsport = dport if rsport is None else rsport
    un = "[UNREPLIED] " if unreplied else ""
    fl = "[ASSURED] " if assured else ""
    return (
        f"ipv4     2 udp      17 {remaining} src={src} dst={dst} sport={sport} dport={dport} {un}"
        f"src={rsrc} dst={src} sport={rsport} dport={sport} {fl}mark=0 zone=0 use=2"
    )


def _hex4(addr: str, order: str) -> str:
    return "%08X" % int.from_bytes(ipaddress.IPv4Address(addr).packed, order)  # type: ignore[arg-type]


def _hex6(addr: str, order: str) -> str:
    raw = ipaddress.IPv6Address(addr).packed
    return "".join("%08X" % int.from_bytes(raw[k : k + 4], order) for k in range(0, 16, 4))  # type: ignore[arg-type]


def tcp_lines(sockets: Sequence[tuple], v6: bool, order: str = "little") -> str:
    """/proc/net/tcp{,6} for (local, lport, remote, rport, state) tuples."""
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    out = [head]
    enc = _hex6 if v6 else _hex4
    for n, (local, lport, remote, rport, state) in enumerate(sockets):
        out.append(
            f"{n:4d}: {enc(local, order)}:{lport:04X} {enc(remote, order)}:{rport:04X} {_TCP_CODES[state]:02X} "
            "00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 20 4 30 10 -1\n"
        )
    return "".join(out)


def fib_trie(addrs: Iterable[str]) -> str:
    out = ["Main:\n  +-- 0.0.0.0/0 3 0 5\n"]
    for a in addrs:
        out.append(f"     |-- {a}\n        /32 host LOCAL\n")
        out.append(f"     |-- {a.rsplit('.', 1)[0]}.255\n        /32 link BROADCAST\n")
    return "".join(out)


def if_inet6(addrs: Iterable[str]) -> str:
    return "".join(f"{ipaddress.IPv6Address(a).packed.hex()} 02 40 00 80     eth0\n" for a in addrs)


class Tree:
    """A root tree under `root`. Every setter writes files; nothing is implied."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def write(self, rel: str, text: str) -> "Tree":
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return self

    def sysctls(self, **values: int) -> "Tree":
        for name, value in values.items():
            self.write(f"proc/sys/net/netfilter/{name}", f"{value}\n")
        return self

    def base(self, count: int = 100, max: int = 262144, buckets: int = 262144, keepalive: int = 7200,
             **timeouts: int) -> "Tree":
        """The sysctls every kernel shows, with default timeouts unless overridden."""
        values: Dict[str, int] = dict(DEFAULT_TIMEOUTS)
        values.update(timeouts)
        values.update(nf_conntrack_count=count, nf_conntrack_max=max, nf_conntrack_buckets=buckets,
                      nf_conntrack_tcp_loose=1, nf_conntrack_acct=0)
        self.sysctls(**values)
        self.write("proc/sys/net/ipv4/tcp_keepalive_time", f"{keepalive}\n")
        self.write("proc/modules", "nf_conntrack 172032 2 xt_conntrack,nf_nat, Live 0x0000000000000000\n")
        self.write("proc/slabinfo", "slabinfo - version: 2.1\nnf_conntrack 1024 1050 320 25 2 : tunables 0 0 0\n")
        return self

    def stat(self, rows: List[Dict[str, int]], header: str = STAT_HEADER_66, entries: int = 0) -> "Tree":
        names = header.split()
        alias = {"clashres": "clash_resolve", "chainlength": "chaintoolong", "icmp_error": "error"}
        lines = [header]
        for row in rows:
            cells = []
            for name in names:
                key = alias.get(name, name)
                cells.append("%08x" % (entries if name == "entries" else row.get(key, 0)))
            lines.append(" ".join(cells))
        return self.write("proc/net/stat/nf_conntrack", "\n".join(lines) + "\n")

    def table(self, lines: Iterable[str]) -> "Tree":
        return self.write("proc/net/nf_conntrack", "".join(line + "\n" for line in lines))

    def sockets(self, v4: Sequence[tuple] = (), v6: Sequence[tuple] = (), order: str = "little") -> "Tree":
        self.write("proc/net/tcp", tcp_lines(v4, False, order))
        self.write("proc/net/tcp6", tcp_lines(v6, True, order))
        return self

    def local(self, v4: Iterable[str] = ("127.0.0.1",), v6: Iterable[str] = ("::1",)) -> "Tree":
        self.write("proc/net/fib_trie", fib_trie(v4))
        self.write("proc/net/if_inet6", if_inet6(v6))
        return self

    def ruleset(self, nft: Optional[str] = None, iptables: Optional[str] = None, ip6tables: Optional[str] = None) -> "Tree":
        if nft is not None:
            self.write("ruleset/nft.txt", nft)
        if iptables is not None:
            self.write("ruleset/iptables-save.txt", iptables)
        if ip6tables is not None:
            self.write("ruleset/ip6tables-save.txt", ip6tables)
        return self

    def remove(self, rel: str) -> "Tree":
        os.unlink(self.root / rel)
        return self


NFT_STATEFUL = """table inet filter {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state established,related accept
		iif "lo" accept
		tcp dport 22 accept
	}
}
"""

NFT_STATELESS = """table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept
		ip saddr 192.0.2.0/24 drop
	}
}
"""

IPT_EMPTY = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
