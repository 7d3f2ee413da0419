"""Bundles collected on real kernels (by tests/kernel/doctor in a lab guest, or in
a network namespace on a real host) analysed here, on the host. data/<kernel>/
holds, per scenario, the bundle (<scenario>.tgz), the live `doctor --json` run on
that kernel (.live.json) and the guest's own `--root` analysis of the bundle
(.bundle.json). The host must find what the live run found (ids, severities; the
numbers of a static scenario), and exactly what the guest computed from the same
bundle (every number; the wording may have improved since)."""

import json
from pathlib import Path
from typing import Any, Dict

import pytest
from doctor_helpers import run_json

DATA = Path(__file__).resolve().parent / "data"
CASES = sorted(DATA.glob("*/*.tgz"))

# evidence that does not depend on when it was read (idle ages grow between the reads)
STABLE = {
    "orphaned-established": ("orphaned_total",),
    "table-near-full": ("count", "max", "fill_percent", "recommended_max"),
    "packets-dropped": (),  # SYN retransmissions keep counting between the two reads
    "early-drop": ("early_drop",),
    "insert-failed": ("insert_failed",),
    "conntrack-unneeded": ("ruleset_sources", "rules_examined", "count"),
    "established-timeout-long": ("timeout_s", "recommended_s"),
}


def _by_id(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {f["id"]: f for f in doc["findings"]}


@pytest.mark.parametrize("bundle", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_bundle_from_a_real_kernel_matches_its_live_run(bundle: Path) -> None:
    live = json.loads(bundle.with_suffix(".live.json").read_text())
    rc, doc = run_json(["doctor", "--root", str(bundle)])
    assert rc == doc["exit_code"]
    got, want = _by_id(doc), _by_id(live)
    if live.get("rules_version") != doc["rules_version"]:
        # recorded under other rules (thresholds, severities): only which findings fire must agree
        assert set(got) == set(want)
        return
    assert rc == live["exit_code"]
    assert {k: v["severity"] for k, v in got.items()} == {k: v["severity"] for k, v in want.items()}
    for fid, f in want.items():
        for key in STABLE.get(fid, ()):
            assert got[fid]["evidence"][key] == f["evidence"][key], (fid, key)
    if "orphaned-established" in want:
        strip = [{k: a[k] for k in ("ip", "conntrack_established", "sockets_established", "orphaned", "peers")}
                 for a in want["orphaned-established"]["evidence"]["addresses"]]
        assert [{k: a[k] for k in strip[0]} for a in got["orphaned-established"]["evidence"]["addresses"]] == strip
    assert doc["source"]["kind"] == "bundle" and doc["source"]["kernel"] == live["source"]["kernel"]
    guest = json.loads(bundle.with_suffix(".bundle.json").read_text())
    for key in ("status", "exit_code", "missing", "checks"):
        assert doc[key] == guest[key], key
    # numbers, not wording (texts may have improved since the fixture was recorded);
    # keys added to evidence or tables since then are allowed (schema: additions only)
    assert [(f["id"], f["severity"]) for f in doc["findings"]] == [(f["id"], f["severity"]) for f in guest["findings"]]
    for got_f, want_f in zip(doc["findings"], guest["findings"]):
        want_ev = {k: v for k, v in want_f["evidence"].items() if k != "basis"}  # free text in early fixtures
        assert_subset(want_ev, got_f["evidence"], got_f["id"])
    assert_subset(guest["tables"], doc["tables"], "tables")


def assert_subset(want: Any, got: Any, where: str) -> None:
    """`got` has everything `want` has (dict keys may be added), with equal values."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for k, v in want.items():
            assert k in got, f"{where}.{k} missing"
            assert_subset(v, got[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (w, g) in enumerate(zip(want, got)):
            assert_subset(w, g, f"{where}[{i}]")
    else:
        assert want == got, (where, want, got)


def test_there_are_real_kernel_bundles() -> None:
    from ctrace.doctor.model import RULES_VERSION

    assert len(CASES) >= 3
    current = [p for p in CASES if json.loads(p.with_suffix(".live.json").read_text()).get("rules_version") == RULES_VERSION]
    assert len(current) >= 3, "refresh the fixtures under the current rules (data/README.md)"
