"""The bundled real recording (ctrace/data/incident-6.1.ctr) reads cleanly and shows its incident.

Made in the lab on Debian 12's kernel by tests/kernel/incident/make_incident.py (see
ctrace/data/README.md); the numbers below are what that run generated and what
conntrack-tools reported at its end (ctrace/data/incident-6.1.truth.json).
"""

import json
import os

from ctrace import abi
from ctrace.recording import read
from tests.unit.conftest import ROOT, run_cli

DATA = os.path.join(ROOT, "ctrace", "data")
REC = os.path.join(DATA, "incident-6.1.ctr")
WEB, FLOOD, HEALTHY = "198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24"


def truth():
    with open(os.path.join(DATA, "incident-6.1.truth.json")) as f:
        return json.load(f)


def report():
    status, out, err = run_cli(["report", "--json", "--top", "50", REC])
    assert status == 0 and err == "", err
    return json.loads(out)


def test_reads_cleanly_and_is_real():
    rec = read(REC)
    assert rec.complete and not rec.damage and not rec.skipped_chunks
    assert rec.trailer["stopped_by"] == {"signal": "SIGTERM"}
    assert set(rec.trailer["lost_bpf"].values()) == {0}
    assert not rec.info.synthetic
    assert rec.info.kernel == "6.1.0-56-amd64"
    assert rec.info.sysctls["nf_conntrack_max"] == 200
    assert rec.info.sysctls["nf_conntrack_tcp_timeout_established"] == 432000
    functions = {p["function"] for p in rec.info.probes}
    assert {"__nf_conntrack_confirm", "nf_ct_delete"} <= functions
    assert len(rec.existing) == 6 and (rec.existing["kind"] == abi.Kind.EXISTING).all()
    assert os.path.getsize(REC) < 2 << 20


def test_report_shows_the_incident():
    r, t = report(), truth()
    assert r["source"]["kernel"].startswith("6.1.") and r["source"]["synthetic"] is False
    assert r["events"]["total"] == 1169 and r["events"]["lost"] == 0
    assert r["events"]["by_kind"] == {"existing": 6, "new": 205, "destroy": 11, "state": 449, "drop": 300,
                                      "orphan": 90, "counter": 108}
    table = r["table"]
    # the table reached its max, and the kernel's own count says so too
    assert (table["max"], table["start_count"], table["peak_count"], table["end_count"]) == (200, 6, 200, 200)
    assert table["kernel_count"] == 200 == t["conntrack_C"] == t["conntrack_L"] == t["table_max"]
    assert t["existing_at_start"] == table["start_count"]

    # orphans: every web client connection whose RST was lost, none elsewhere
    assert r["orphans_total"] == 90 == t["orphaned_per_24"][WEB] == t["nft_lost_fin_rst"]
    assert r["orphans_by_kind"] == {"socket-closed": 90, "expired-established": 0}
    prefixes = {p["prefix"]: p for p in r["prefixes"]}
    assert {k: p["orphans"] for k, p in prefixes.items()} == {WEB: 90, FLOOD: 0, HEALTHY: 0}
    web_ips = [i for i in r["ips"] if i["ip"].startswith("198.51.100.")]
    assert len(web_ips) == 6 and {i["orphans"] for i in web_ips} == {15}

    # drops: all table-full, equal to conntrack -S, most under the flooding /24
    assert r["drops_by_reason"] == {"table-full": 300}
    assert t["conntrack_S_delta"]["drop"] == 300 and t["conntrack_S_delta"]["early_drop"] == 0
    assert {k: p["drops"] for k, p in prefixes.items()} == {FLOOD: 282, WEB: 18, HEALTHY: 0}
    assert r["prefixes"][0]["prefix"] == FLOOD
    assert {d["ip"] for d in r["drops"]} == {f"203.0.113.{i}" for i in range(10, 34)} | \
        {"198.51.100.10", "198.51.100.11", "198.51.100.12"}

    # who holds the table, per /24, equals conntrack -L at the end; created equals generated
    assert {k: p["live"] for k, p in prefixes.items()} == t["conntrack_L_per_24"] == {FLOOD: 103, WEB: 90, HEALTHY: 7}
    assert {k: p["created"] for k, p in prefixes.items()} == {FLOOD: 103, WEB: 90, HEALTHY: 12}
    gen = t["generated_per_24"]
    assert (gen[FLOOD], gen[WEB], gen[HEALTHY]) == (103, 90, 12 + 6)
    # the healthy clients' TIME_WAIT entries went long before their 120 s timeout while the table was
    # full (most likely the gc worker's eviction above 95 % of max, which conntrack -S does not count)
    assert r["removals"] == {"fin": 11} and prefixes[HEALTHY]["destroyed"] == 11


def test_replays_to_a_full_table():
    status, out, err = run_cli(["replay", "--fast", "--interval", "4", "--rows", "5", "--group", "prefix", REC])
    assert status == 0, err
    frames = out.split("ctrace ctrace-lab ")[1:]
    assert len(frames) == 5
    assert "entries 40/200" in frames[0] and "entries 200/200 100.0%  ttf FULL" in frames[-1]
    assert "drops 300  orphans 90" in frames[-1]
    assert "SYNTHETIC" not in out.upper()


def test_shipped_in_the_wheel():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert '"ctrace" = ["data/*.ctr", "data/*.json", "data/README.md"]' in text
