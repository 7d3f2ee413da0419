"""A real Prometheus (Debian's `prometheus`, on loopback, temporary storage) scrapes
`ctrace export --replay FILE --replay-speed fast`; PromQL answers equal `ctrace report --json`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from ctrace.model import REMOVAL_REASONS
from tests.unit.conftest import run_cli
from tests.unit.export.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed")
pytest.importorskip("prometheus_client")


def start_exporter(path, tmp_path, *extra):
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-m", "ctrace", "export", "--replay", path, "--listen", "127.0.0.1:0",
                          "--ready-file", str(ready), "--interval", "0.5", *extra],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "exporter never ready"
        time.sleep(0.1)
    url = ready.read_text().strip()
    return p, urllib.parse.urlsplit(url).netloc


def start_prometheus(tmp_path, target):
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                   "scrape_configs:\n  - job_name: ctrace\n    static_configs:\n"
                   f"      - targets: ['{target}']\n")
    log = open(tmp_path / "prometheus.log", "w")
    p = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                         stdout=log, stderr=subprocess.STDOUT)
    return p, f"http://127.0.0.1:{port}"


def query(base, promql):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def scalar(base, promql):
    res = query(base, promql)
    assert len(res) == 1, (promql, res)
    return float(res[0]["value"][1])


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.parametrize("scenario", ["syn-flood", "lost-fin"])
def test_promql_equals_report(recordings, tmp_path, scenario):
    path = recordings[scenario]
    status, out, err = run_cli(["report", "--json", path])
    assert status == 0, err
    rep = json.loads(out)
    exporter, target = start_exporter(path, tmp_path, "--replay-speed", "fast")
    prom = None
    try:
        prom, base = start_prometheus(tmp_path, target)
        deadline = time.monotonic() + 60
        while True:
            try:
                if query(base, 'up{job="ctrace"} == 1') and query(base, "ctrace_inserts_total"):
                    break
            except OSError:
                pass
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        t = rep["table"]
        assert scalar(base, "ctrace_entries") == t["end_count"]
        assert scalar(base, "ctrace_entries_max") == t["max"]
        assert scalar(base, "ctrace_inserts_total") == rep["events"]["by_kind"].get("new", 0)
        assert scalar(base, "ctrace_events_total") == rep["events"]["total"]
        assert scalar(base, "sum(ctrace_events_lost_total)") == rep["events"]["lost"]
        for reason in REMOVAL_REASONS:
            assert scalar(base, f'ctrace_removals_total{{reason="{reason}"}}') == rep["removals"].get(reason, 0)
        for kind, n in rep["orphans_by_kind"].items():
            assert scalar(base, f'ctrace_orphans_total{{kind="{kind}"}}') == n
        for reason in ("table-full", "insert-failed"):
            assert scalar(base, f'ctrace_drops_total{{reason="{reason}"}}') == rep["drops_by_reason"].get(reason, 0)
        assert scalar(base, "ctrace_insert_rate_per_second") == pytest.approx(t["insert_rate_per_s"], abs=1e-3)
        for row in rep["netns"]:
            ns = row["netns"]
            assert scalar(base, f'ctrace_netns_entries{{netns="{ns}"}}') == row["live"]
            assert scalar(base, f'ctrace_netns_inserts_total{{netns="{ns}"}}') == row["created"]
            assert scalar(base, f'sum(ctrace_netns_removals_total{{netns="{ns}"}})') == row["destroyed"]
        assert scalar(base, "sum(ctrace_netns_entries)") == t["end_count"]
        assert scalar(base, "count(ctrace_ip_entries)") == 21
        biggest = max((r for r in rep["ips"]), key=lambda r: (r["live"], r["created"]))
        got = query(base, "topk(1, ctrace_ip_entries{ip!=\"other\"})")
        assert float(got[0]["value"][1]) == biggest["live"]
        assert scalar(base, "count({__name__=~\"ctrace_.*\"})") < 2600
    finally:
        if prom is not None:
            stop(prom)
        stop(exporter)
    assert exporter.returncode == 0, exporter.stderr.read() if exporter.stderr else ""


def test_scrapes_under_attack_while_replaying(recordings, tmp_path):
    """Replay at 60x while clients hold half requests, send 1 MB headers and garbage:
    Prometheus's every scrape succeeds, and no counter ever goes down (no resets)."""
    import socket
    import threading

    exporter, target = start_exporter(recordings["nat-churn"], tmp_path, "--replay-speed", "60")
    host, port = target.rsplit(":", 1)
    stop_attack = threading.Event()

    def attack():
        held = []
        while not stop_attack.is_set():
            for data in (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * (1 << 20),
                         b"\x00\xff" * 512 + b"\r\n\r\n"):
                try:
                    s = socket.create_connection((host, int(port)), timeout=1)
                    s.sendall(data)
                    held.append(s)
                except OSError:
                    pass
            while len(held) > 200:
                held.pop(0).close()
            time.sleep(0.01)
        for s in held:
            s.close()

    prom = None
    attacker = threading.Thread(target=attack, daemon=True)
    try:
        prom, base = start_prometheus(tmp_path, target)
        attacker.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if query(base, 'up{job="ctrace"}'):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        time.sleep(11)
        ups = query(base, 'count_over_time(up{job="ctrace"}[1m])')
        assert ups and float(ups[0]["value"][1]) >= 8, ups
        assert scalar(base, 'min_over_time(up{job="ctrace"}[1m])') == 1
        assert scalar(base, 'max_over_time(scrape_duration_seconds{job="ctrace"}[1m])') < 1.0
        names = [r["metric"]["__name__"] for r in query(base, 'count by (__name__) ({__name__=~"ctrace_.*_total"})')]
        assert "ctrace_inserts_total" in names and "ctrace_netns_removals_total" in names
        for name in names:
            resets = query(base, f"resets({name}[1m]) > 0")
            assert resets == [], (name, resets)
        assert scalar(base, 'increase(ctrace_inserts_total[1m])') > 0
        print("\nscrape duration under attack, max over 1m: "
              f"{scalar(base, 'max_over_time(scrape_duration_seconds[1m])') * 1000:.1f} ms; "
              f"requests by outcome: {[(r['metric']['outcome'], r['value'][1]) for r in query(base, 'ctrace_exporter_requests_total')]}")
    finally:
        stop_attack.set()
        attacker.join(10)
        if prom is not None:
            stop(prom)
        stop(exporter)
