"""ProbePlan from fake kernels: detection by what the kernel shows, never by version."""

import os

import pytest

from ctrace import kernel
from ctrace.kernel import ABSENT, KPROBE, KPROBE_KRETPROBE, RAW_TRACEPOINT, KernelFacts, plan_from

NFCT = "nf_conntrack"
COMMON = {
    "__nf_conntrack_confirm": NFCT,
    "__nf_conntrack_alloc": NFCT,
    "nf_conntrack_tcp_packet": NFCT,
    "nf_conntrack_cleanup_net_list": NFCT,
    "ctnetlink_del_conntrack": "nf_conntrack_netlink",
    "tcp_set_state": "",
    "register_kprobe": "",
    "bpf_trampoline_link_prog": "",
    "bpf_get_raw_tracepoint": "",
    "bpf_ringbuf_reserve": "",
    "bpf_ktime_get_boot_ns": "",
    "bpf_jiffies64": "",
}


def facts(extra_syms=None, drop_filter=(), **kw):
    syms = dict(COMMON)
    syms.update(extra_syms or {})
    ff = frozenset(s for s in syms if s not in drop_filter and not s.startswith("bpf_"))
    base = dict(release="test", kallsyms=syms, filter_functions=ff, btf=frozenset({"vmlinux", NFCT}),
                tracepoints=frozenset({"sock:inet_sock_set_state"}), modules=frozenset({NFCT}))
    base.update(kw)
    return KernelFacts(**base)


# 6.x: nf_ct_destroy exported, nf_ct_delete out of line, early_drop static noinline
K61 = facts({"nf_ct_destroy": NFCT, "nf_ct_delete": NFCT, "early_drop": NFCT})
# 5.10: destroy_conntrack static (called through a pointer), early_drop cloned by gcc
K510 = facts({"destroy_conntrack": NFCT, "nf_ct_delete": NFCT, "early_drop.isra.0": NFCT})


def test_61_plan_all_kprobes_with_reasons():
    plan = plan_from(K61)
    assert not plan.missing_required()
    assert plan.probe("confirm").method == KPROBE_KRETPROBE
    assert plan.probe("confirm").function == "__nf_conntrack_confirm"
    assert plan.probe("destroy").function == "nf_ct_destroy"
    assert plan.probe("delete").method == KPROBE
    assert plan.probe("sock").method == RAW_TRACEPOINT
    for p in plan.probes:
        assert p.why, p
    # fentry is ruled out for module functions by the loader fact, and says so
    assert "vmlinux BTF only" in plan.probe("confirm").why
    assert plan.ringbuf and plan.boot_ns and plan.jiffies64
    assert plan.cflags() == ["-DCT_RINGBUF", "-DCT_HAVE_BOOT_NS", "-DCT_HAVE_JIFFIES64"]


def test_510_destroy_conntrack_shim_and_clone():
    plan = plan_from(K510)
    d = plan.probe("destroy")
    assert d.function == "destroy_conntrack"
    assert "nf_ct_hook" in d.why  # the shim names the kernel change
    e = plan.probe("early_drop")
    assert e.function == "early_drop.isra.0" and "clone" in e.why


def test_inlined_function_is_absent_with_reason():
    plan = plan_from(facts({"nf_ct_destroy": NFCT, "nf_ct_delete": NFCT}, drop_filter={"nf_ct_delete"}))
    d = plan.probe("delete")
    assert d.method == ABSENT
    assert "available_filter_functions" in d.why
    assert not plan.missing_required()  # destroy still catches every removal


def test_missing_required_confirm():
    syms = {"nf_ct_destroy": NFCT}
    f = facts(syms, drop_filter={"__nf_conntrack_confirm"})
    plan = plan_from(f)
    assert [p.name for p in plan.missing_required()] == ["confirm"]


def test_module_not_loaded():
    f = facts({"nf_ct_destroy": NFCT})
    syms = {k: v for k, v in f.kallsyms.items() if v != "nf_conntrack_netlink"}
    plan = plan_from(KernelFacts(**{**f.__dict__, "kallsyms": syms}))
    assert plan.probe("ctnetlink").method == ABSENT
    assert "kallsyms" in plan.probe("ctnetlink").why


def test_no_ringbuf_no_boot_clock_no_raw_tp():
    syms = {k: v for k, v in K61.kallsyms.items()
            if k not in ("bpf_ringbuf_reserve", "bpf_ktime_get_boot_ns", "bpf_get_raw_tracepoint")}
    plan = plan_from(KernelFacts(**{**K61.__dict__, "kallsyms": syms}))
    assert not plan.ringbuf and not plan.boot_ns
    assert "-DCT_RINGBUF" not in plan.cflags()
    assert plan.probe("sock").function == "tcp_set_state"
    assert plan.probe("sock").method == KPROBE
    assert any("perf buffer" in n for n in plan.notes)


def test_no_btf_reason():
    plan = plan_from(KernelFacts(**{**K61.__dict__, "btf": frozenset()}))
    assert "no kernel BTF" in plan.probe("confirm").why


def test_json_and_probes_info():
    plan = plan_from(K61)
    j = plan.to_json()
    assert j["output"] == "ringbuf"
    assert {"name", "function", "method", "why"} <= set(j["probes"][0])
    info = plan.probes_info()
    assert all(set(p) == {"function", "method", "why"} for p in info)


def test_parsers():
    ks = kernel.parse_kallsyms(
        "ffffffffc0a01000 t __nf_conntrack_confirm\t[nf_conntrack]\n"
        "ffffffff81000000 T tcp_set_state\n"
        "ffffffffc0a02000 t early_drop.isra.0\t[nf_conntrack]\n")
    assert ks == {"__nf_conntrack_confirm": NFCT, "tcp_set_state": "", "early_drop.isra.0": NFCT}
    ff = kernel.parse_filter_functions("tcp_set_state\n__nf_conntrack_confirm [nf_conntrack]\n")
    assert ff == {"tcp_set_state", "__nf_conntrack_confirm"}
    ffa = kernel.parse_filter_functions("ffffffff81000000 tcp_set_state\n"
                                        "ffffffffc0a01000 nf_ct_delete [nf_conntrack]\n")
    assert ffa == {"tcp_set_state", "nf_ct_delete"}


def test_read_facts_from_fake_tree(tmp_path):
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.1.0-test\n")
    (tmp_path / "proc/kallsyms").write_text(
        "ffffffffc0a01000 t __nf_conntrack_confirm\t[nf_conntrack]\n"
        "ffffffffc0a03000 T nf_ct_destroy\t[nf_conntrack]\n"
        "ffffffff81000000 T bpf_ringbuf_reserve\n"
        "ffffffff81000100 T bpf_trampoline_link_prog\n"
        "ffffffff81000200 T register_kprobe\n")
    tr = tmp_path / "sys/kernel/tracing"
    (tr / "events/sock/inet_sock_set_state").mkdir(parents=True)
    (tr / "available_filter_functions").write_text("__nf_conntrack_confirm [nf_conntrack]\n"
                                                  "nf_ct_destroy [nf_conntrack]\n")
    (tmp_path / "sys/kernel/btf").mkdir(parents=True)
    (tmp_path / "sys/kernel/btf/vmlinux").write_text("")
    (tmp_path / "sys/module/nf_conntrack").mkdir(parents=True)
    f = kernel.read_facts(str(tmp_path))
    assert f.release == "6.1.0-test"
    assert "sock:inet_sock_set_state" in f.tracepoints
    assert f.btf == {"vmlinux"}
    plan = plan_from(f)
    assert not plan.missing_required()
    assert plan.ringbuf
    # nf_conntrack has no module BTF in this fake tree: the reason says so
    assert "module without BTF" in plan.probe("confirm").why


def test_detect_does_not_crash_on_host():
    # Whatever this host is, detection returns a plan (possibly with absences).
    plan = kernel.detect()
    assert plan.kernel == os.uname().release or plan.kernel


def test_no_kprobes():
    syms = {k: v for k, v in K61.kallsyms.items() if k != "register_kprobe"}
    plan = plan_from(KernelFacts(**{**K61.__dict__, "kallsyms": syms}))
    assert plan.probe("confirm").method == ABSENT
    assert "no kprobes" in plan.probe("confirm").why
    assert plan.missing_required()
