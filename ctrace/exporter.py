"""The HTTP side of `ctrace export`, kept apart from event consumption.

Two threads share one reference and nothing else:

- the **consumer** (the caller's thread) pumps the feed, takes a snapshot, turns it
  into metric families (`ctrace.views.export`), renders the exposition text with
  prometheus_client and publishes the bytes (plus a gzip copy) by swapping one
  reference: an immutable `Page`;
- the **server** thread answers scrapes from the latest page only. It is a single
  non-blocking `selectors` loop, not a thread per connection, so a client that
  sends half a request and waits, or sends a megabyte of headers, or garbage,
  costs one socket and a bounded buffer and never holds anything another scrape
  or the consumer needs. Every connection has a deadline; requests are capped at
  `MAX_REQUEST_BYTES`; when `max_connections` are open the oldest is dropped.
"""

import errno
import gzip
import ipaddress
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ctrace import libc
from ctrace.status import CtraceError, ExitStatus
from ctrace.views.export import COUNTER, Family

DEFAULT_PORT = 9737
MAX_REQUEST_BYTES = 16 * 1024  # request line + headers; more is answered 431 and closed
READ_DEADLINE_S = 5.0  # a whole request must arrive within this
WRITE_DEADLINE_S = 30.0  # a response must be taken within this
MAX_CONNECTIONS = 512
OUTCOMES = ("ok", "bad_request", "too_large", "timeout", "not_found", "method_not_allowed", "dropped_busy")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
THREAD_NAME = "ctrace-http"  # the server thread's name in `top -H`, ps and /proc/PID/task/*/comm
_PR_SET_NAME = 15


def parse_listen(text: str) -> Tuple[str, int]:
    """'ADDR:PORT', '[V6]:PORT' or 'PORT' (loopback) -> (addr, port)."""
    t = text.strip()
    try:
        if t.isdigit():
            host, port = "127.0.0.1", int(t)
        elif t.startswith("["):
            host, _, rest = t[1:].partition("]")
            if not rest.startswith(":"):
                raise ValueError
            port = int(rest[1:])
        else:
            host, _, p = t.rpartition(":")
            port = int(p)
        ipaddress.ip_address(host)
    except ValueError:
        raise CtraceError(f"--listen {text!r}: expected ADDR:PORT with a numeric address, e.g. 127.0.0.1:{DEFAULT_PORT} "
                          f"or [::1]:{DEFAULT_PORT}", ExitStatus.USAGE) from None
    if not 0 <= port <= 65535:
        raise CtraceError(f"--listen {text!r}: port out of range", ExitStatus.USAGE)
    return host, port


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def render(fams: Sequence[Family]) -> bytes:
    """Metric families -> Prometheus text exposition format, via prometheus_client."""
    try:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.exposition import generate_latest
    except ImportError:
        raise CtraceError("prometheus_client is not installed: install python3-prometheus-client", ExitStatus.ERROR) \
            from None
    metrics = []
    for f in fams:
        if f.kind == COUNTER:
            m = CounterMetricFamily(f.name[: -len("_total")] if f.name.endswith("_total") else f.name, f.help,
                                    labels=list(f.labels))
        else:
            m = GaugeMetricFamily(f.name, f.help, labels=list(f.labels))
        for values, v in f.samples:
            m.add_metric(list(values), v)
        metrics.append(m)

    class _Once:
        def collect(self):  # type: ignore[no-untyped-def]
            return metrics

    return bytes(generate_latest(_Once()))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Page:
    """One published rendering: never changed after it is made."""

    body: bytes
    gzipped: bytes
    made_at: float

    @classmethod
    def of(cls, body: bytes) -> "Page":
        return cls(body, gzip.compress(body, compresslevel=5), time.time())


_EMPTY = Page.of(b"# no snapshot published yet\n")


class _Conn:
    __slots__ = ("sock", "inbuf", "out", "deadline", "opened", "writing")

    def __init__(self, sock: socket.socket, now: float, deadline: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.opened = now
        self.deadline = deadline
        self.writing = False


class MetricsServer:
    """Serves the latest Page on /metrics from one background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, max_connections: int = MAX_CONNECTIONS,
                 read_deadline_s: float = READ_DEADLINE_S, write_deadline_s: float = WRITE_DEADLINE_S) -> None:
        self.page = _EMPTY
        self.max_connections = max_connections
        self.read_deadline_s = read_deadline_s
        self.write_deadline_s = write_deadline_s
        self.counts: Dict[str, int] = {o: 0 for o in OUTCOMES}  # written by the server thread only
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self._lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self._lsock.bind((host, port))
            self._lsock.listen(1024)
        except OSError as exc:
            self._lsock.close()
            raise CtraceError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitStatus.USAGE) from None
        self._lsock.setblocking(False)
        self.address: Tuple[str, int] = self._lsock.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._lsock, selectors.EVENT_READ, None)
        self._conns: Dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    def publish(self, page: Page) -> None:
        self.page = page  # one reference swap: readers see the old page or the new one

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        for c in list(self._conns.values()):
            self._drop(c)
        for s in (self._lsock, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    # ---------------------------------------------------------------- loop
    def _loop(self) -> None:
        _name_os_thread(THREAD_NAME)
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0.5)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            now = time.monotonic()
            accept = False
            for key, mask in events:
                if key.data is None:
                    accept = True  # after the reads: requests already here are answered first
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(64)
                    except OSError:
                        pass
                else:
                    c = key.data
                    try:
                        if mask & selectors.EVENT_READ and not c.writing:
                            self._read(c)
                        elif mask & selectors.EVENT_WRITE and c.writing:
                            self._write(c)
                    except OSError:
                        self._drop(c)
            if accept:
                self._accept(now)
            for c in [c for c in self._conns.values() if now > c.deadline]:
                if not c.writing:
                    self.counts["timeout"] += 1
                self._drop(c)

    def _accept(self, now: float) -> None:
        # A few at a time, so a connection accepted now has its request read before a
        # flood of newer ones can make it the oldest and get it dropped.
        for _ in range(max(1, min(16, self.max_connections // 4))):
            try:
                sock, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: try again on the next wakeup
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections:
                oldest = min(self._conns.values(), key=lambda c: (c.writing, c.opened))
                self.counts["dropped_busy"] += 1
                self._drop(oldest)
            c = _Conn(sock, now, now + self.read_deadline_s)
            self._conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _read(self, c: _Conn) -> None:
        chunk = c.sock.recv(65536)
        if not chunk:
            self._drop(c)
            return
        c.inbuf += chunk
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = c.inbuf.find(b"\n\n")
        if end < 0 or end > MAX_REQUEST_BYTES:
            if len(c.inbuf) > MAX_REQUEST_BYTES:
                self._respond(c, "too_large", 431, "Request Header Fields Too Large", b"request too large\n")
            return
        self._answer(c, bytes(c.inbuf[:end]))

    def _answer(self, c: _Conn, head: bytes) -> None:
        lines = head.replace(b"\r\n", b"\n").split(b"\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            self._respond(c, "bad_request", 400, "Bad Request", b"bad request\n")
            return
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._respond(c, "method_not_allowed", 405, "Method Not Allowed", b"GET only\n", extra="Allow: GET, HEAD\r\n")
            return
        if path == b"/metrics":
            page = self.page
            gz = any(ln.split(b":", 1)[0].strip().lower() == b"accept-encoding" and b"gzip" in ln.split(b":", 1)[-1].lower()
                     for ln in lines[1:])
            body = page.gzipped if gz else page.body
            self._respond(c, "ok", 200, "OK", body, ctype=CONTENT_TYPE, head_only=method == b"HEAD",
                          extra="Content-Encoding: gzip\r\n" if gz else "")
        elif path == b"/":
            self._respond(c, "ok", 200, "OK", b'<html><body><a href="/metrics">ctrace metrics</a></body></html>\n',
                          ctype="text/html", head_only=method == b"HEAD")
        else:
            self._respond(c, "not_found", 404, "Not Found", b"not found: try /metrics\n")

    def _respond(self, c: _Conn, outcome: str, code: int, reason: str, body: bytes, ctype: str = "text/plain",
                 head_only: bool = False, extra: str = "") -> None:
        self.counts[outcome] += 1
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n").encode()
        c.out = memoryview(head + (b"" if head_only else body))
        c.inbuf = bytearray()
        c.writing = True
        c.deadline = time.monotonic() + self.write_deadline_s
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        c.out = c.out[n:]
        if not len(c.out):
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(c)

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0 and self._conns.get(fd) is c:
            del self._conns[fd]
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the kernel too (Python before 3.14 names it only for
    itself), so an operator can tell the server thread from the consumer."""
    prctl = libc.function("prctl")
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def server_families(server: MetricsServer) -> List[Family]:
    """The exporter's own series: requests by outcome, open connections."""
    counts = dict(server.counts)
    return [
        Family("ctrace_exporter_requests_total", COUNTER, "HTTP requests to the exporter by outcome (as of the "
               "previous publication).", ("outcome",), tuple(((o,), float(counts[o])) for o in OUTCOMES)),
    ]


class Publisher:
    """The consumer side: snapshot -> families -> page, published to the server."""

    def __init__(self, server: MetricsServer, make_families: Callable[[], List[Family]]) -> None:
        self.server = server
        self.make_families = make_families
        self.last: List[Family] = []
        self.publications = 0
        self.render_seconds = 0.0

    def refresh(self, resnapshot: bool = True) -> None:
        t0 = time.monotonic()
        if resnapshot or not self.last:
            self.last = self.make_families()
        self.server.publish(Page.of(render(self.last + server_families(self.server))))
        self.render_seconds = time.monotonic() - t0
        self.publications += 1
