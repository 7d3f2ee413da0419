"""Synthetic scenario -> recording -> `ctrace report --json` equals the scenario's ground truth."""

import ipaddress
import json
from collections import Counter, defaultdict

import pytest

from ctrace.sources import synthetic

SCENARIO_EVENTS = {"lost-fin": 40_000, "syn-flood": 45_000, "nat-churn": 40_000}


def _prefix(ip: str) -> str:
    net = ipaddress.ip_network(f"{ip}/{24 if ':' not in ip else 64}", strict=False)
    return str(net)


@pytest.fixture(scope="module", params=sorted(SCENARIO_EVENTS))
def scenario(request, tmp_path_factory):
    from tests.unit.conftest import run_cli

    name = request.param
    path = str(tmp_path_factory.mktemp(name) / f"{name}.ctr")
    status, _, err = run_cli(["synth", name, "-o", path, "--events", str(SCENARIO_EVENTS[name]), "--seed", "7"])
    assert status == 0, err
    info, _, _ = synthetic.generate(name, seed=7, events=SCENARIO_EVENTS[name])
    status, out, err = run_cli(["report", "--json", "--max-keys", "100000", path])
    assert status == 0, err
    return name, info.extra["ground_truth"], json.loads(out)


def test_schema_and_source(scenario):
    name, truth, rep = scenario
    assert rep["schema"] == "ctrace.report/1"
    assert rep["source"]["synthetic"] is True
    assert rep["source"]["scenario"] == name
    assert rep["source"]["duration_s"] == synthetic.SCENARIOS[name].duration_s


def test_table_counts(scenario):
    _, truth, rep = scenario
    for k in ("start_count", "end_count", "peak_count"):
        assert rep["table"][k] == truth["table"][k], k
    d = rep["source"]["duration_s"]
    assert rep["table"]["net_growth_per_s"] == round((truth["table"]["end_count"] - truth["table"]["start_count"]) / d, 3)
    assert rep["table"]["insert_rate_per_s"] == round(truth["events_by_kind"].get("new", 0) / d, 3)
    assert rep["table"]["expire_rate_per_s"] == round(truth["events_by_kind"].get("destroy", 0) / d, 3)


def test_events_removals_orphans(scenario):
    _, truth, rep = scenario
    assert rep["events"]["by_kind"] == truth["events_by_kind"]
    assert rep["events"]["total"] == sum(truth["events_by_kind"].values())
    assert rep["events"]["lost"] == 0
    assert rep["removals"] == truth["removals"]
    assert rep["orphans_by_kind"] == truth["orphans_by_kind"]


def test_every_address_exact(scenario):
    _, truth, rep = scenario
    fields = ("live", "created", "destroyed", "orphans", "drops", "states")
    got = {(r["ip"], r["netns"]): {f: r[f] for f in fields} for r in rep["ips"]}
    want = {(r["ip"], r["netns"]): {f: r[f] for f in fields} for r in truth["ips"]}
    assert got == want
    lives = [r["live"] for r in rep["ips"]]
    assert lives == sorted(lives, reverse=True)


def test_every_prefix_exact(scenario):
    _, truth, rep = scenario
    want = defaultdict(lambda: {"live": 0, "created": 0, "destroyed": 0, "orphans": 0, "drops": 0, "states": Counter()})
    for r in truth["ips"]:
        w = want[(_prefix(r["ip"]), r["netns"])]
        for f in ("live", "created", "destroyed", "orphans", "drops"):
            w[f] += r[f]
        w["states"].update(r["states"])
    want = {k: dict(v, states={s: n for s, n in v["states"].items() if n}) for k, v in want.items()}
    got = {(r["prefix"], r["netns"]): {f: r[f] for f in ("live", "created", "destroyed", "orphans", "drops", "states")} for r in rep["prefixes"]}
    assert got == want


def test_drops_by_source(scenario):
    _, truth, rep = scenario
    assert {(d["ip"], d["netns"]): d["count"] for d in rep["drops"]} == {(d["ip"], d["netns"]): d["count"] for d in truth["drops_by_ip"]}


def test_mixed_families_and_netns(scenario):
    _, truth, rep = scenario
    assert len({r["netns"] for r in rep["ips"]}) >= 1
    assert any(":" in r["ip"] for r in rep["ips"]) and any(":" not in r["ip"] for r in rep["ips"])


def test_scenarios_have_what_they_promise(scenario):
    name, truth, rep = scenario
    if name == "lost-fin":
        assert rep["orphans_by_kind"]["socket-closed"] > 100
        assert len({r["netns"] for r in rep["ips"]}) == 2
        top = rep["prefixes"][0]["prefix"]
        assert top in ("203.0.113.0/24", "2001:db8:2::/64")
    if name == "syn-flood":
        assert rep["table"]["peak_count"] == rep["table"]["max"] == 8192
        assert rep["removals"]["early-drop"] > 0 and rep["drops_by_reason"]["table-full"] > 0
        flood = sum(d["count"] for d in rep["drops"] if ipaddress.ip_address(d["ip"]) in ipaddress.ip_network("192.0.2.0/24"))
        assert flood > 0.8 * rep["drops_by_reason"]["table-full"]  # the flood is refused most, but everyone suffers
    if name == "nat-churn":
        assert len({r["netns"] for r in rep["ips"]}) == 3
        assert rep["removals"]["timeout-established"] > 0 and rep["removals"]["delete"] > 0
