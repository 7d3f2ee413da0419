"""The command line: JSON schema ctrace.doctor/1, exit statuses, text output, and a
run against this machine (whatever it has: no root, BPF or conntrack required)."""

import json
import os
import stat
from pathlib import Path

from doctor_helpers import run_cli, run_json
from doctor_tree import NFT_STATEFUL, Tree, ct_tcp

from ctrace.doctor.model import SCHEMA

FINDING_KEYS = {"id", "severity", "title", "detail", "evidence", "recommendation"}


def check_schema(doc: dict) -> None:
    assert doc["schema"] == SCHEMA == "ctrace.doctor/1"
    assert doc["rules_version"] >= 1
    assert set(doc) >= {"schema", "ctrace_version", "rules_version", "source", "status", "exit_code", "findings", "missing",
                        "checks", "notes", "tables"}
    assert doc["status"] in ("ok", "warning", "critical", "incomplete")
    assert {"ok": 0, "warning": 20, "critical": 21, "incomplete": 22}[doc["status"]] == doc["exit_code"]
    assert doc["source"]["kind"] in ("live", "directory", "bundle")
    for f in doc["findings"]:
        assert set(f) == FINDING_KEYS
        assert f["severity"] in ("info", "warning", "critical")
        assert isinstance(f["evidence"], dict) and f["title"] and f["detail"]
        rec = f["recommendation"]
        assert set(rec) == {"text", "commands", "tradeoff"} and rec["text"] and rec["tradeoff"]
        assert all(isinstance(c, str) for c in rec["commands"])
    for m in doc["missing"]:
        assert set(m) == {"input", "reason", "needed_for"} and m["reason"]
    for c in doc["checks"]:
        assert set(c) == {"name", "ran", "reason"}
    json.dumps(doc)  # round-trips


def test_json_schema_and_text_agree(tree: Tree) -> None:
    lines = [ct_tcp("10.0.0.99", "10.0.0.1", 30000 + k, 443, remaining=431000) for k in range(20)]
    tree.base(count=95, max=100, buckets=100).stat([{"drop": 3}]).local(["10.0.0.1"]).sockets([]).table(lines)
    tree.ruleset(nft=NFT_STATEFUL)
    rc, doc = run_json(["doctor", "--root", str(tree.root)])
    check_schema(doc)
    assert rc == 21 and doc["source"] == {"kind": "directory", "path": str(tree.root), "hostname": None,
                                          "kernel": None, "collected_at": None}
    rc2, text, err = run_cli(["doctor", "--root", str(tree.root), "--top", "3"])
    assert rc2 == 21 and err == ""
    assert text.startswith(f"ctrace doctor: tree {tree.root}\n")
    assert "status: critical (exit 21)" in text
    for f in doc["findings"]:
        assert f"{f['severity'].upper():8} {f['id']}: " in text
        for cmd in f["recommendation"]["commands"]:
            assert f"$ {cmd}" in text
    body = text.splitlines()[1:]  # the first line holds the tree's path
    assert max(len(line) for line in body if not line.lstrip().startswith("$")) <= 80


def test_this_machine(tmp_path: Path) -> None:
    rc, doc = run_json(["doctor"])
    check_schema(doc)
    assert doc["source"]["kind"] == "live" and rc == doc["exit_code"]
    bundle = tmp_path / "here.tgz"
    rc, out, err = run_cli(["doctor", "--collect", str(bundle), "--json"])
    assert rc == 0 and err == ""
    saved = json.loads(out)
    assert saved["bundle"] == str(bundle) and saved["files"]
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o600
    rc, doc = run_json(["doctor", "--root", str(bundle)])
    check_schema(doc)
    assert doc["source"]["kind"] == "bundle"
    rc, out, err = run_cli(["doctor", "--collect", str(tmp_path / "b.tgz")])
    assert rc == 0 and out.startswith(f"wrote {tmp_path / 'b.tgz'}: ") and "ctrace doctor --root" in out


def test_help_mentions_exit_statuses(capsys) -> None:  # type: ignore[no-untyped-def]
    rc, _, _ = run_cli(["doctor", "--help"])
    out = capsys.readouterr().out  # click prints help itself
    assert rc == 0 and "20 warnings, 21 critical" in out and "--collect FILE" in out
