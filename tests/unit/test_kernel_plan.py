"""ProbePlan from fake kernels: detection by what the kernel shows, never by version."""

import os

import pytest

from ctrace import kernel
from ctrace.kernel import (
    ABSENT,
    FENTRY,
    FENTRY_FEXIT,
    KPROBE,
    KPROBE_KRETPROBE,
    RAW_TRACEPOINT,
    KernelFacts,
    plan_from,
)

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
    # without an examined loader fentry is not considered, and the reason says so
    assert "BPF loader not examined" in plan.probe("confirm").why
    assert "-DCT_FENTRY" not in plan.cflags()
    assert plan.ringbuf and plan.boot_ns and plan.jiffies64
    assert plan.cflags() == ["-DCT_RINGBUF", "-DCT_HAVE_BOOT_NS", "-DCT_HAVE_JIFFIES64"]


def test_510_destroy_conntrack_shim_and_clone():
    plan = plan_from(K510)
    d = plan.probe("destroy")
    assert d.function == "destroy_conntrack"
    assert "nf_ct_hook" in d.why  # the shim names the kernel change
    e = plan.probe("early_drop")
    assert e.function == "early_drop.isra.0" and "clone" in e.why
    # a clone's arguments may differ from early_drop's: its net is not read
    assert "-DCT_EARLY_DROP_CLONE" in plan.cflags()


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


# ---------------------------------------------------------------- fentry/fexit

import dataclasses  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class BtfBuilder:
    """Raw BTF as the kernel exposes it under /sys/kernel/btf: vmlinux, or split
    module BTF whose ids and string offsets continue the base's."""

    def __init__(self, base=None):
        self.types = []
        self.strings = b"" if base else b"\0"
        self.first_id = len(base.types) + 1 if base else 1
        self.str_base = len(base.strings) if base else 0

    def _str(self, s):
        off = self.str_base + len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, kind, name, vlen, typ, extra=b""):
        info = (kind << 24) | vlen
        self.types.append(struct.pack("<III", self._str(name) if name else 0, info, typ) + extra)
        return self.first_id + len(self.types) - 1

    def int_(self, name="int"):
        return self.add(1, name, 0, 4, struct.pack("<I", 32))

    def ptr(self, to):
        return self.add(2, "", 0, to)

    def struct_(self, name, members):  # members: [(name, type)]
        extra = b"".join(struct.pack("<III", self._str(n), t, 0) for n, t in members)
        return self.add(4, name, len(members), 8, extra)

    def proto(self, ret, params):
        extra = b"".join(struct.pack("<II", self._str(n), t) for n, t in params)
        return self.add(13, "", len(params), ret, extra)

    def func(self, name, proto):
        return self.add(12, name, 1, proto)  # vlen = linkage (global)

    def bytes(self):
        types = b"".join(self.types)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return hdr + types + self.strings


def btf_pair():
    """vmlinux with one function whose prototype a module reuses, and
    nf_conntrack's split BTF."""
    v = BtfBuilder()
    i = v.int_()
    skb = v.struct_("sk_buff", [("len", i)])
    pskb = v.ptr(skb)
    shared = v.proto(i, [("skb", pskb)])  # dedup: a module function may point here
    v.func("tcp_v4_rcv", shared)
    m = BtfBuilder(base=v)
    ct = m.struct_("nf_conn", [("status", i)])
    pct = m.ptr(ct)
    m.func("__nf_conntrack_confirm", shared)  # prototype in the base
    m.func("__nf_conntrack_alloc", m.proto(pct, [(n, pskb) for n in ("net", "zone", "orig", "repl", "gfp", "hash")]))
    one = m.proto(i, [("ct", pct)])
    for f in ("nf_ct_delete", "nf_ct_destroy", "early_drop", "nf_conntrack_cleanup_net_list",
              "nf_conntrack_tcp_packet"):
        m.func(f, one)
    n = BtfBuilder(base=v)
    n.func("ctnetlink_del_conntrack", n.proto(i, [("skb", pskb), ("info", pskb), ("cda", pskb)]))
    return v.bytes(), m.bytes(), n.bytes()


def test_btf_functions_split_and_base():
    vml, mod, _ = btf_pair()
    assert kernel.btf_functions(vml) == {"tcp_v4_rcv": 1}
    f = kernel.btf_functions(mod, vml)
    assert f["__nf_conntrack_confirm"] == 1  # prototype resolved in the base
    assert f["__nf_conntrack_alloc"] == 6
    assert f["nf_ct_delete"] == 1 and "tcp_v4_rcv" not in f


def test_btf_garbage_raises_btf_error():
    with pytest.raises(kernel.BtfError):
        kernel.btf_functions(b"\0" * 40)
    vml, mod, _ = btf_pair()
    with pytest.raises(kernel.BtfError):
        kernel.btf_functions(mod[:30], vml)


def test_btf_of_this_host_parses():
    path = "/sys/kernel/btf/vmlinux"
    if not os.access(path, os.R_OK):
        pytest.skip("no readable vmlinux BTF here")
    funcs = kernel.btf_functions(open(path, "rb").read())
    # tcp_set_state(struct sock *sk, int state) is in every kernel with BTF
    assert funcs.get("tcp_set_state") == 2


NFNL = "nf_conntrack_netlink"
ALL_FUNCS = {"__nf_conntrack_confirm": 1, "__nf_conntrack_alloc": 6, "nf_ct_delete": 3, "nf_ct_destroy": 1,
             "early_drop": 2, "nf_conntrack_cleanup_net_list": 1, "nf_conntrack_tcp_packet": 5}
# 6.12 / 7.2 with bcc >= the module kfunc change: module BTF for both modules
K612 = dataclasses.replace(
    K61, btf=frozenset({"vmlinux", NFCT, NFNL}), loader_module_kfunc=True, loader_why="",
    btf_funcs={NFCT: ALL_FUNCS, NFNL: {"ctnetlink_del_conntrack": 3}})


def test_fentry_plan_where_btf_and_loader_allow():
    plan = plan_from(K612)
    for name in ("confirm", "alloc", "early_drop", "ctnetlink", "netns", "tcp_state"):
        p = plan.probe(name)
        assert p.method == FENTRY_FEXIT, p
        assert p.entry.startswith("kfunc__") and p.ret.startswith("kretfunc__"), p
        assert p.fallback is not None and p.fallback.method == KPROBE_KRETPROBE, p
        assert "fentry" in p.why and "kprobes if the load fails" in p.why
    for name in ("delete", "destroy"):
        assert plan.probe(name).method == FENTRY and not plan.probe(name).ret
    assert plan.probe("confirm").entry == "kfunc__nf_conntrack____nf_conntrack_confirm"
    assert plan.probe("ctnetlink").entry == "kfunc__nf_conntrack_netlink__ctnetlink_del_conntrack"
    assert plan.probe("sock").method == RAW_TRACEPOINT  # tracepoints stay tracepoints
    assert "-DCT_FENTRY" in plan.cflags() and not plan.unmet()
    # the fallback is exactly the kprobe plan
    kp = plan_from(K612, "kprobe")
    for p in plan.probes:
        if p.fallback:
            k = kp.probe(p.name)
            assert (p.fallback.function, p.fallback.method, p.fallback.entry, p.fallback.ret) == \
                (k.function, k.method, k.entry, k.ret)


def test_kprobe_method_forces_kprobes():
    plan = plan_from(K612, "kprobe")
    assert not plan.fentry and "-DCT_FENTRY" not in plan.cflags()
    assert plan.probe("confirm").method == KPROBE_KRETPROBE
    assert "kprobe requested" in plan.probe("confirm").why
    assert plan.method == "kprobe" and "attach method kprobe requested" in plan.notes


def test_bad_method_is_value_error():
    with pytest.raises(ValueError):
        plan_from(K612, "uprobe")


@pytest.mark.parametrize("change, probe, reason", [
    (dict(loader_module_kfunc=False, loader_why="this bcc resolves fentry targets in vmlinux BTF only"),
     "confirm", "vmlinux BTF only"),
    (dict(btf=frozenset({"vmlinux"})), "confirm", "module without BTF"),
    (dict(btf=frozenset({"vmlinux", NFCT})), "ctnetlink", "nf_conntrack_netlink is a module without BTF"),
    (dict(btf_funcs={NFCT: {k: v for k, v in ALL_FUNCS.items() if k != "early_drop"}}), "early_drop",
     "not a function in /sys/kernel/btf/nf_conntrack"),
    (dict(btf_funcs={NFCT: {**ALL_FUNCS, "__nf_conntrack_alloc": 5}}), "alloc", "has 5 parameters"),
    (dict(btf_funcs={NFCT: {**ALL_FUNCS, "__nf_conntrack_confirm": 2}}), "confirm", "has 2 parameters"),
    (dict(btf_funcs={}, btf_errors={NFCT: "cannot read /sys/kernel/btf/nf_conntrack (bad BTF magic 0x0)"}),
     "confirm", "bad BTF magic"),
    (dict(btf=frozenset({NFCT})), "confirm", "no kernel BTF"),
])
def test_fentry_ruled_out_per_function_with_reason(change, probe, reason):
    plan = plan_from(dataclasses.replace(K612, **change))
    p = plan.probe(probe)
    assert p.method in (KPROBE, KPROBE_KRETPROBE), p
    assert reason in p.why, p.why
    # forcing fentry there is refused, naming the same reason
    forced = plan_from(dataclasses.replace(K612, **change), "fentry")
    assert probe in [u.name for u in forced.unmet()]
    assert reason in forced.probe(probe).why and "fentry impossible" in forced.probe(probe).why


def test_more_parameters_than_read_is_fine_without_return_value():
    # nf_ct_delete(ct, portid, report): fentry reads only ct
    plan = plan_from(K612)
    assert plan.probe("delete").method == FENTRY


def test_clone_and_missing_trampoline_keep_kprobes():
    k510 = dataclasses.replace(K510, btf=K612.btf, loader_module_kfunc=True, loader_why="",
                               btf_funcs={NFCT: {**ALL_FUNCS, "destroy_conntrack": 1}, NFNL: {"ctnetlink_del_conntrack": 3}})
    plan = plan_from(k510)
    e = plan.probe("early_drop")
    assert e.function == "early_drop.isra.0" and e.method == KPROBE_KRETPROBE
    assert "BTF describes only early_drop" in e.why
    assert plan.probe("destroy").method == FENTRY  # destroy_conntrack has a variant too
    syms = {k: v for k, v in K612.kallsyms.items() if k != "bpf_trampoline_link_prog"}
    plan = plan_from(dataclasses.replace(K612, kallsyms=syms))
    assert plan.probe("confirm").method == KPROBE_KRETPROBE and "trampoline" in plan.probe("confirm").why


def test_function_in_another_object_than_the_variant():
    syms = {**K612.kallsyms, "nf_ct_destroy": ""}  # built into vmlinux
    plan = plan_from(dataclasses.replace(K612, kallsyms=syms))
    assert plan.probe("destroy").method == KPROBE
    assert "written for module nf_conntrack, here nf_ct_destroy is in vmlinux" in plan.probe("destroy").why


def test_fentry_without_kprobes():
    syms = {k: v for k, v in K612.kallsyms.items() if k != "register_kprobe"}
    plan = plan_from(dataclasses.replace(K612, kallsyms=syms))
    c = plan.probe("confirm")
    assert c.method == FENTRY_FEXIT and c.fallback is None and "no kprobes to fall back to" in c.why
    assert not plan.missing_required()
    # no kprobes and no fentry: absent, both reasons
    plan = plan_from(dataclasses.replace(K612, kallsyms=syms, loader_module_kfunc=False, loader_why="no loader"))
    assert plan.probe("confirm").method == ABSENT
    assert "no loader" in plan.probe("confirm").why and "no kprobes" in plan.probe("confirm").why


def test_replace_and_json():
    plan = plan_from(K612)
    kp = plan.probe("confirm").fallback
    p2 = plan.replace(kp)
    assert p2.probe("confirm").method == KPROBE_KRETPROBE and plan.probe("confirm").method == FENTRY_FEXIT
    assert p2.to_json()["method"] == "auto"
    assert set(plan.to_json()["probes"][0]) == {"name", "function", "method", "why", "programs"}
    # the programs as the kernel's skip counts name them: the fentry pair, then the kprobe pair
    assert plan.to_json()["probes"][0]["programs"] == [plan.probe("confirm").entry, plan.probe("confirm").ret]
    assert p2.to_json()["probes"][0]["programs"] == [kp.entry, kp.ret] != plan.to_json()["probes"][0]["programs"]


class FakeBPF:
    TRACING = 26

    def attach_kfunc(self):
        pass

    def attach_kretfunc(self):
        pass

    def load_func(self):
        pass


def test_loader_verdict_is_a_feature_test(tmp_path):
    ok, why = kernel.loader_verdict(None, None)
    assert not ok and "not installed" in why

    class Old:
        def load_func(self):
            pass

    ok, why = kernel.loader_verdict(Old, "/nonexistent")
    assert not ok and "no fentry API" in why
    ok, why = kernel.loader_verdict(FakeBPF, None)
    assert not ok and "cannot find the libbcc" in why
    lib = tmp_path / "libbcc.so.0"
    lib.write_bytes(b"\x7fELF...#define KFUNC_PROBE(event, args...) BPF_PROG(kfunc__vmlinux__ ## event)")
    ok, why = kernel.loader_verdict(FakeBPF, str(lib))
    assert not ok and "vmlinux BTF only" in why
    lib.write_bytes(b"\x7fELF...#define MODULE_KFUNC_PROBE(module, event, args...) ...")
    assert kernel.loader_verdict(FakeBPF, str(lib)) == (True, "")
    ok, why = kernel.loader_verdict(FakeBPF, str(tmp_path / "gone.so"))
    assert not ok and "cannot read" in why


def fake_tree(tmp_path, with_module_btf=True):
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.12.0-test\n")
    syms = ["__nf_conntrack_confirm", "__nf_conntrack_alloc", "nf_ct_delete", "nf_ct_destroy", "early_drop",
            "nf_conntrack_cleanup_net_list", "nf_conntrack_tcp_packet"]
    lines = [f"ffffffffc0a0{i:04x} t {s}\t[nf_conntrack]" for i, s in enumerate(syms)]
    lines.append("ffffffffc0b00000 t ctnetlink_del_conntrack\t[nf_conntrack_netlink]")
    lines += [f"ffffffff8100{i:04x} T {s}" for i, s in enumerate(
        ["bpf_ringbuf_reserve", "bpf_trampoline_link_prog", "register_kprobe", "bpf_get_raw_tracepoint"])]
    (tmp_path / "proc/kallsyms").write_text("\n".join(lines) + "\n")
    tr = tmp_path / "sys/kernel/tracing"
    (tr / "events/sock/inet_sock_set_state").mkdir(parents=True)
    (tr / "available_filter_functions").write_text(
        "".join(f"{s} [nf_conntrack]\n" for s in syms) + "ctnetlink_del_conntrack [nf_conntrack_netlink]\n")
    btf = tmp_path / "sys/kernel/btf"
    btf.mkdir(parents=True)
    vml, mod, nl = btf_pair()
    (btf / "vmlinux").write_bytes(vml)
    if with_module_btf:
        (btf / NFCT).write_bytes(mod)
        (btf / NFNL).write_bytes(nl)
    return tmp_path


def test_read_facts_reads_module_btf_and_asks_the_loader(tmp_path):
    root = str(fake_tree(tmp_path))
    asked = []

    def loader():
        asked.append(1)
        return True, ""

    f = kernel.read_facts(root, loader=loader)
    assert asked and f.loader_module_kfunc
    assert f.btf_funcs[NFCT]["__nf_conntrack_alloc"] == 6
    assert f.btf_funcs[NFNL] == {"ctnetlink_del_conntrack": 3}
    plan = kernel.detect(root, loader=loader)
    assert plan.probe("confirm").method == FENTRY_FEXIT
    assert plan.probe("ctnetlink").method == FENTRY_FEXIT
    # kprobes asked for: neither the loader nor BTF is examined
    asked.clear()
    f = kernel.read_facts(root, method="kprobe", loader=loader)
    assert not asked and not f.btf_funcs
    # a loader without module support: kprobes, its reason shown
    plan = kernel.detect(root, loader=lambda: (False, "this bcc resolves fentry targets in vmlinux BTF only"))
    assert plan.probe("confirm").method == KPROBE_KRETPROBE and "vmlinux BTF only" in plan.probe("confirm").why


def test_read_facts_without_module_btf_does_not_ask_the_loader(tmp_path):
    root = str(fake_tree(tmp_path, with_module_btf=False))
    f = kernel.read_facts(root, loader=lambda: pytest.fail("loader asked without module BTF"))
    plan = plan_from(f)
    assert "module without BTF" in plan.probe("confirm").why


def test_read_facts_damaged_module_btf(tmp_path):
    root = fake_tree(tmp_path)
    (root / "sys/kernel/btf" / NFCT).write_bytes(b"garbage" * 10)
    plan = kernel.detect(str(root), loader=lambda: (True, ""))
    assert plan.probe("confirm").method == KPROBE_KRETPROBE
    assert "cannot read /sys/kernel/btf/nf_conntrack" in plan.probe("confirm").why
    assert plan.probe("ctnetlink").method == FENTRY_FEXIT  # the other module is fine


def ctrace(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ctrace", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=e, cwd=str(ROOT))


def test_cli_attach_method_errors_are_one_line():
    r = ctrace("probes", "--attach-method", "uprobe")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--attach-method" in r.stderr
    r = ctrace("probes", env={"CTRACE_ATTACH_METHOD": "uprobe"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "CTRACE_ATTACH_METHOD" in r.stderr
    r = ctrace("record", "-o", "/nonexistent/x.ctr", "--attach-method", "uprobe")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_cli_probes_shows_method_and_unmet_fentry(monkeypatch, cli):
    from ctrace.sources import live

    plan612 = plan_from(K612)
    monkeypatch.setattr(live, "detect", lambda method=None: plan_from(
        K612 if method != "fentry" else dataclasses.replace(K612, loader_module_kfunc=False, loader_why="old bcc"),
        method or "auto"))
    status, out, _ = cli(["probes"])
    assert status == 0
    assert "confirm" in out and "fentry+fexit" in out and "kfunc" not in out
    assert "(attach method auto)" in out
    status, out, _ = cli(["probes", "--attach-method", "fentry"])
    assert status == 11 and "cannot use fentry" in out and "old bcc" in out
    status, out, _ = cli(["probes", "--json", "--attach-method", "kprobe"])
    assert status == 0 and '"method": "kprobe"' in out and "fentry+fexit" not in out
    assert plan612.fentry
