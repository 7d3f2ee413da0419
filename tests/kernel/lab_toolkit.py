"""Scenario toolkit for ctrace kernel tests.

Runs inside a lab guest (tests/vm/lab.py) as root.  It builds a small,
private network: a *server* namespace and a *client* namespace joined by one
veth pair, with client addresses from several IPv4 /24s and IPv6 /64s.
Conntrack is enabled in the server namespace only (an nft ``ct state`` rule),
so every entry there comes from the workload a test generates.  All traffic
stays between these namespaces; the guest has no network device.

Typical use::

    with Topology.create() as topo:
        server = topo.tcp_server()
        conns = topo.connect(topo.client_v4[0], 8, server)
        entries = conntrack_list(topo.server_ns)
        close_rst(conns)

Ground-truth readers parse ``conntrack -L -o extended``, ``conntrack -S``,
``conntrack -C`` and ``ss``.  No bcc here: tests that compile BPF do it once
per boot (each compile costs ~35 s under emulation).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import ipaddress
import itertools
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

CLONE_NEWNET = 0x40000000
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Client networks: the three IPv4 documentation /24s (RFC 5737).
CLIENT_NETS_V4 = ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24")
#: Client networks for IPv6 (RFC 3849 documentation prefix).
CLIENT_NETS_V6 = ("2001:db8:1::/64", "2001:db8:2::/64")
#: The server side of the veth (RFC 2544 benchmarking range; IPv6 doc prefix).
SERVER_V4 = "198.18.0.1"
SERVER_NET_V4 = "198.18.0.0/24"
SERVER_V6 = "2001:db8:ff::1"
SERVER_NET_V6 = "2001:db8:ff::/64"

_libc = ctypes.CDLL(None, use_errno=True)
_ns_counter = itertools.count()


class CommandError(RuntimeError):
    """A command of the toolkit failed; the message has its output."""


def run(cmd: Sequence[str], ns: Optional[str] = None, check: bool = True,
        input: Optional[str] = None, timeout: float = 60) -> str:
    """Run ``cmd`` (in network namespace ``ns`` if given); return its stdout."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    env = dict(os.environ, PATH=PATH)
    res = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise CommandError(f"{' '.join(argv)} exited {res.returncode}: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


# ---------------------------------------------------------------- namespaces


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Switch the *calling thread* into ``ns`` for the ``with`` body.

    Sockets created inside keep belonging to ``ns`` afterwards, which is how
    the connection helpers open client sockets without a subprocess.
    """
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({ns}): {os.strerror(e)}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns(back): {os.strerror(e)}")


def sysctl_get(name: str, ns: Optional[str] = None) -> str:
    """Read sysctl ``name`` (dotted form) in ``ns`` (None: the guest's own)."""
    return run(["sysctl", "-n", name], ns=ns).strip()


def sysctl_set(name: str, value: object, ns: Optional[str] = None) -> None:
    run(["sysctl", "-q", "-w", f"{name}={value}"], ns=ns)


@contextlib.contextmanager
def sysctls(values: Mapping[str, object], ns: Optional[str] = None) -> Iterator[None]:
    """Set sysctls for the ``with`` body and restore the old values after.

    Note ``net.netfilter.nf_conntrack_max`` is global and writable only with
    ``ns=None``; the timeouts are per namespace.
    """
    old: Dict[str, str] = {}
    try:
        for name, value in values.items():
            old[name] = sysctl_get(name, ns)
            sysctl_set(name, value, ns)
        yield
    finally:
        for name, value in old.items():
            sysctl_set(name, value, ns)


# ------------------------------------------------------------------ topology


@dataclasses.dataclass
class Conn:
    """One TCP connection: the client socket and the server's accepted socket."""

    client: socket.socket
    server: Optional[socket.socket]
    src: str
    sport: int
    dst: str
    dport: int

    @property
    def tuple(self) -> Tuple[str, str, int, int]:
        """Original-direction tuple as conntrack shows it: src, dst, sport, dport."""
        return (self.src, self.dst, self.sport, self.dport)


class TcpServer:
    """A listening socket in the server namespace that accepts in a thread.

    Accepted sockets stay open until a close helper or :meth:`close` ends
    them; they are keyed by the client's (address, port).
    """

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.ns, self.addr, self.port = ns, addr, port
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with in_netns(ns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.accepted: Dict[Tuple[str, int], socket.socket] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            try:
                s, peer = self.sock.accept()
            except (BlockingIOError, OSError):
                continue
            with self._cond:
                self.accepted[(peer[0], peer[1])] = s
                self._cond.notify_all()

    def take(self, src: str, sport: int, timeout: float = 10) -> socket.socket:
        """Wait for and remove the accepted socket of client (src, sport)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (src, sport) not in self.accepted:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"server never accepted {src}:{sport}")
                self._cond.wait(left)
            return self.accepted.pop((src, sport))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for s in self.accepted.values():
            s.close()
        self.accepted.clear()


class UdpSink:
    """A UDP socket in the server namespace that receives and never replies."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with in_netns(ns):
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.addr, self.port = addr, port

    def close(self) -> None:
        self.sock.close()


@dataclasses.dataclass
class Topology:
    """Two network namespaces joined by veth; conntrack on in ``server_ns``.

    ``client_v4``/``client_v6`` list one address per client network; add more
    with :meth:`add_client_ip`.  Use as a context manager (or call
    :meth:`destroy`) so namespaces and sockets go away.
    """

    server_ns: str
    client_ns: str
    server_v4: str = SERVER_V4
    server_v6: str = SERVER_V6
    client_v4: List[str] = dataclasses.field(default_factory=list)
    client_v6: List[str] = dataclasses.field(default_factory=list)
    client_dev: str = ""
    _servers: List[object] = dataclasses.field(default_factory=list)
    _conns: List[Conn] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, prefix: str = "ctl", nets_v4: Sequence[str] = CLIENT_NETS_V4,
               nets_v6: Sequence[str] = CLIENT_NETS_V6, conntrack: bool = True) -> "Topology":
        """Build the namespaces, veth, addresses, routes and nft rules."""
        n = next(_ns_counter)
        topo = cls(server_ns=f"{prefix}-srv{n}", client_ns=f"{prefix}-cli{n}")
        srv, cli = topo.server_ns, topo.client_ns
        vs, vc = f"vs{n}", f"vc{n}"
        try:
            for ns in (srv, cli):
                run(["ip", "netns", "add", ns])
                run(["ip", "link", "set", "lo", "up"], ns=ns)
                sysctl_set("net.ipv6.conf.all.accept_dad", 0, ns)
                sysctl_set("net.ipv6.conf.default.accept_dad", 0, ns)
            run(["ip", "link", "add", vs, "netns", srv, "type", "veth", "peer", "name", vc,
                 "netns", cli])
            run(["ip", "addr", "add", f"{SERVER_V4}/24", "dev", vs], ns=srv)
            run(["ip", "addr", "add", f"{SERVER_V6}/64", "dev", vs, "nodad"], ns=srv)
            for ns, dev in ((srv, vs), (cli, vc)):
                run(["ip", "link", "set", dev, "up"], ns=ns)
            run(["ip", "route", "add", SERVER_NET_V4, "dev", vc], ns=cli)
            run(["ip", "-6", "route", "add", SERVER_NET_V6, "dev", vc], ns=cli)
            topo.client_dev = vc
            for net in nets_v4:
                run(["ip", "route", "add", net, "dev", vs], ns=srv)
                topo.client_v4.append(topo.add_client_ip(_host(net, 10)))
            for net in nets_v6:
                run(["ip", "-6", "route", "add", net, "dev", vs], ns=srv)
                topo.client_v6.append(topo.add_client_ip(_host(net, 10)))
            if conntrack:
                nft_apply(srv, NFT_TRACK)
            run(["conntrack", "-F"], ns=srv, check=False)
        except BaseException:
            topo.destroy()
            raise
        return topo

    def add_client_ip(self, ip: str) -> str:
        """Add ``ip`` (inside one of the routed client networks) to the client."""
        plen = 64 if ":" in ip else 24
        extra = ["nodad"] if ":" in ip else []
        run(["ip", "addr", "add", f"{ip}/{plen}", "dev", self.client_dev, *extra],
            ns=self.client_ns)
        return ip

    def client_ips(self, net_index: int, count: int, first: int = 10, v6: bool = False) -> List[str]:
        """``count`` client addresses in network ``net_index``, added as needed."""
        nets = CLIENT_NETS_V6 if v6 else CLIENT_NETS_V4
        have = set(self.client_v6 if v6 else self.client_v4)
        out = []
        for i in range(count):
            ip = _host(nets[net_index], first + i)
            if ip not in have:
                self.add_client_ip(ip)
                (self.client_v6 if v6 else self.client_v4).append(ip)
            out.append(ip)
        return out

    def server_addr(self, v6: bool = False) -> str:
        return self.server_v6 if v6 else self.server_v4

    def tcp_server(self, port: int = 8080, v6: bool = False) -> TcpServer:
        """Listen on the server address; closed by :meth:`destroy`."""
        s = TcpServer(self.server_ns, self.server_addr(v6), port)
        self._servers.append(s)
        return s

    def udp_sink(self, port: int = 5353, v6: bool = False) -> UdpSink:
        s = UdpSink(self.server_ns, self.server_addr(v6), port)
        self._servers.append(s)
        return s

    def connect(self, src: str, n: int, server: TcpServer, timeout: float = 10) -> List[Conn]:
        """Open ``n`` TCP connections from ``src`` to ``server`` and hold them.

        Returns after the server accepted each one, so the three-way
        handshake is complete (conntrack ESTABLISHED + ASSURED).
        """
        conns = []
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        for _ in range(n):
            with in_netns(self.client_ns):
                c = socket.socket(family, socket.SOCK_STREAM)
            c.settimeout(timeout)
            c.bind((src, 0))
            c.connect((server.addr, server.port))
            sport = c.getsockname()[1]
            conn = Conn(c, None, src, sport, server.addr, server.port)
            conn.server = server.take(src, sport, timeout)
            conns.append(conn)
        self._conns.extend(conns)
        return conns

    def try_connect(self, src: str, n: int, server: TcpServer,
                    wait: float = 0.5) -> Tuple[List[Conn], List[socket.socket]]:
        """Start ``n`` non-blocking connects; after ``wait`` s split them.

        Returns (established conns, sockets still not connected).  The
        pending sockets are left in SYN_SENT: close them with
        :func:`abort_pending` promptly, or their SYNs are retransmitted.
        """
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        pending = []
        for _ in range(n):
            with in_netns(self.client_ns):
                c = socket.socket(family, socket.SOCK_STREAM)
            c.setblocking(False)
            c.bind((src, 0))
            err = c.connect_ex((server.addr, server.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            pending.append(c)
        time.sleep(wait)
        _, writable, _ = select.select([], pending, [], 0)
        done, stuck = [], []
        for c in pending:
            if c in writable and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                sport = c.getsockname()[1]
                conn = Conn(c, None, src, sport, server.addr, server.port)
                conn.server = server.take(src, sport)
                done.append(conn)
            else:
                stuck.append(c)
        self._conns.extend(done)
        return done, stuck

    def send_udp(self, src: str, n: int, sink: UdpSink, payload: bytes = b"x",
                 first_port: int = 0) -> List[Tuple[str, str, int, int]]:
        """Send one datagram from each of ``n`` fresh source ports; returns tuples. The
        kernel may hand out a port again that it just freed (the same tuple: no new
        entry); ``first_port`` makes them first_port, first_port + 1, ... instead."""
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        tuples = []
        for i in range(n):
            with in_netns(self.client_ns):
                s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((src, first_port + i if first_port else 0))
            s.sendto(payload, (sink.addr, sink.port))
            tuples.append((src, sink.addr, s.getsockname()[1], sink.port))
            s.close()
        return tuples

    def drop_fin_rst(self, enable: bool = True) -> None:
        """Drop TCP FIN and RST arriving at the server before conntrack sees them.

        An nft chain at raw priority (-300) on prerouting, ahead of
        conntrack (-200): entries stay ESTABLISHED though the client closed.
        """
        if enable:
            nft_apply(self.server_ns, NFT_DROP_FIN_RST)
        else:
            run(["nft", "delete", "table", "inet", "ctlab_drop"], ns=self.server_ns)

    def dropped_fin_rst(self) -> int:
        """Packets the :meth:`drop_fin_rst` rule dropped so far."""
        out = run(["nft", "list", "table", "inet", "ctlab_drop"], ns=self.server_ns)
        return sum(int(m) for m in re.findall(r"counter packets (\d+)", out))

    def destroy(self) -> None:
        for c in self._conns:
            for s in (c.client, c.server):
                if s is not None:
                    s.close()
        self._conns.clear()
        for s in self._servers:
            s.close()  # type: ignore[attr-defined]
        self._servers.clear()
        for ns in (self.client_ns, self.server_ns):
            run(["ip", "netns", "del", ns], check=False)

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _host(net: str, index: int) -> str:
    return str(ipaddress.ip_network(net)[index])


NFT_TRACK = """
table inet ctlab {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state new counter
    }
    chain output {
        type filter hook output priority 0; policy accept;
        ct state new counter
    }
}
"""

NFT_DROP_FIN_RST = """
table inet ctlab_drop {
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        tcp flags & (fin | rst) != 0 counter drop
    }
}
"""


def nft_apply(ns: Optional[str], ruleset: str) -> None:
    """Load an nft ruleset (``nft -f -``) in ``ns``."""
    run(["nft", "-f", "-"], ns=ns, input=ruleset)


# -------------------------------------------------------------------- closers


def close_fin(conns: Iterable[Conn]) -> None:
    """Clean close: client FIN first, then the server closes (client TIME_WAIT)."""
    conns = list(conns)
    for c in conns:
        c.client.close()
    for c in conns:
        if c.server is not None:
            c.server.settimeout(10)
            try:
                while c.server.recv(4096):
                    pass
            except OSError:
                pass
            c.server.close()


def close_rst(conns: Iterable[Conn]) -> None:
    """Abortive close: SO_LINGER 0 on the client sends RST."""
    conns = list(conns)
    for c in conns:
        c.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.client.close()
    for c in conns:
        if c.server is not None:
            c.server.close()


def close_client_only(conns: Iterable[Conn], rst: bool = False) -> None:
    """Close only the client side (FIN, or RST if ``rst``); the server keeps
    its socket.  With :meth:`Topology.drop_fin_rst` on, conntrack never
    learns of it."""
    for c in conns:
        if rst:
            c.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.client.close()


def abort_pending(socks: Iterable[socket.socket]) -> None:
    """Close sockets still in SYN_SENT (stops SYN retransmission)."""
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


# -------------------------------------------------------------------- readers


@dataclasses.dataclass(frozen=True)
class CtEntry:
    """One line of ``conntrack -L -o extended``."""

    family: str                 # "ipv4" / "ipv6"
    proto: str                  # "tcp", "udp", "icmp", ...
    timeout: int                # seconds left
    state: Optional[str]        # TCP state ("ESTABLISHED", ...) or None
    orig: Mapping[str, str]     # src, dst, sport, dport (or type/code/id)
    reply: Mapping[str, str]
    flags: FrozenSet[str]       # ASSURED, UNREPLIED, ...
    extra: Mapping[str, str]    # mark, use, zone, ...

    @property
    def tuple(self) -> Tuple[str, str, int, int]:
        """Original direction: (src, dst, sport, dport)."""
        o = self.orig
        return (o["src"], o["dst"], int(o.get("sport", 0)), int(o.get("dport", 0)))


def parse_conntrack_list(text: str) -> List[CtEntry]:
    """Parse ``conntrack -L -o extended`` output."""
    entries = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 6 or tok[0] not in ("ipv4", "ipv6"):
            continue
        family, proto = tok[0], tok[2]
        timeout = int(tok[4])
        rest = tok[5:]
        state = None
        if rest and "=" not in rest[0] and not rest[0].startswith("["):
            state, rest = rest[0], rest[1:]
        orig: Dict[str, str] = {}
        reply: Dict[str, str] = {}
        extra: Dict[str, str] = {}
        flags = set()
        cur = orig
        for t in rest:
            if t.startswith("[") and t.endswith("]"):
                flags.add(t[1:-1])
                continue
            k, _, v = t.partition("=")
            if k == "src" and orig:
                cur = reply
            if k in ("src", "dst", "sport", "dport", "type", "code", "id"):
                cur[k] = v
            else:
                extra[k] = v
        entries.append(CtEntry(family, proto, timeout, state, orig, reply, frozenset(flags),
                               extra))
    return entries


def conntrack_list(ns: Optional[str], family: Optional[str] = None) -> List[CtEntry]:
    """Entries of ``ns``'s table; ``family`` "ipv4"/"ipv6" filters (-f). Without it both
    families are asked for by name: conntrack 1.4.6 (Debian 11) lists IPv4 only by default."""
    if family is None:
        return conntrack_list(ns, "ipv4") + conntrack_list(ns, "ipv6")
    return parse_conntrack_list(run(["conntrack", "-L", "-o", "extended", "-f", family], ns=ns))


def parse_conntrack_stats(text: str) -> List[Dict[str, int]]:
    """Parse ``conntrack -S``: one dict per CPU line."""
    cpus = []
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        if "cpu" in fields:
            cpus.append({k: int(v) for k, v in fields.items()})
    return cpus


def conntrack_stats(ns: Optional[str]) -> Dict[str, int]:
    """``conntrack -S`` of ``ns`` summed over CPUs (keys as the kernel names them)."""
    total: Dict[str, int] = {}
    for cpu in parse_conntrack_stats(run(["conntrack", "-S"], ns=ns)):
        for k, v in cpu.items():
            if k != "cpu":
                total[k] = total.get(k, 0) + v
    return total


def conntrack_count(ns: Optional[str]) -> int:
    """``conntrack -C``: entries in ``ns``'s table."""
    return int(run(["conntrack", "-C"], ns=ns).strip())


def conntrack_flush(ns: Optional[str]) -> None:
    run(["conntrack", "-F"], ns=ns, check=False)


@dataclasses.dataclass(frozen=True)
class SockEntry:
    """One socket from ``ss -tanH`` / ``ss -uanH``."""

    state: str   # ss names: ESTAB, TIME-WAIT, FIN-WAIT-1, LISTEN, UNCONN...
    local: str
    lport: int
    peer: str
    pport: int


def _split_hostport(s: str) -> Tuple[str, int]:
    host, _, port = s.rpartition(":")
    host = host.strip("[]").split("%")[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return host, int(port) if port.isdigit() else 0


def parse_ss(text: str) -> List[SockEntry]:
    out = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 5:
            continue
        local, lport = _split_hostport(tok[3])
        peer, pport = _split_hostport(tok[4])
        out.append(SockEntry(tok[0], local, lport, peer, pport))
    return out


def sockets(ns: Optional[str], proto: str = "tcp") -> List[SockEntry]:
    """The socket table of ``ns`` (``ss -tanH``, or -u for udp)."""
    flag = {"tcp": "-tanH", "udp": "-uanH"}[proto]
    return parse_ss(run(["ss", flag], ns=ns))


def wait_for(pred, timeout: float = 10, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``pred()`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


# Probes whose runs make no entry counts (inserts, live entries, removals by reason): the
# socket one (orphan checks) and the conntrack TCP-state one (STATE records: a removal's
# reason comes from the state its own record carries).
NOT_COUNTING = {"sock", "tcp_state"}


def counting_programs(plan: dict) -> Callable[[str], bool]:
    """From a recording's plan (its header): whether a program's runs make entry counts,
    so that a run the kernel skipped may have taken one. A program the plan does not
    name is taken to make them (more slack, never a false failure)."""
    quiet = {prog for p in plan["probes"] if p["name"] in NOT_COUNTING for prog in p["programs"]}
    return lambda program: program not in quiet
