"""Unit tests of the lab harness logic (no qemu, no root)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import lab

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.kernel.test_ground_truth" name="test_a" time="1"/>
<testcase classname="tests.kernel.test_ground_truth" name="test_b" time="1">
  <failure message="assert 22 == 23">...</failure></testcase>
<testcase classname="tests.kernel.test_bcc_smoke" name="test_c" time="1">
  <skipped message="no btf"/></testcase>
<testcase classname="tests.kernel.probes.test_x.TestGroup" name="test_d[v6]" time="1">
  <error message="fixture"/></testcase>
</testsuite></testsuites>
"""


def test_parse_junit_counts_and_names() -> None:
    c = lab.parse_junit(JUNIT)
    assert (c.passed, c.failed, c.skipped) == (1, 2, 1)
    assert c.failures == ["tests/kernel/test_ground_truth.py::test_b (assert 22 == 23)",
                          "tests/kernel/probes/test_x.py::TestGroup::test_d[v6] (fixture)"]


def test_parse_junit_old_pytest_root() -> None:
    # pytest < 5.1 writes <testsuite> as the root element
    c = lab.parse_junit('<testsuite tests="1"><testcase classname="tests.kernel.test_a" '
                        'name="test_ok"/></testsuite>')
    assert (c.passed, c.failed) == (1, 0)


@pytest.mark.parametrize("line", [
    "[   12.345678] WARNING: CPU: 1 PID: 42 at net/netfilter/nf_conntrack_core.c:123 foo+0x1/0x2",
    "[    1.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "[    2.000000] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[    3.000000] Call Trace:",
    "[    3.000000]  <TASK>",
    "[    4.000000] general protection fault, probably for non-canonical address",
    "[    5.000000] BUG: unable to handle page fault for address",
])
def test_dmesg_splats_found(line: str) -> None:
    text = "[    0.000000] Linux version 6.1.0\n" + line + "\n"
    if "<TASK>" in line:
        assert lab.dmesg_splats(text) == []
    else:
        assert lab.dmesg_splats(text) == [line.strip()]


def test_dmesg_benign_lines_pass() -> None:
    text = "\n".join([
        "[    9.1] nf_conntrack: nf_conntrack: table full, dropping packet",
        "[    9.2] bpf: Warning: some message",
        "[    9.3] ACPI: PM-Timer IO Port: 0x608",
        "[    9.4] RAS: Correctable Errors collector initialized.",
        "[    9.5] Spectre V2 : WARNING: Unprivileged eBPF is enabled",  # not at line start
    ])
    assert lab.dmesg_splats(text) == []


def test_cache_key_depends_on_inputs() -> None:
    src = lab.suite_sources("bookworm", "http://m/debian", "http://m/sec")
    base = lab.cache_key("bookworm", src, b"a\n", b"#!/bin/sh\n")
    assert base == lab.cache_key("bookworm", src, b"a\n", b"#!/bin/sh\n")
    assert len(base) == 16
    assert base != lab.cache_key("trixie", src, b"a\n", b"#!/bin/sh\n")
    assert base != lab.cache_key("bookworm", src, b"a\nb\n", b"#!/bin/sh\n")
    assert base != lab.cache_key("bookworm", src, b"a\n", b"#!/bin/sh\nx\n")
    assert base != lab.cache_key("bookworm", src[:1], b"a\n", b"#!/bin/sh\n")


def test_suite_sources() -> None:
    assert lab.suite_sources("bookworm", "http://m/d", "http://m/s") == [
        "deb http://m/d bookworm main", "deb http://m/d bookworm-updates main",
        "deb http://m/s bookworm-security main"]
    assert lab.suite_sources("sid", "http://m/d", "http://m/s") == ["deb http://m/d sid main"]
    with pytest.raises(lab.LabError) as e:
        lab.suite_sources("buster")
    assert e.value.code == lab.EXIT_USAGE


def _fake_image(tmp_path: Path, key: str = "k1", built_at: float = 0.0,
                files: bool = True) -> lab.Image:
    img = lab.Image("bookworm", key, tmp_path / f"bookworm-{key}")
    img.path.mkdir()
    if files:
        for p in (img.root, img.kernel, img.initrd):
            p.write_bytes(b"x")
    img.meta_file.write_text(json.dumps({"suite": "bookworm", "key": key,
                                         "built_at": built_at or time.time()}))
    return img


def test_image_fresh(tmp_path: Path) -> None:
    assert lab.image_is_fresh(_fake_image(tmp_path))


def test_image_missing_meta_is_not_fresh(tmp_path: Path) -> None:
    img = _fake_image(tmp_path)
    img.meta_file.unlink()
    assert not lab.image_is_fresh(img)


def test_image_partial_is_not_fresh(tmp_path: Path) -> None:
    assert not lab.image_is_fresh(_fake_image(tmp_path, files=False))


def test_image_wrong_key_is_not_fresh(tmp_path: Path) -> None:
    img = _fake_image(tmp_path)
    other = lab.Image(img.suite, "k2", img.path)
    assert not lab.image_is_fresh(other)


def test_image_too_old_is_stale(tmp_path: Path) -> None:
    img = _fake_image(tmp_path, built_at=1000.0)
    assert lab.image_is_fresh(img, now=1000.0 + 50, max_age=100)
    assert not lab.image_is_fresh(img, now=1000.0 + 150, max_age=100)


def test_max_age_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTRACE_LAB_MAX_AGE_DAYS", "0")
    assert lab.max_age_seconds() is None
    monkeypatch.setenv("CTRACE_LAB_MAX_AGE_DAYS", "2")
    assert lab.max_age_seconds() == 2 * 86400


def _result(suite: str, passed: int, failed: int, code: int = 0, **kw: object) -> lab.KernelResult:
    r = lab.KernelResult(suite, release="6.1.0-1-amd64", bcc="0.26.0+ds-1", seconds=93.4,
                         code=code, **kw)  # type: ignore[arg-type]
    r.counts.passed, r.counts.failed = passed, failed
    return r


def test_summary_table() -> None:
    ok = _result("bookworm", 16, 0)
    bad = _result("trixie", 15, 1, code=lab.EXIT_TESTS_FAILED,
                  problems=["test failed: tests/kernel/test_ground_truth.py::test_rst_close"])
    text = lab.summary_table([ok, bad])
    lines = text.splitlines()
    assert lines[0].split() == ["suite", "kernel", "bcc", "passed", "failed", "skipped",
                                "seconds", "result"]
    assert lines[2].split() == ["bookworm", "6.1.0-1-amd64", "0.26.0+ds-1", "16", "0", "0",
                                "93", "ok"]
    assert lines[3].split()[-1] == "FAIL"
    assert lines[4] == ("FAIL trixie (6.1.0-1-amd64): test failed: "
                        "tests/kernel/test_ground_truth.py::test_rst_close")


def test_closing_line_counts_infra_failures() -> None:
    ok = _result("a", 16, 0)
    ok.counts.skipped = 2
    dead = lab.KernelResult("b", code=lab.EXIT_GUEST_FAILED)
    splat = _result("c", 16, 0, code=lab.EXIT_TESTS_FAILED)
    assert lab.closing_line([ok, dead, splat]) == "lab: 32 passed, 2 failed, 2 skipped"
    assert lab.closing_line([ok]) == "lab: 16 passed, 0 failed, 2 skipped"


def test_overall_exit_priority() -> None:
    assert lab.overall_exit([_result("a", 1, 0)]) == lab.EXIT_OK
    assert lab.overall_exit([_result("a", 1, 0), _result("b", 0, 1, code=1)]) == 1
    assert lab.overall_exit([_result("a", 0, 1, code=1), _result("b", 0, 0, code=4)]) == 4


def _guest_out(tmp_path: Path, junit: str = JUNIT, rc: str = "1", dmesg: str = "") -> Path:
    (tmp_path / "kernel-release").write_text("6.12.1-amd64\n")
    (tmp_path / "bcc-version").write_text("0.31.0+ds-7\n")
    (tmp_path / "junit.xml").write_text(junit)
    (tmp_path / "pytest-rc").write_text(rc + "\n")
    (tmp_path / "dmesg.txt").write_text(dmesg)
    return tmp_path


def test_collect_results_failures(tmp_path: Path) -> None:
    r = lab.KernelResult("trixie")
    lab.collect_results(r, _guest_out(tmp_path))
    assert (r.release, r.bcc) == ("6.12.1-amd64", "0.31.0+ds-7")
    assert r.code == lab.EXIT_TESTS_FAILED
    assert r.problems[0] == ("test failed: tests/kernel/test_ground_truth.py::test_b"
                             " (assert 22 == 23)")


def test_collect_results_dmesg_fails_green_run(tmp_path: Path) -> None:
    ok = '<testsuite><testcase classname="tests.kernel.test_a" name="test_ok"/></testsuite>'
    r = lab.KernelResult("sid")
    lab.collect_results(r, _guest_out(tmp_path, ok, "0", "[ 1.0] WARNING: CPU: 0 PID: 1 at x\n"))
    assert r.code == lab.EXIT_TESTS_FAILED
    assert r.problems == ["dmesg: [ 1.0] WARNING: CPU: 0 PID: 1 at x"]


def test_collect_results_no_tests_collected(tmp_path: Path) -> None:
    r = lab.KernelResult("sid")
    lab.collect_results(r, _guest_out(tmp_path, "<testsuite/>", "5"))
    assert r.code == lab.EXIT_TESTS_FAILED
    assert "no tests collected" in r.problems[0]


def test_collect_results_nothing_from_guest(tmp_path: Path) -> None:
    r = lab.KernelResult("bullseye")
    lab.collect_results(r, tmp_path)
    assert r.code == lab.EXIT_GUEST_FAILED


def test_kernels_table(tmp_path: Path) -> None:
    for suite, attached in (("bullseye", False), ("bookworm", True)):
        (tmp_path / suite).mkdir()
        (tmp_path / suite / "smoke.json").write_text(json.dumps({
            "kernel": f"k-{suite}", "bcc": "0.1", "btf_vmlinux": True,
            "btf_nf_conntrack": attached, "module_kfunc_macro": False,
            "phases": ["connect", "flush"],
            "targets": {
                "nf_ct_delete": {"kind": "function", "symbol": "nf_ct_delete",
                                 "methods": {"kprobe": {"attached": True, "hits": 3,
                                                        "phases": {"flush": 3}},
                                             "fentry": {"attached": attached, "hits": 2}}},
                "gone": {"kind": "function", "symbol": None, "methods": {}}}}))
    lines = lab.kernels_table(tmp_path, ["bullseye", "bookworm", "sid"]).splitlines()
    assert lines[2] == "| bullseye | k-bullseye | 0.1 | yes | no | no |"
    assert lines[5] == "| attach point | bullseye | bookworm |"
    assert lines[7] == "| `nf_ct_delete` | K | K F |"
    assert lines[8] == "| `gone` | absent | absent |"
    assert lines[10] == "Hits of the first working method per phase (connect / flush):"
    assert lines[14] == "| `nf_ct_delete` | 0/3 | 0/3 |"


def test_qemu_cmd_has_no_network_and_snapshot(tmp_path: Path) -> None:
    img = lab.Image("sid", "k", tmp_path)
    cmd = lab.qemu_cmd(img, "tcg", 2, 2048, tmp_path / "out", tmp_path)
    assert cmd[cmd.index("-nic") + 1] == "none"
    assert any("snapshot=on" in a for a in cmd)
    assert any("readonly=on" in a and "mount_tag=tree" in a for a in cmd)


def test_usage_error_exit_code(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        lab.main(["run", "--suite", "buster"])
    assert e.value.code == lab.EXIT_USAGE


def test_guest_pytest_args() -> None:
    assert lab.guest_pytest_args([]) == ["tests/kernel"]
    assert lab.guest_pytest_args(["-k", "flush", "-x"]) == ["tests/kernel", "-k", "flush", "-x"]
    assert lab.guest_pytest_args(["tests/kernel/probes", "-x"]) == ["tests/kernel/probes", "-x"]
    assert lab.guest_pytest_args(["tests/kernel/test_bcc_smoke.py::test_tracepoint_fires"]) == [
        "tests/kernel/test_bcc_smoke.py::test_tracepoint_fires"]
