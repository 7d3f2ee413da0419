"""The live source's fentry load step, with a stand-in for bcc: a pair whose
load fails falls back to its kprobes (auto) or stops ctrace (fentry forced)."""

import dataclasses
import io

import pytest

from ctrace import kernel
from ctrace.sources.live import LiveSource, attach_method
from ctrace.status import CtraceError, ExitStatus

from test_kernel_plan import K612


class FakeBPF:
    TRACING = 26

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.loaded = []

    def load_func(self, name, prog_type):
        assert prog_type == self.TRACING
        if name.decode() in self.fail:
            raise Exception(f"Failed to load BPF program {name!r}: No such file or directory")
        self.loaded.append(name.decode())


def source(plan, bpf):
    src = LiveSource.__new__(LiveSource)  # no bcc, no kernel: only the load step
    src._b = bpf
    src.plan = plan
    src.verbose = False
    src._log = io.StringIO()
    src.fentry_fallbacks = []
    return src


def test_load_ok_keeps_fentry():
    plan = kernel.plan_from(K612)
    src = source(plan, FakeBPF())
    p = plan.probe("confirm")
    assert src._load_fentry(p, "6.12-test") is p
    assert src._b.loaded == ["kretfunc__nf_conntrack____nf_conntrack_confirm",
                             "kfunc__nf_conntrack____nf_conntrack_confirm"]  # return half first


def test_failed_load_falls_back_to_kprobes_and_says_why():
    plan = kernel.plan_from(K612)
    src = source(plan, FakeBPF(fail={"kfunc__nf_conntrack__early_drop"}))
    q = src._load_fentry(plan.probe("early_drop"), "6.12-test")
    assert q.method == kernel.KPROBE_KRETPROBE and (q.entry, q.ret) == ("early_drop_e", "early_drop_x")
    assert "fentry load failed: Failed to load BPF program" in q.why
    assert src.fentry_fallbacks and src._log.getvalue().count("\n") == 1
    assert "ctrace: note: fentry load failed for early_drop" in src._log.getvalue()


def test_failed_load_with_fentry_forced_is_one_line_exit_11():
    plan = kernel.plan_from(K612, "fentry")
    src = source(plan, FakeBPF(fail={"kretfunc__nf_conntrack____nf_conntrack_alloc"}))
    with pytest.raises(CtraceError) as e:
        src._load_fentry(plan.probe("alloc"), "6.12-test")
    assert e.value.status == ExitStatus.ATTACH_FAILED
    assert "__nf_conntrack_alloc" in str(e.value) and "\n" not in str(e.value)


def test_failed_load_without_kprobes_is_fatal():
    syms = {k: v for k, v in K612.kallsyms.items() if k != "register_kprobe"}
    plan = kernel.plan_from(dataclasses.replace(K612, kallsyms=syms))
    src = source(plan, FakeBPF(fail={"kfunc__nf_conntrack__nf_ct_destroy"}))
    with pytest.raises(CtraceError):
        src._load_fentry(plan.probe("destroy"), "6.12-test")


def test_attach_method_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv("CTRACE_ATTACH_METHOD", raising=False)
    assert attach_method(None) == "auto"
    assert attach_method("kprobe") == "kprobe"
    monkeypatch.setenv("CTRACE_ATTACH_METHOD", "fentry")
    assert attach_method(None) == "fentry" and attach_method("auto") == "auto"
    monkeypatch.setenv("CTRACE_ATTACH_METHOD", "kretprobe")
    with pytest.raises(CtraceError) as e:
        attach_method(None)
    assert e.value.status == ExitStatus.USAGE
