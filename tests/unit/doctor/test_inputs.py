"""Damaged or partial trees and bundles give a clear message for what is missing,
never a traceback; bundles written by --collect analyse like the machine itself."""

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any, List

import pytest
from doctor_helpers import ids, report_of, run_cli, run_json
from doctor_tree import IPT_EMPTY, NFT_STATEFUL, NFT_STATELESS, Tree, ct_tcp, ct_udp

from ctrace.doctor import inputs as P
from ctrace.doctor.analyze import analyze
from ctrace.doctor.collect import collect
from ctrace.doctor.inputs import LiveInputs
from ctrace.doctor.snapshot import load
from ctrace.status import CtraceError, ExitStatus


def busy(tree: Tree) -> Tree:
    """A table 95% full with orphans and unanswered UDP: several findings at once."""
    lines, socks = [], []
    for k in range(30):
        lines.append(ct_tcp("10.0.0.99", "10.0.0.1", 30000 + k, 443, remaining=431000))
    for k in range(5):
        lines.append(ct_tcp(f"10.0.2.{k + 1}", "10.0.0.1", 50000 + k, 443, remaining=431990))
        socks.append(("10.0.0.1", 443, f"10.0.2.{k + 1}", 50000 + k, "ESTABLISHED"))
    lines += [ct_udp("10.0.0.1", "10.96.0.10", 5000 + k, 53, rsrc="10.244.1.5") for k in range(60)]
    tree.base(count=95, max=100, buckets=100).stat([{"insert_failed": 1}, {}]).local(["10.0.0.1"])
    return tree.sockets(socks).table(lines).ruleset(nft=NFT_STATEFUL, iptables=IPT_EMPTY, ip6tables=IPT_EMPTY)


BUSY = [
    ("established-timeout-long", "info"),  # full, but not of long-idle entries
    ("insert-failed", "warning"),
    ("orphaned-established", "warning"),
    ("table-near-full", "critical"),
    ("udp-stale", "warning"),
]


def tar_tree(root: Path, out: Path, wrapper: str = "") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=wrapper + str(path.relative_to(root)))
    return out


def no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert err.count("\n") <= 1


def test_bad_root_arguments_are_one_line_errors(tmp_path: Path) -> None:
    rc, out, err = run_cli(["doctor", "--root", str(tmp_path / "nope")])
    assert rc == ExitStatus.NO_INPUT and out == "" and err.startswith("ctrace: ") and "no such file" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["doctor", "--root", str(tmp_path / "empty")])
    assert rc == ExitStatus.NO_INPUT and "has no proc/ directory" in err
    no_traceback(err)
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not a tar file at all\n" * 10)
    rc, _, err = run_cli(["doctor", "--root", str(junk)])
    assert rc == ExitStatus.NO_INPUT and "neither a directory nor a ctrace bundle" in err
    no_traceback(err)
    rc, _, err = run_cli(["doctor", "--root", str(tmp_path), "--collect", str(tmp_path / "x.tgz")])
    assert rc == ExitStatus.USAGE and not (tmp_path / "x.tgz").exists()


def test_empty_proc_is_incomplete_with_every_missing_input_named(tree: Tree) -> None:
    (tree.root / "proc").mkdir(parents=True)
    rc, doc = run_json(["doctor", "--root", str(tree.root)])
    assert rc == ExitStatus.DOCTOR_INCOMPLETE == 22
    assert doc["status"] == "incomplete" and doc["exit_code"] == 22 and doc["findings"] == []
    missing = {m["input"]: m for m in doc["missing"]}
    for name in ("nf_conntrack_count", "nf_conntrack_max", "nf_conntrack_buckets", "nf_conntrack_tcp_timeout_established"):
        assert missing[f"proc/sys/net/netfilter/{name}"]["reason"] == "not present"
    assert missing["proc/sys/net/netfilter/nf_conntrack_count"]["needed_for"] == ["table-size"]
    assert missing["proc/net/nf_conntrack"]["needed_for"] == ["table-contents", "orphans", "established-idle"]
    assert missing["conntrack/conntrack-L.txt"]["reason"] == "not present"
    assert not any(c["ran"] for c in doc["checks"])
    rc, out, err = run_cli(["doctor", "--root", str(tree.root)])
    assert rc == 22 and err == ""
    assert "Could not read:" in out and "proc/net/nf_conntrack: not present -> affects table-contents" in out


def test_damaged_files_are_reported_and_the_rest_is_used(tree: Tree) -> None:
    busy(tree)
    tree.sysctls(nf_conntrack_buckets="lots")  # type: ignore[arg-type]
    tree.write("proc/net/stat/nf_conntrack", "garbage header\n00000001 00000002\n")
    table = (tree.root / "proc/net/nf_conntrack").read_text().splitlines()
    table[2:2] = ["ipv4 2 tcp 6 this is not an entry", "\x00\x01\xff garbage"]
    (tree.root / "proc/net/nf_conntrack").write_bytes("\n".join(table).encode() + b"\n\xff\xfe\n")
    with open(tree.root / "proc/net/tcp", "a") as f:
        f.write("   9: NOTHEX:0050 00000000:0000 0A\n")
    rc, doc = run_json(["doctor", "--root", str(tree.root)])
    assert rc == 21
    got = sorted((f["id"], f["severity"]) for f in doc["findings"])
    assert got == [x for x in BUSY if x[0] != "insert-failed"]
    missing = {m["input"]: m["reason"] for m in doc["missing"]}
    assert missing["proc/sys/net/netfilter/nf_conntrack_buckets"] == "not present"
    assert missing["proc/net/stat/nf_conntrack"] == "damaged: no header line starting with 'entries'"
    assert "proc/net/nf_conntrack: 3 damaged lines ignored (first at line 3)" in doc["notes"]
    assert "/proc/net/tcp*: 1 damaged lines ignored" in doc["notes"]
    assert {c["name"]: c["ran"] for c in doc["checks"]}["hash-size"] is False


def test_bundle_of_a_tree_gives_the_same_findings(tree: Tree, tmp_path: Path) -> None:
    busy(tree)
    assert ids(report_of(tree.root)) == BUSY
    assert ids(report_of(tar_tree(tree.root, tmp_path / "b.tgz"))) == BUSY
    assert ids(report_of(tar_tree(tree.root, tmp_path / "w.tgz", wrapper="host1/"))) == BUSY


def test_truncated_bundle_never_tracebacks(tree: Tree, tmp_path: Path) -> None:
    busy(tree)
    data = tar_tree(tree.root, tmp_path / "b.tgz").read_bytes()
    cut = tmp_path / "cut.tgz"
    seen = set()
    for end in list(range(0, len(data), max(1, len(data) // 60))) + [len(data) - 1]:
        cut.write_bytes(data[:end])
        rc, out, err = run_cli(["doctor", "--root", str(cut)])
        no_traceback(err)
        seen.add(rc)
        if rc == ExitStatus.NO_INPUT:
            assert err.startswith("ctrace: ") and out == ""
        else:
            assert rc in (0, 20, 21, 22)
            assert "truncated" in out or "not in the bundle" in out
    assert ExitStatus.NO_INPUT in seen and len(seen) > 1


def test_bundle_members_cannot_escape(tmp_path: Path, tree: Tree) -> None:
    busy(tree)
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        for path in sorted(tree.root.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(tree.root)))
        for name in ("../escaped", "/tmp/abs-escaped", "proc/../../escaped2"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        link = tarfile.TarInfo("proc/sys/net/netfilter/nf_conntrack_max")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        tar.addfile(link)
    r = report_of(evil)
    assert ids(r) == BUSY  # the regular member nf_conntrack_max is used, the symlink ignored
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/abs-escaped").exists()


class FakeRun:
    """Stands in for subprocess.run: canned output per command."""

    def __init__(self, outputs: dict) -> None:
        self.outputs = outputs
        self.calls: List[List[str]] = []

    def __call__(self, argv: List[str], stdout: Any = None, **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        key = " ".join(argv)
        if key not in self.outputs:
            return subprocess.CompletedProcess(argv, 1, stderr=b"Operation not permitted\n")
        stdout.write(self.outputs[key].encode())
        return subprocess.CompletedProcess(argv, 0, stderr=b"")


def test_collect_then_analyse_equals_live(tree: Tree, tmp_path: Path) -> None:
    busy(tree)
    (tree.root / "ruleset/nft.txt").unlink()
    run = FakeRun({"nft list ruleset": NFT_STATEFUL, "iptables-save": IPT_EMPTY})
    live = analyze(load(LiveInputs(run=run, root=str(tree.root))))
    out = tmp_path / "bundle.tgz"
    snap, written, missing = collect(str(out), run=run, root=str(tree.root))
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert "ruleset/nft.txt" in written and "proc/net/nf_conntrack" in written
    assert missing == {"ruleset/ip6tables-save.txt": "`ip6tables-save` failed with exit 1: Operation not permitted"}
    from_bundle = report_of(out)
    assert ids(live) == ids(from_bundle) == BUSY
    for a, b in zip(live.findings, from_bundle.findings):
        assert a.id == b.id
        keys = set(a.evidence) - {"min_idle_s"}
        assert {k: a.evidence[k] for k in keys} == {k: b.evidence[k] for k in keys}
    assert [m.input for m in from_bundle.missing] == ["ruleset/ip6tables-save.txt"]
    assert from_bundle.missing[0].reason.startswith("when collected: `ip6tables-save` failed")
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[-1] == P.META and "proc/slabinfo" in names


def test_collect_uses_conntrack_tools_when_procfs_has_no_table(tree: Tree, tmp_path: Path) -> None:
    busy(tree)
    table = (tree.root / "proc/net/nf_conntrack").read_text()
    tree.remove("proc/net/nf_conntrack")
    run = FakeRun({"conntrack -L -o extended": table, "nft list ruleset": NFT_STATELESS})
    out = tmp_path / "b.tgz"
    snap, written, missing = collect(str(out), run=run, root=str(tree.root))
    assert "conntrack/conntrack-L.txt" in written and P.TABLE not in missing
    r = report_of(out)
    assert r.tables["table"]["source"] == "conntrack/conntrack-L.txt"
    assert [f.id for f in r.findings if f.id == "orphaned-established"] == ["orphaned-established"]


def test_collect_refuses_existing_files_and_symlinks(tmp_path: Path) -> None:
    existing = tmp_path / "exists.tgz"
    existing.write_text("keep me")
    rc, out, err = run_cli(["doctor", "--collect", str(existing)])
    assert rc == ExitStatus.CANNOT_WRITE and "refusing to overwrite" in err and existing.read_text() == "keep me"
    target = tmp_path / "target"
    target.write_text("precious")
    link = tmp_path / "link.tgz"
    link.symlink_to(target)
    with pytest.raises(CtraceError) as exc:
        collect(str(link))
    assert exc.value.status == ExitStatus.CANNOT_WRITE and "symbolic link" in str(exc.value)
    assert target.read_text() == "precious"
    dangling = tmp_path / "dangling.tgz"
    dangling.symlink_to(tmp_path / "nowhere")
    rc, _, err = run_cli(["doctor", "--collect", str(dangling)])
    assert rc == ExitStatus.CANNOT_WRITE and not (tmp_path / "nowhere").exists()
    rc, _, err = run_cli(["doctor", "--collect", str(tmp_path / "no-dir" / "x.tgz")])
    assert rc == ExitStatus.CANNOT_WRITE and "cannot create" in err


def test_unprivileged_live_run_names_what_it_could_not_read(tree: Tree, monkeypatch: "pytest.MonkeyPatch") -> None:
    busy(tree)
    real_open = open

    def guarded(path: Any, *a: Any, **kw: Any) -> Any:
        if str(path).endswith(("proc/net/nf_conntrack", "proc/slabinfo")):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(P, "open", guarded, raising=False)
    run = FakeRun({})
    snap = load(LiveInputs(run=run, root=str(tree.root)))
    r = analyze(snap)
    reasons = {m.input: m.reason for m in r.missing}
    assert reasons["proc/net/nf_conntrack"] == "permission denied (reading the table needs root or CAP_NET_ADMIN)"
    assert reasons["proc/slabinfo"] == "permission denied (run as root)"
    assert reasons["ruleset/nft.txt"].startswith("`nft list ruleset` failed with exit 1: Operation not permitted")
    assert ["conntrack", "-L", "-o", "extended"] not in run.calls  # it needs the same privilege
    assert ids(r) == [("established-timeout-long", "warning"), ("insert-failed", "warning"), ("table-near-full", "critical")]
    assert "orphans" in {c.name for c in r.checks if not c.ran}


def test_live_without_conntrack_loaded_is_incomplete(tree: Tree) -> None:
    tree.write("proc/net/tcp", "  sl  local_address rem_address   st\n")
    r = analyze(load(LiveInputs(run=FakeRun({"nft list ruleset": NFT_STATELESS}), root=str(tree.root))))
    reasons = {m.input: m.reason for m in r.missing}
    assert reasons["proc/sys/net/netfilter/nf_conntrack_max"] == (
        "not present (nf_conntrack not loaded in this network namespace)")
    assert reasons["proc/net/nf_conntrack"].startswith("not present (kernel built without NF_CONNTRACK_PROCFS")
    assert r.status == "incomplete" and ids(r) == [("conntrack-unneeded", "info")]


def test_interval_live_and_collected(tree: Tree, tmp_path: Path) -> None:
    busy(tree)
    run = FakeRun({"nft list ruleset": NFT_STATEFUL})
    r = analyze(load(LiveInputs(run=run, root=str(tree.root), interval=0.3)))
    ev = {f.id: f.evidence for f in r.findings}["insert-failed"]
    assert ev["grew_by"] == 0 and ev["interval_s"] >= 0.3
    out = tmp_path / "b.tgz"
    _, written, _ = collect(str(out), run=run, root=str(tree.root), interval=0.3)
    assert "proc/net/stat/nf_conntrack.later" in written
    again = {f.id: f.evidence for f in report_of(out).findings}["insert-failed"]
    assert again["grew_by"] == 0 and again["interval_s"] >= 0.3
    rc, _, err = run_cli(["doctor", "--root", str(out), "--interval", "5"])
    assert rc == ExitStatus.USAGE and "--interval" in err
