"""Helpers for doctor's host tests: analyse a tree or bundle in-process, and run
doctor through `ctrace.cli.main` (no subprocess, no root, no BPF)."""

import io
import json
from typing import Any, Dict, List, Tuple

from ctrace.doctor.analyze import analyze
from ctrace.doctor.inputs import open_root
from ctrace.doctor.model import Report
from ctrace.doctor.snapshot import load
from ctrace.env import Environment


def report_of(path: Any) -> Report:
    inp = open_root(str(path))
    try:
        return analyze(load(inp))
    finally:
        inp.close()


def ids(report: Report) -> List[Tuple[str, str]]:
    return sorted((f.id, f.severity.value) for f in report.findings)


def finding(report: Report, fid: str):  # type: ignore[no-untyped-def]
    got = [f for f in report.findings if f.id == fid]
    assert len(got) == 1, f"expected one {fid}, got {[f.id for f in report.findings]}"
    return got[0]


def run_cli(argv: List[str]) -> Tuple[int, str, str]:
    from ctrace.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, Environment(stdout=out, stderr=err, environ={}))
    return int(rc), out.getvalue(), err.getvalue()


def run_json(argv: List[str]) -> Tuple[int, Dict[str, Any]]:
    rc, out, err = run_cli(argv + ["--json"])
    assert err == "", err
    return rc, json.loads(out)
