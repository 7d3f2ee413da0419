"""Kernel feature detection -> a frozen ProbePlan.

Every choice is made from what the running kernel shows, never from its
version number: /proc/kallsyms (symbols, and which module owns them),
tracefs available_filter_functions (what kprobes can attach to: inlined or
notrace functions are absent), /sys/kernel/btf (vmlinux and module BTF),
tracefs events (tracepoints) and /sys/module (loaded modules).

`detect()` reads the live system; `plan_from(facts)` is pure, so unit tests
feed it fake listings. `ctrace probes` prints the plan; live.py attaches it.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

# Methods
FENTRY = "fentry"
FENTRY_FEXIT = "fentry+fexit"
KPROBE = "kprobe"
KPROBE_KRETPROBE = "kprobe+kretprobe"
RAW_TRACEPOINT = "raw_tracepoint"
ABSENT = "absent"

# Suffixes gcc gives out-of-line copies of static functions whose ABI it did
# not change in a way that matters to a probe that reads no argument.
_CLONE_SUFFIX = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*)\.(isra|constprop)\.\d+$")


@dataclass(frozen=True)
class KernelFacts:
    """What the kernel shows. Sets of names; module owners from kallsyms."""

    release: str = ""
    kallsyms: Mapping[str, str] = field(default_factory=dict)  # symbol -> module ("" = vmlinux)
    filter_functions: FrozenSet[str] = frozenset()  # tracefs available_filter_functions
    filter_functions_known: bool = True  # False: tracefs unreadable, trust kallsyms
    btf: FrozenSet[str] = frozenset()  # names under /sys/kernel/btf
    tracepoints: FrozenSet[str] = frozenset()  # "sock:inet_sock_set_state"
    modules: FrozenSet[str] = frozenset()  # loaded modules (/sys/module)
    loader_module_btf: bool = False  # can the BPF loader resolve fentry targets in module BTF?


@dataclass(frozen=True)
class Probe:
    """One logical probe: which kernel function, attached how, and why."""

    name: str  # logical name, e.g. "confirm"
    function: str  # kernel symbol (or tracepoint) attached; "" when absent
    method: str  # FENTRY_FEXIT, KPROBE_KRETPROBE, KPROBE, RAW_TRACEPOINT, ABSENT
    why: str
    entry: str = ""  # BPF program for entry / tracepoint
    ret: str = ""  # BPF program for return ("" = none)
    required: bool = False

    @property
    def attached(self) -> bool:
        return self.method != ABSENT

    def to_json(self) -> Dict[str, str]:
        return {"name": self.name, "function": self.function, "method": self.method, "why": self.why}


@dataclass(frozen=True)
class ProbePlan:
    kernel: str
    probes: Tuple[Probe, ...]
    ringbuf: bool
    boot_ns: bool
    jiffies64: bool
    notes: Tuple[str, ...] = ()

    def probe(self, name: str) -> Probe:
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(name)

    def missing_required(self) -> List[Probe]:
        return [p for p in self.probes if p.required and not p.attached]

    def cflags(self) -> List[str]:
        flags = []
        if self.ringbuf:
            flags.append("-DCT_RINGBUF")
        if self.boot_ns:
            flags.append("-DCT_HAVE_BOOT_NS")
        if self.jiffies64:
            flags.append("-DCT_HAVE_JIFFIES64")
        return flags

    def to_json(self) -> Dict[str, Any]:
        return {
            "kernel": self.kernel,
            "probes": [p.to_json() for p in self.probes],
            "output": "ringbuf" if self.ringbuf else "perf_buffer",
            "clock": "boottime" if self.boot_ns else "monotonic",
            "jiffies64": self.jiffies64,
            "notes": list(self.notes),
        }

    def probes_info(self) -> List[Dict[str, str]]:
        """For SourceInfo.probes: {function, method, why} of every probe."""
        return [{"function": p.function or p.name, "method": p.method, "why": p.why} for p in self.probes]


# ---------------------------------------------------------------- pure planning


def _attachable(facts: KernelFacts, name: str) -> bool:
    if name not in facts.kallsyms:
        return False
    if facts.filter_functions_known:
        return name in facts.filter_functions
    return True


def _find(facts: KernelFacts, name: str, allow_clones: bool) -> Optional[str]:
    """The attachable symbol for `name`: itself, or (when allowed) a gcc clone."""
    if _attachable(facts, name):
        return name
    if allow_clones:
        pool = facts.filter_functions if facts.filter_functions_known else facts.kallsyms.keys()
        for sym in sorted(pool):
            m = _CLONE_SUFFIX.match(sym)
            if m and m.group("base") == name and sym in facts.kallsyms:
                return sym
    return None


def _why_not_fentry(facts: KernelFacts, sym: str) -> str:
    """Why a kprobe is used instead of fentry for `sym` ("" = fentry is possible)."""
    if "vmlinux" not in facts.btf:
        return "no kernel BTF (/sys/kernel/btf/vmlinux), so no fentry"
    if "bpf_trampoline_link_prog" not in facts.kallsyms:
        return "kernel has no BPF trampoline, so no fentry"
    owner = facts.kallsyms.get(sym, "")
    if owner:
        if owner not in facts.btf:
            return f"{owner} is a module without BTF, so no fentry"
        if not facts.loader_module_btf:
            return (f"{owner} is a module; bcc resolves fentry targets in vmlinux BTF only "
                    f"(measured: ENOENT with bcc 0.26, 0.31, 0.37)")
    return ""


def _function_probe(facts: KernelFacts, name: str, candidates: Iterable[str], entry: str, ret: str,
                    required: bool, purpose: str, allow_clones: bool = False,
                    shim: str = "") -> Probe:
    tried = []
    if "register_kprobe" not in facts.kallsyms:
        return Probe(name, "", ABSENT, f"{purpose}; kernel has no kprobes (register_kprobe absent)",
                     "", "", required)
    for cand in candidates:
        sym = _find(facts, cand, allow_clones)
        if sym is None:
            tried.append(cand)
            continue
        reasons = [purpose]
        if shim and cand != list(candidates)[0]:
            reasons.append(shim)
        if sym != cand:
            reasons.append(f"gcc clone {sym} of static {cand}")
        # No fentry/fexit variants are written yet for module functions; the
        # reason says which fact rules fentry out on this kernel.
        nof = _why_not_fentry(facts, sym) or "fentry variant not built in this ctrace"
        reasons.append(nof)
        method = KPROBE_KRETPROBE if ret else KPROBE
        return Probe(name, sym, method, "; ".join(reasons), entry, ret, required)
    missing = ", ".join(tried)
    if any(c in facts.kallsyms for c in tried):
        why = f"{missing} exists but is not in available_filter_functions (inlined or notrace)"
    else:
        why = f"{missing} not found in /proc/kallsyms (module not loaded, or inlined)"
    return Probe(name, "", ABSENT, f"{purpose}; {why}", "", "", required)


def plan_from(facts: KernelFacts) -> ProbePlan:
    probes: List[Probe] = []
    probes.append(_function_probe(
        facts, "confirm", ["__nf_conntrack_confirm"], "confirm_e", "confirm_x", True,
        "insert: entry confirmed into the table (NF_ACCEPT + IPS_CONFIRMED), NF_DROP = insert failed"))
    probes.append(_function_probe(
        facts, "delete", ["nf_ct_delete"], "delete_e", "", False,
        "removal choke point where not inlined (all removals on 6.x)"))
    probes.append(_function_probe(
        facts, "destroy", ["nf_ct_destroy", "destroy_conntrack"], "destroy_e", "", True,
        "entry freed: catches removals whose nf_ct_delete call was inlined "
        "(5.10: flush and gc paths; measured 0/200 flushed entries at nf_ct_delete)",
        shim="destroy_conntrack: its name before the destroy hook moved into struct nf_ct_hook "
             "and became nf_ct_destroy (~5.19)"))
    probes.append(_function_probe(
        facts, "alloc", ["__nf_conntrack_alloc"], "alloc_e", "alloc_x", False,
        "table full: ERR_PTR return with the refused original tuple"))
    probes.append(_function_probe(
        facts, "early_drop", ["early_drop"], "early_drop_e", "early_drop_x", False,
        "tags removals as early_drop", allow_clones=True))
    probes.append(_function_probe(
        facts, "ctnetlink", ["ctnetlink_del_conntrack"], "ctnl_del_e", "untag_x", False,
        "tags removals by conntrack -D / -F (ctnetlink delete and flush)", allow_clones=True))
    probes.append(_function_probe(
        facts, "netns", ["nf_conntrack_cleanup_net_list"], "netns_e", "untag_x", False,
        "tags removals by network namespace teardown"))
    probes.append(_function_probe(
        facts, "tcp_state", ["nf_conntrack_tcp_packet"], "tcp_e", "tcp_x", False,
        "conntrack TCP state changes (STATE events)"))
    # Sockets: the tracepoint, as a raw tracepoint (no format decoding).
    raw_tp = "bpf_get_raw_tracepoint" in facts.kallsyms or "bpf_raw_tracepoint_open" in facts.kallsyms
    if "sock:inet_sock_set_state" in facts.tracepoints and raw_tp:
        probes.append(Probe("sock", "sock:inet_sock_set_state", RAW_TRACEPOINT,
                            "local TCP socket reaching CLOSE -> orphan check; raw tracepoint "
                            "(cheapest hook; tp_btf needs BTF-aware attach)",
                            "sock_state_rtp", "", False))
    else:
        probes.append(_function_probe(
            facts, "sock", ["tcp_set_state"], "tcp_set_state_e", "", False,
            "local TCP socket reaching CLOSE -> orphan check (no inet_sock_set_state raw tracepoint)"))

    ringbuf = "bpf_ringbuf_reserve" in facts.kallsyms or "ringbuf_map_alloc" in facts.kallsyms
    boot_ns = "bpf_ktime_get_boot_ns" in facts.kallsyms or "bpf_ktime_get_boot_ns_proto" in facts.kallsyms
    jiffies64 = "bpf_jiffies64" in facts.kallsyms or "bpf_jiffies64_proto" in facts.kallsyms
    notes = []
    if not ringbuf:
        notes.append("no BPF ring buffer: perf buffer per CPU")
    if not boot_ns:
        notes.append("no bpf_ktime_get_boot_ns: timestamps are CLOCK_MONOTONIC")
    if not jiffies64:
        notes.append("no bpf_jiffies64: timeout_s unknown, removals not classed by expiry")
    return ProbePlan(facts.release, tuple(probes), ringbuf, boot_ns, jiffies64, tuple(notes))


# ---------------------------------------------------------------- reading the system

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def parse_kallsyms(text: str) -> Dict[str, str]:
    """'addr type name [module]' lines -> {name: module or ""}."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mod = parts[3].strip("[]") if len(parts) > 3 else ""
        name = parts[2]
        if name not in out or not mod:
            out[name] = mod
    return out


def parse_filter_functions(text: str) -> FrozenSet[str]:
    """'name [module]' (or 'addr name [module]' in _addrs) lines -> names."""
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{8,16}", parts[0]) and not parts[1].startswith("["):
            names.add(parts[1])
        else:
            names.add(parts[0])
    return frozenset(names)


def tracefs_root(root: str = "/") -> Optional[str]:
    for t in TRACEFS:
        p = os.path.join(root, t.lstrip("/"))
        if os.path.exists(os.path.join(p, "available_filter_functions")):
            return p
    return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_facts(root: str = "/", loader_module_btf: bool = False) -> KernelFacts:
    """Read the live system (root="/") or a fake tree laid out the same way."""
    rel = _read(os.path.join(root, "proc/sys/kernel/osrelease"))
    release = rel.strip() if rel else os.uname().release
    kallsyms = parse_kallsyms(_read(os.path.join(root, "proc/kallsyms")) or "")
    tfs = tracefs_root(root)
    ff_text = _read(os.path.join(tfs, "available_filter_functions")) if tfs else None
    filter_functions = parse_filter_functions(ff_text or "")
    tracepoints = set()
    if tfs and os.path.isdir(os.path.join(tfs, "events", "sock", "inet_sock_set_state")):
        tracepoints.add("sock:inet_sock_set_state")
    elif "__tracepoint_inet_sock_set_state" in kallsyms:
        tracepoints.add("sock:inet_sock_set_state")
    try:
        btf = frozenset(os.listdir(os.path.join(root, "sys/kernel/btf")))
    except OSError:
        btf = frozenset()
    try:
        modules = frozenset(os.listdir(os.path.join(root, "sys/module")))
    except OSError:
        modules = frozenset()
    return KernelFacts(release, kallsyms, filter_functions, ff_text is not None, btf,
                       frozenset(tracepoints), modules, loader_module_btf)


def detect(root: str = "/") -> ProbePlan:
    return plan_from(read_facts(root))
