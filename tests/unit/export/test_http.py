"""The HTTP side: slow, partial, huge and malformed requests never stop other scrapes."""

import gzip
import http.client
import socket
import threading
import time

import pytest

from ctrace.exporter import MetricsServer, Page, is_loopback, parse_listen
from ctrace.status import CtraceError

BODY = b"# TYPE ctrace_entries gauge\nctrace_entries 42.0\n"


@pytest.fixture
def server():
    s = MetricsServer("127.0.0.1", 0, max_connections=64, read_deadline_s=2.0).start()
    s.publish(Page.of(BODY))
    yield s
    s.close()


def scrape(server, gz=False, timeout=2.0):
    c = http.client.HTTPConnection(*server.address, timeout=timeout)
    try:
        c.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if gz else {})
        r = c.getresponse()
        body = r.read()
        return r.status, gzip.decompress(body) if r.getheader("Content-Encoding") == "gzip" else body
    finally:
        c.close()


def raw(server, data: bytes, read=True, timeout=3.0, attack=False) -> bytes:
    try:
        s = socket.create_connection(server.address, timeout=timeout)
    except OSError:
        if attack:
            return b""
        raise
    with s:
        try:
            s.sendall(data)
        except OSError:
            pass
        if not read:
            return b""
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
        return out


def test_serves_the_published_page(server):
    assert scrape(server) == (200, BODY)
    assert scrape(server, gz=True) == (200, BODY)
    server.publish(Page.of(b"ctrace_entries 43.0\n"))
    assert scrape(server)[1] == b"ctrace_entries 43.0\n"
    assert raw(server, b"HEAD /metrics HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")
    assert raw(server, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert raw(server, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")


@pytest.mark.parametrize("data, status", [
    (b"\x00\xff\xfe garbage \x16\x03\x01\r\n\r\n", b"400"),
    (b"GET\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/9.9 extra\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", b"431"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 100, b"431"),  # a TLS hello, endless
])
def test_malformed_requests_get_an_error_and_a_close(server, data, status):
    reply = raw(server, data)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:80]
    assert scrape(server) == (200, BODY)


def test_scrapes_go_on_under_attack(server):
    """50 clients hold half a request open, one trickles a byte a second, one streams
    a megabyte of header, one sends garbage in a loop, and 600 connections are opened
    and left idle (more than max_connections): every scrape meanwhile succeeds fast."""
    stop = threading.Event()
    held = []
    for _ in range(50):
        s = socket.create_connection(server.address)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        held.append(s)

    def trickle():
        with socket.create_connection(server.address, timeout=5) as s:
            for b in b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 100:
                if stop.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.2)

    def huge():
        while not stop.is_set():
            raw(server, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20), read=False, attack=True)

    def garbage():
        while not stop.is_set():
            raw(server, b"\xde\xad\xbe\xef" * 100 + b"\r\n\r\n", read=True, timeout=1, attack=True)

    def idle():
        socks = []
        for _ in range(600):
            if stop.is_set():
                break
            try:
                socks.append(socket.create_connection(server.address, timeout=1))
            except OSError:
                pass
        stop.wait()
        for s in socks:
            s.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (trickle, huge, garbage, idle)]
    for t in threads:
        t.start()
    latencies = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            assert scrape(server, timeout=2) == (200, BODY)
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for s in held:
            s.close()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"\n{len(latencies)} scrapes under attack: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms; outcomes {server.counts}")
    assert len(latencies) > 20 and latencies[-1] < 1.0
    assert server.counts["too_large"] > 0 and server.counts["bad_request"] > 0
    assert server.counts["dropped_busy"] > 0


def test_a_held_request_is_closed_at_its_deadline(server):
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server, no answer
        assert 1.5 < time.monotonic() - t0 < 4.0
    assert server.counts["timeout"] == 1


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9737") == ("127.0.0.1", 9737)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen("9000") == ("127.0.0.1", 9000)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    for bad in ("localhost:80", "1.2.3.4", "[::1]9", "1.2.3.4:99999", ""):
        with pytest.raises(CtraceError):
            parse_listen(bad)
