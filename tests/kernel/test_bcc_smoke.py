"""bcc smoke test: which conntrack functions attach by which method, and fire.

One BPF text holds every probe (a single compile per boot: ~35 s under
emulation).  bcc's automatic attach is switched off; each program is loaded
and attached on its own, so a function that cannot be attached by one method
does not stop the others.  A fixed workload runs in phases and each probe's
hits are read after every phase.  The result goes to smoke.json in the
guest's result directory; ``lab.py kernels-table`` turns it into the table
in docs/KERNELS.md.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import pytest

from lab_toolkit import (
    Topology,
    abort_pending,
    close_fin,
    close_rst,
    conntrack_flush,
    run,
    sysctls,
)

#: Functions probed, with the module they are expected in (None: vmlinux).
FUNCTIONS: List[str] = [
    "__nf_conntrack_confirm",
    "nf_ct_delete",
    "nf_ct_destroy",
    "destroy_conntrack",
    "early_drop",
    "__nf_conntrack_alloc",
    "nf_conntrack_free",
    "nf_conntrack_tcp_packet",
    "nf_conntrack_hash_check_insert",
    "__nf_conntrack_hash_insert",
    "nf_ct_iterate_cleanup",
    "nf_ct_iterate_cleanup_net",
    "ctnetlink_del_conntrack",
    "tcp_v4_connect",  # control: a vmlinux function, fentry works wherever BTF does
]
TRACEPOINTS: List[str] = ["sock:inet_sock_set_state", "skb:kfree_skb"]
METHODS = ("kprobe", "kretprobe", "kprobe_clone", "fentry", "fexit", "fentry_mod", "fexit_mod")

N_CONN = 20


def c_ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


def kallsyms() -> Dict[str, Tuple[str, Optional[str]]]:
    """Base function name -> (actual symbol, module) for text symbols."""
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in "tT":
                continue
            sym = parts[2]
            mod = parts[3].strip("[]") if len(parts) > 3 else None
            base = sym.split(".")[0]
            if base in FUNCTIONS and (base not in out or sym == base):
                out[base] = (sym, mod)
    return out


def clone_symbols() -> Dict[str, List[str]]:
    """GCC clones of probed functions (``nf_ct_delete.part.0``, ``.isra.0``,
    ``.constprop.0``): callers inside the same object may call the clone
    instead, so a probe on the plain name misses them.  ``.cold`` parts are
    not entry points and are left out."""
    out: Dict[str, List[str]] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in "tT" or "." not in parts[2]:
                continue
            base, _, suffix = parts[2].partition(".")
            if base in FUNCTIONS and not suffix.startswith("cold") \
                    and parts[2] not in out.setdefault(base, []):
                out[base].append(parts[2])
    return out


def related_symbols() -> Dict[str, List[str]]:
    """Text symbols whose name contains a probed name (inlining clues:
    ``.isra``/``.constprop`` clones, renamed helpers)."""
    out: Dict[str, List[str]] = {fn: [] for fn in FUNCTIONS}
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in "tT":
                continue
            for fn in FUNCTIONS:
                if fn.lstrip("_") in parts[2] and parts[2] not in out[fn]:
                    out[fn].append(parts[2])
    return {fn: sorted(v)[:20] for fn, v in out.items()}


def filter_functions() -> set:
    for path in ("/sys/kernel/tracing/available_filter_functions",
                 "/sys/kernel/debug/tracing/available_filter_functions"):
        try:
            with open(path) as f:
                return {line.split()[0] for line in f if line.strip()}
        except OSError:
            continue
    return set()


def bpf_text(syms: Dict[str, Tuple[str, Optional[str]]]) -> Tuple[str, Dict[str, int]]:
    """The single BPF program text, and the hit-counter slot of each probe."""
    slots: Dict[str, int] = {}

    def slot(key: str) -> int:
        slots[key] = len(slots)
        return slots[key]

    body = []
    for fn in FUNCTIONS:
        i = c_ident(fn)
        body.append(f"int kp_{i}(struct pt_regs *ctx) {{ bump({slot(fn + '/kprobe')}); return 0; }}")
        body.append(f"int krp_{i}(struct pt_regs *ctx) {{ bump({slot(fn + '/kretprobe')}); return 0; }}")
        body.append(f"int kpc_{i}(struct pt_regs *ctx) {{ bump({slot(fn + '/kprobe_clone')}); return 0; }}")
        # one declared argument: bcc 0.18's macros cannot take none, and
        # every probed function has at least one
        body.append(f"KFUNC_PROBE({fn}, void *a0) {{ bump({slot(fn + '/fentry')}); return 0; }}")
        body.append(f"KRETFUNC_PROBE({fn}, void *a0) {{ bump({slot(fn + '/fexit')}); return 0; }}")
        mod = syms.get(fn, (None, None))[1]
        if mod:
            body.append("#ifdef MODULE_KFUNC_PROBE")
            body.append(f"MODULE_KFUNC_PROBE({mod}, {fn}, void *a0) {{ bump({slot(fn + '/fentry_mod')}); return 0; }}")
            body.append(f"MODULE_KRETFUNC_PROBE({mod}, {fn}, void *a0) {{ bump({slot(fn + '/fexit_mod')}); return 0; }}")
            body.append("#endif")
    for tp in TRACEPOINTS:
        body.append(f"int tp_{c_ident(tp)}(void *ctx) {{ bump({slot(tp + '/tracepoint')}); return 0; }}")
    head = f"""
BPF_ARRAY(hits, u64, {len(slots)});
static __always_inline void bump(u32 k) {{
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
}}
"""
    return head + "\n".join(body) + "\n", slots


def read_hits(b: Any, slots: Dict[str, int]) -> Dict[str, int]:
    table = b[b"hits"]
    return {key: int(table[table.Key(i)].value) for key, i in slots.items()}


def workload(topo: Topology, phase) -> None:  # type: ignore[no-untyped-def]
    """Known traffic, split into named phases (``phase(name)`` marks an end)."""
    server = topo.tcp_server(8080)
    conns = topo.connect(topo.client_v4[0], N_CONN // 2, server)
    conns += topo.connect(topo.client_v4[1], N_CONN // 2, server)
    phase("connect")
    close_fin(conns[:10])
    close_rst(conns[10:])
    phase("close_fin_rst")
    victim = conns[0]
    run(["conntrack", "-D", "-p", "tcp", "--orig-src", victim.src, "--sport", str(victim.sport)],
        ns=topo.server_ns)
    phase("conntrack_D")
    conntrack_flush(topo.server_ns)
    phase("conntrack_F")
    run(["conntrack", "-I", "-p", "tcp", "-s", "198.51.100.200", "-d", "198.18.0.1",
         "--sport", "40000", "--dport", "8080", "--state", "ESTABLISHED", "-t", "100",
         "-u", "SEEN_REPLY"], ns=topo.server_ns)
    phase("conntrack_I")
    conntrack_flush(topo.server_ns)
    # table full of unassured UDP entries: new flows try early_drop, which
    # scans only a few buckets, so whether it evicts is luck (no assertion)
    sink = topo.udp_sink(5353)
    with sysctls({"net.netfilter.nf_conntrack_max": 8}):
        topo.send_udp(topo.client_v4[2], 8, sink)
        topo.send_udp(topo.client_v4[2], 3, sink)
        phase("full_early_drop")
        conntrack_flush(topo.server_ns)
        held = topo.connect(topo.client_v4[0], 8, server)
        _, stuck = topo.try_connect(topo.client_v4[1], 3, server, wait=0.3)
        abort_pending(stuck)
        phase("full_drop")
        close_rst(held)
        conntrack_flush(topo.server_ns)


@pytest.fixture(scope="module")
def smoke(lab_out: str) -> Dict[str, Any]:
    from bcc import BPF  # type: ignore[import-not-found]

    class ManualBPF(BPF):  # type: ignore[misc]
        """bcc without auto-attach: every probe is attached (or not) by us."""

        def _trace_autoload(self) -> None:
            pass

    syms = kallsyms()
    clones = clone_symbols()
    ftrace = filter_functions()
    text, slots = bpf_text(syms)
    b = ManualBPF(text=text.encode())
    from bcc import lib  # type: ignore[import-not-found]

    prog_names = [lib.bpf_function_name(b.module, i).decode()
                  for i in range(lib.bpf_num_functions(b.module))]
    targets: Dict[str, Any] = {}
    for fn in FUNCTIONS:
        i = c_ident(fn)
        sym, mod = syms.get(fn, (None, None))
        t: Dict[str, Any] = {"kind": "function", "symbol": sym, "module": mod,
                             "ftrace": any(f.split(".")[0] == fn for f in ftrace), "methods": {}}
        targets[fn] = t
        for method in METHODS:
            if method.endswith("_mod") and not mod:
                continue
            if method == "kprobe_clone" and not clones.get(fn):
                continue
            entry: Dict[str, Any] = {"attached": False}
            try:
                if sym is None:
                    raise LookupError("not in /proc/kallsyms")
                if method == "kprobe":
                    b.attach_kprobe(event=sym.encode(), fn_name=f"kp_{i}".encode())
                elif method == "kprobe_clone":
                    for clone in clones[fn]:
                        b.attach_kprobe(event=clone.encode(), fn_name=f"kpc_{i}".encode())
                    entry["symbols"] = clones[fn]
                elif method == "kretprobe":
                    b.attach_kretprobe(event=sym.encode(), fn_name=f"krp_{i}".encode())
                else:
                    kind = "kfunc" if method.startswith("fentry") else "kretfunc"
                    want = f"{kind}__{mod}__{fn}" if method.endswith("_mod") else None
                    names = [n for n in prog_names if n.startswith(kind + "__")
                             and n.endswith("__" + fn)
                             and (n == want if want else n in (f"{kind}__{fn}",
                                                                f"{kind}__vmlinux__{fn}"))]
                    if not names:
                        raise LookupError("bcc has no such macro")
                    if kind == "kfunc":
                        b.attach_kfunc(fn_name=names[0].encode())
                    else:
                        b.attach_kretfunc(fn_name=names[0].encode())
                entry["attached"] = True
            except Exception as e:  # noqa: BLE001 - any bcc failure is data here
                entry["error"] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            t["methods"][method] = entry
    for tp in TRACEPOINTS:
        entry = {"attached": False}
        try:
            b.attach_tracepoint(tp=tp.encode(), fn_name=f"tp_{c_ident(tp)}".encode())
            entry["attached"] = True
        except Exception as e:  # noqa: BLE001
            entry["error"] = str(e)[:200]
        targets[tp] = {"kind": "tracepoint", "symbol": tp, "module": None,
                       "methods": {"tracepoint": entry}}

    phases: List[Tuple[str, Dict[str, int]]] = []
    last = read_hits(b, slots)

    def phase(name: str) -> None:
        nonlocal last
        now = read_hits(b, slots)
        phases.append((name, {k: now[k] - last[k] for k in now if now[k] != last[k]}))
        last = now

    with Topology.create(prefix="smk") as topo:
        workload(topo, phase)
    total = read_hits(b, slots)
    for key, n in total.items():
        name, method = key.rsplit("/", 1)
        m = targets[name]["methods"].get(method)
        if m is not None:
            m["hits"] = n
            m["phases"] = {p: d[key] for p, d in phases if key in d}

    result = {
        "kernel": os.uname().release,
        "bcc": _bcc_version(),
        "btf_vmlinux": os.path.exists("/sys/kernel/btf/vmlinux"),
        "btf_nf_conntrack": os.path.exists("/sys/kernel/btf/nf_conntrack"),
        "module_kfunc_macro": any("__nf_conntrack__" in n for n in prog_names),
        "phases": [p for p, _ in phases],
        "related_symbols": related_symbols(),
        "targets": targets,
    }
    with open(os.path.join(lab_out, "smoke.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    b.cleanup()
    return result


def _bcc_version() -> str:
    try:
        import bcc  # type: ignore[import-not-found]

        return str(getattr(bcc, "__version__", "?"))
    except ImportError:
        return "?"


def method(smoke: Dict[str, Any], target: str, m: str) -> Dict[str, Any]:
    return smoke["targets"][target]["methods"].get(m, {"attached": False})


def test_tracepoint_fires(smoke: Dict[str, Any]) -> None:
    m = method(smoke, "sock:inet_sock_set_state", "tracepoint")
    assert m["attached"], m.get("error")
    # client and server socket of every connection change state
    assert m["phases"]["connect"] >= 2 * N_CONN


def test_confirm_kprobe_counts_every_new_flow(smoke: Dict[str, Any]) -> None:
    m = method(smoke, "__nf_conntrack_confirm", "kprobe")
    assert m["attached"], m.get("error")
    assert m["phases"]["connect"] == N_CONN


def test_tcp_packet_kprobe_fires(smoke: Dict[str, Any]) -> None:
    m = method(smoke, "nf_conntrack_tcp_packet", "kprobe")
    assert m["attached"], m.get("error")
    # at least SYN, ACK of every handshake seen at the server's input
    assert m["phases"]["connect"] >= 2 * N_CONN


def test_ctnetlink_delete_reaches_nf_ct_delete(smoke: Dict[str, Any]) -> None:
    """``conntrack -D`` calls nf_ct_delete from nf_conntrack_netlink."""
    attached = [m for m in ("kprobe", "fentry_mod", "fentry")
                if method(smoke, "nf_ct_delete", m)["attached"]]
    assert attached
    assert method(smoke, "nf_ct_delete", attached[0]).get("phases", {}).get("conntrack_D", 0) >= 1


def test_nf_ct_delete_sees_flush_with_clones(smoke: Dict[str, Any]) -> None:
    """``conntrack -F`` of 19 entries: kprobes on nf_ct_delete plus its GCC
    clones (5.10 and 7.2 have ``nf_ct_delete.part.0``) count all 19."""
    plain = method(smoke, "nf_ct_delete", "kprobe").get("phases", {}).get("conntrack_F", 0)
    clone = method(smoke, "nf_ct_delete", "kprobe_clone").get("phases", {}).get("conntrack_F", 0)
    assert plain + clone == N_CONN - 1


def test_fentry_works_on_vmlinux_control(smoke: Dict[str, Any]) -> None:
    """fentry machinery works where vmlinux BTF exists (tcp_v4_connect)."""
    if not smoke["btf_vmlinux"]:
        pytest.skip("no /sys/kernel/btf/vmlinux")
    m = method(smoke, "tcp_v4_connect", "fentry")
    assert m["attached"], m.get("error")
    assert m["phases"]["connect"] >= N_CONN


def test_failed_attach_does_not_spoil_others(smoke: Dict[str, Any]) -> None:
    """At least one probe failed (e.g. a missing function), kprobes still fired."""
    failed = [(t, m) for t, v in smoke["targets"].items()
              for m, e in v["methods"].items() if not e["attached"]]
    assert failed, "expected some attach failure (destroy_conntrack or nf_ct_destroy is absent)"
    assert method(smoke, "__nf_conntrack_confirm", "kprobe").get("hits", 0) > 0
