"""Kernel feature detection -> a frozen ProbePlan.

Every choice is made from what the running kernel shows, never from its
version number: /proc/kallsyms (symbols, and which module owns them),
tracefs available_filter_functions (what kprobes can attach to: inlined or
notrace functions are absent), /sys/kernel/btf (vmlinux and module BTF),
tracefs events (tracepoints) and /sys/module (loaded modules); whether the
BPF loader can attach fentry/fexit to a module function is a feature test of
the installed bcc (see `loader_verdict`), never a comparison of version strings.

`detect()` reads the live system; `plan_from(facts)` is pure, so unit tests
feed it fake listings. `ctrace probes` prints the plan; live.py attaches it.
"""

import dataclasses
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

# Methods
FENTRY = "fentry"
FENTRY_FEXIT = "fentry+fexit"
KPROBE = "kprobe"
KPROBE_KRETPROBE = "kprobe+kretprobe"
RAW_TRACEPOINT = "raw_tracepoint"
ABSENT = "absent"

# --attach-method / CTRACE_ATTACH_METHOD
METHOD_AUTO = "auto"
METHOD_KPROBE = "kprobe"
METHOD_FENTRY = "fentry"
METHODS = (METHOD_AUTO, METHOD_KPROBE, METHOD_FENTRY)

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
    # module -> {function: parameter count} from /sys/kernel/btf/<module>
    # (only the modules whose BTF was read; see read_facts)
    btf_funcs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    btf_errors: Mapping[str, str] = field(default_factory=dict)  # module -> why its BTF was not read
    # Can the BPF loader (bcc) attach fentry/fexit to a module function?
    loader_module_kfunc: bool = False
    loader_why: str = "BPF loader not examined"  # why not, when it cannot


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
    fallback: Optional["Probe"] = None  # fentry+fexit: the kprobe plan if their load fails
    fentry_unmet: bool = False  # fentry was demanded (--attach-method fentry) and is impossible

    @property
    def attached(self) -> bool:
        return self.method != ABSENT

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "function": self.function, "method": self.method, "why": self.why,
                "programs": [n for n in (self.entry, self.ret) if n] if self.attached else []}


@dataclass(frozen=True)
class ProbePlan:
    kernel: str
    probes: Tuple[Probe, ...]
    ringbuf: bool
    boot_ns: bool
    jiffies64: bool
    notes: Tuple[str, ...] = ()
    method: str = METHOD_AUTO  # what was asked for (--attach-method)

    def probe(self, name: str) -> Probe:
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(name)

    def missing_required(self) -> List[Probe]:
        return [p for p in self.probes if p.required and not p.attached]

    def unmet(self) -> List[Probe]:
        """With --attach-method fentry: probes that have a fentry variant but
        cannot use it here (their `why` says why). Empty otherwise."""
        return [p for p in self.probes if p.fentry_unmet]

    def replace(self, probe: Probe) -> "ProbePlan":
        """The plan with `probe` in place of the probe of the same name."""
        probes = tuple(probe if p.name == probe.name else p for p in self.probes)
        return dataclasses.replace(self, probes=probes)

    @property
    def fentry(self) -> bool:
        return any(p.method in (FENTRY, FENTRY_FEXIT) for p in self.probes)

    def cflags(self) -> List[str]:
        flags = []
        if self.ringbuf:
            flags.append("-DCT_RINGBUF")
        if self.boot_ns:
            flags.append("-DCT_HAVE_BOOT_NS")
        if self.jiffies64:
            flags.append("-DCT_HAVE_JIFFIES64")
        if self.fentry:
            flags.append("-DCT_FENTRY")
        ed = next((p for p in self.probes if p.name == "early_drop"), None)
        if ed is not None and ed.attached and ed.function != "early_drop":
            flags.append("-DCT_EARLY_DROP_CLONE")  # a gcc clone's arguments may differ: its net is not read
        return flags

    def to_json(self) -> Dict[str, Any]:
        return {
            "kernel": self.kernel,
            "probes": [p.to_json() for p in self.probes],
            "output": "ringbuf" if self.ringbuf else "perf_buffer",
            "clock": "boottime" if self.boot_ns else "monotonic",
            "jiffies64": self.jiffies64,
            "method": self.method,
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


# fentry/fexit variants in bpf/ctrace.bpf.c (MODULE_KFUNC_PROBE, named
# kfunc__<module>__<function>): function -> (module the variant is written for,
# parameters its programs need, whether that count must be exact). fexit sees
# the return value after the parameters, so a program that reads it needs the
# exact count; the others read only leading parameters.
_FENTRY_VARIANTS: Dict[str, Tuple[str, int, bool]] = {
    "__nf_conntrack_confirm": ("nf_conntrack", 1, True),  # (skb) -> verdict
    "__nf_conntrack_alloc": ("nf_conntrack", 6, True),  # (net, zone, orig, repl, gfp, hash) -> ct
    "nf_ct_delete": ("nf_conntrack", 1, False),
    "nf_ct_destroy": ("nf_conntrack", 1, False),
    "destroy_conntrack": ("nf_conntrack", 1, False),
    "early_drop": ("nf_conntrack", 1, False),
    "ctnetlink_del_conntrack": ("nf_conntrack_netlink", 1, False),
    "nf_conntrack_cleanup_net_list": ("nf_conntrack", 1, False),
    "nf_conntrack_tcp_packet": ("nf_conntrack", 1, False),
}


def _fentry_variant(function: str) -> Optional[Tuple[str, int, bool]]:
    return _FENTRY_VARIANTS.get(function)


def fentry_programs(function: str) -> Tuple[str, str]:
    """bcc names of the fentry and fexit programs written for `function`."""
    mod = _FENTRY_VARIANTS[function][0]
    return f"kfunc__{mod}__{function}", f"kretfunc__{mod}__{function}"


def _why_not_fentry(facts: KernelFacts, cand: str, sym: str) -> str:
    """Why fentry/fexit cannot be used for `cand` (attachable as `sym`); "" = it can."""
    if sym != cand:
        return f"gcc clone {sym}: BTF describes only {cand}, so no fentry"
    variant = _fentry_variant(cand)
    if variant is None:
        return "no fentry variant written for it"
    mod, nparams, exact = variant
    if "vmlinux" not in facts.btf:
        return "no kernel BTF (/sys/kernel/btf/vmlinux), so no fentry"
    if "bpf_trampoline_link_prog" not in facts.kallsyms:
        return "kernel has no BPF trampoline (bpf_trampoline_link_prog), so no fentry"
    owner = facts.kallsyms.get(sym, "")
    if owner != mod:
        return f"fentry variant is written for module {mod}, here {cand} is in {owner or 'vmlinux'}"
    if owner not in facts.btf:
        return f"{owner} is a module without BTF (no /sys/kernel/btf/{owner}), so no fentry"
    if not facts.loader_module_kfunc:
        return facts.loader_why
    funcs = facts.btf_funcs.get(owner)
    if funcs is None:
        return facts.btf_errors.get(owner, f"/sys/kernel/btf/{owner} not read")
    if cand not in funcs:
        return f"{cand} is not a function in /sys/kernel/btf/{owner}, so no fentry"
    n = funcs[cand]
    if n < nparams or (exact and n != nparams):
        return (f"BTF prototype of {cand} has {n} parameters, ctrace's fentry/fexit variant "
                f"expects {nparams}")
    return ""


def _function_probe(facts: KernelFacts, name: str, candidates: Iterable[str], entry: str, ret: str,
                    required: bool, purpose: str, allow_clones: bool = False,
                    shim: str = "", method: str = METHOD_AUTO) -> Probe:
    tried = []
    candidates = list(candidates)
    kprobes = "register_kprobe" in facts.kallsyms
    for cand in candidates:
        sym = _find(facts, cand, allow_clones)
        if sym is None:
            tried.append(cand)
            continue
        reasons = [purpose]
        if shim and cand != candidates[0]:
            reasons.append(shim)
        if sym != cand:
            reasons.append(f"gcc clone {sym} of static {cand}")
        kmethod = KPROBE_KRETPROBE if ret else KPROBE
        if method == METHOD_KPROBE:
            if not kprobes:
                break
            return Probe(name, sym, kmethod, "; ".join(reasons + ["kprobe requested (--attach-method kprobe)"]),
                         entry, ret, required)
        nof = _why_not_fentry(facts, cand, sym)
        kp: Optional[Probe] = None
        if kprobes:
            kp = Probe(name, sym, kmethod, "; ".join(reasons + ([nof] if nof else [])), entry, ret, required)
        if nof:
            if method == METHOD_FENTRY:
                return Probe(name, sym, kmethod if kprobes else ABSENT,
                             "; ".join(reasons + ["fentry impossible: " + nof]),
                             entry if kprobes else "", ret if kprobes else "", required, fentry_unmet=True)
            if kp is None:
                return Probe(name, "", ABSENT, "; ".join(reasons + [nof, "kernel has no kprobes (register_kprobe absent)"]),
                             "", "", required)
            return kp
        fe, fx = fentry_programs(cand)
        owner = facts.kallsyms.get(sym, "")
        yes = (f"fentry{'+fexit' if ret else ''}: {cand} is in /sys/kernel/btf/{owner} and bcc attaches "
               f"to module functions")
        if method == METHOD_AUTO:
            yes += " (kprobes if the load fails)" if kprobes else " (no kprobes to fall back to)"
        return Probe(name, sym, FENTRY_FEXIT if ret else FENTRY, "; ".join(reasons + [yes]),
                     fe, fx if ret else "", required, fallback=kp)
    if not kprobes and len(tried) < len(candidates):
        return Probe(name, "", ABSENT, f"{purpose}; kernel has no kprobes (register_kprobe absent)",
                     "", "", required)
    missing = ", ".join(tried)
    if any(c in facts.kallsyms for c in tried):
        why = f"{missing} exists but is not in available_filter_functions (inlined or notrace)"
    else:
        why = f"{missing} not found in /proc/kallsyms (module not loaded, or inlined)"
    return Probe(name, "", ABSENT, f"{purpose}; {why}", "", "", required)


def plan_from(facts: KernelFacts, method: str = METHOD_AUTO) -> ProbePlan:
    """The plan for `facts`. method: auto (fentry/fexit where possible, else
    kprobes), kprobe (kprobes only) or fentry (fentry/fexit for every function
    probe that has a variant; those that cannot get one are listed by unmet())."""
    if method not in METHODS:
        raise ValueError(f"attach method must be one of {', '.join(METHODS)}, not {method!r}")
    probes: List[Probe] = []
    probes.append(_function_probe(
        facts, "confirm", ["__nf_conntrack_confirm"], "confirm_e", "confirm_x", True,
        "insert: entry confirmed into the table (NF_ACCEPT + IPS_CONFIRMED), NF_DROP = insert failed", method=method))
    probes.append(_function_probe(
        facts, "delete", ["nf_ct_delete"], "delete_e", "", False,
        "removal choke point where not inlined (all removals on 6.x)", method=method))
    probes.append(_function_probe(
        facts, "destroy", ["nf_ct_destroy", "destroy_conntrack"], "destroy_e", "", True,
        "entry freed: catches removals whose nf_ct_delete call was inlined "
        "(5.10: flush and gc paths; measured 0/200 flushed entries at nf_ct_delete)",
        shim="destroy_conntrack: its name before the destroy hook moved into struct nf_ct_hook "
             "and became nf_ct_destroy (~5.19)", method=method))
    probes.append(_function_probe(
        facts, "alloc", ["__nf_conntrack_alloc"], "alloc_e", "alloc_x", False,
        "table full: ERR_PTR return with the refused original tuple", method=method))
    probes.append(_function_probe(
        facts, "early_drop", ["early_drop"], "early_drop_e", "early_drop_x", False,
        "tags removals as early_drop", allow_clones=True, method=method))
    probes.append(_function_probe(
        facts, "ctnetlink", ["ctnetlink_del_conntrack"], "ctnl_del_e", "untag_x", False,
        "tags removals by conntrack -D / -F (ctnetlink delete and flush)", allow_clones=True, method=method))
    probes.append(_function_probe(
        facts, "netns", ["nf_conntrack_cleanup_net_list"], "netns_e", "untag_x", False,
        "tags removals by network namespace teardown", method=method))
    probes.append(_function_probe(
        facts, "tcp_state", ["nf_conntrack_tcp_packet"], "tcp_e", "tcp_x", False,
        "conntrack TCP state changes (STATE events)", method=method))
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
    if method != METHOD_AUTO:
        notes.append(f"attach method {method} requested")
    return ProbePlan(facts.release, tuple(probes), ringbuf, boot_ns, jiffies64, tuple(notes), method)


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


# ---------------------------------------------------------------- BTF

_BTF_MAGIC = 0xEB9F
_BTF_KIND_FUNC = 12
_BTF_KIND_FUNC_PROTO = 13
# Bytes that follow the 12-byte common type header, per kind: (fixed, per vlen item).
# include/uapi/linux/btf.h; kinds 17-19 (DECL_TAG, TYPE_TAG, ENUM64) since 5.16-6.0.
_BTF_EXTRA = {1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
              8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0),
              15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12)}


class BtfError(ValueError):
    pass


@dataclass
class _Btf:
    types: List[Tuple[int, int, int, int]]  # (name_off, kind, vlen, type) per type id - 1 - first_id offset
    strings: bytes
    str_len: int


def _btf_parse(data: bytes) -> _Btf:
    if len(data) < 24:
        raise BtfError("BTF too short")
    magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != _BTF_MAGIC:
        raise BtfError(f"bad BTF magic {magic:#x}")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    t0, s0 = hdr_len + type_off, hdr_len + str_off
    if t0 + type_len > len(data) or s0 + str_len > len(data):
        raise BtfError("BTF sections beyond the end of the data")
    types: List[Tuple[int, int, int, int]] = []
    off, end = t0, t0 + type_len
    unpack = struct.unpack_from
    while off < end:
        name_off, info, typ = unpack("<III", data, off)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        extra = _BTF_EXTRA.get(kind)
        if extra is None:
            raise BtfError(f"unknown BTF kind {kind}")
        types.append((name_off, kind, vlen, typ))
        off += 12 + extra[0] + extra[1] * vlen
    if off != end:
        raise BtfError("BTF type section does not end on a type")
    return _Btf(types, data[s0:s0 + str_len], str_len)


def btf_functions(module: bytes, base: bytes = b"") -> Dict[str, int]:
    """{function name: parameter count} of the BTF_KIND_FUNCs in `module`.
    With `base` (vmlinux BTF), `module` is split BTF: its type ids follow the
    base's and its string offsets follow the base's string section."""
    b = _btf_parse(base) if base else None
    m = _btf_parse(module)
    first = len(b.types) + 1 if b else 1
    str_base = b.str_len if b else 0

    def name(off: int) -> str:
        if b and off < str_base:
            strs, off2 = b.strings, off
        else:
            strs, off2 = m.strings, off - str_base
        endp = strs.find(b"\0", off2)
        return strs[off2:endp if endp >= 0 else len(strs)].decode("ascii", "replace")

    def typ(tid: int) -> Optional[Tuple[int, int, int, int]]:
        if tid >= first and tid - first < len(m.types):
            return m.types[tid - first]
        if b and 1 <= tid <= len(b.types):
            return b.types[tid - 1]
        return None

    out: Dict[str, int] = {}
    for name_off, kind, _vlen, proto_id in m.types:
        if kind != _BTF_KIND_FUNC:
            continue
        proto = typ(proto_id)
        if proto is None or proto[1] != _BTF_KIND_FUNC_PROTO:
            continue
        out[name(name_off)] = proto[2]
    return out


# ---------------------------------------------------------------- the BPF loader


def libbcc_path() -> Optional[str]:
    """The libbcc shared object this process loaded (import bcc first)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and "/libbcc.so" in parts[5]:
                    return parts[5].strip()
    except OSError:
        pass
    return None


def _file_contains(path: str, needle: bytes) -> bool:
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(needle) >= 0
        except ValueError:  # empty file
            return False


def loader_verdict(bpf_cls: Any, libbcc: Optional[str]) -> Tuple[bool, str]:
    """Can this bcc attach fentry/fexit to a module function? A feature test:
    the Python API for fentry programs, and module kfunc support in libbcc
    (bcc commit "bcc: Add module kfunc/kretfunc support" added the
    MODULE_KFUNC_PROBE macro to the helpers.h that libbcc embeds, and module
    BTF lookup to its loader, together)."""
    if bpf_cls is None:
        return False, "bcc (python3-bpfcc) is not installed, so no fentry"
    if not all(hasattr(bpf_cls, a) for a in ("attach_kfunc", "attach_kretfunc", "load_func", "TRACING")):
        return False, "this bcc has no fentry API (BPF.attach_kfunc), so no fentry"
    if not libbcc:
        return False, "cannot find the libbcc this bcc loaded, so module fentry support is unknown"
    try:
        ok = _file_contains(libbcc, b"MODULE_KFUNC_PROBE")
    except OSError as exc:
        return False, f"cannot read {libbcc} ({exc.strerror}), so module fentry support is unknown"
    if not ok:
        return False, ("this bcc resolves fentry targets in vmlinux BTF only (its libbcc has no "
                       "MODULE_KFUNC_PROBE; measured ENOENT with bcc 0.26)")
    return True, ""


# ---------------------------------------------------------------- reading the system

def _loader_not_examined() -> Tuple[bool, str]:
    return False, "BPF loader not examined, so no fentry"


def _owners(kallsyms: Mapping[str, str]) -> FrozenSet[str]:
    """Modules owning functions that have fentry variants."""
    return frozenset(kallsyms[f] for f in _FENTRY_VARIANTS if kallsyms.get(f))


def read_facts(root: str = "/", method: str = METHOD_AUTO,
               loader: Optional[Callable[[], Tuple[bool, str]]] = None) -> KernelFacts:
    """Read the live system (root="/") or a fake tree laid out the same way.
    BTF and the loader are examined only when fentry may be used (method is
    not kprobe and a module that owns a probed function has BTF)."""
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
    loader_ok, loader_why = False, "BPF loader not examined (no module BTF, or kprobes requested)"
    btf_funcs: Dict[str, Dict[str, int]] = {}
    btf_errors: Dict[str, str] = {}
    owners = sorted(m for m in _owners(kallsyms) if m in btf)
    if method != METHOD_KPROBE and owners and "vmlinux" in btf:
        loader_ok, loader_why = (loader or _loader_not_examined)()
        if loader_ok:
            btf_dir = os.path.join(root, "sys/kernel/btf")
            try:
                with open(os.path.join(btf_dir, "vmlinux"), "rb") as f:
                    base: Optional[bytes] = f.read()
            except OSError as exc:
                base = None
                for m in owners:
                    btf_errors[m] = f"cannot read /sys/kernel/btf/vmlinux ({exc.strerror})"
            for m in owners if base is not None else []:
                try:
                    with open(os.path.join(btf_dir, m), "rb") as f:
                        btf_funcs[m] = btf_functions(f.read(), base)
                except (OSError, BtfError) as exc:
                    btf_errors[m] = f"cannot read /sys/kernel/btf/{m} ({getattr(exc, 'strerror', None) or exc})"
    return KernelFacts(release, kallsyms, filter_functions, ff_text is not None, btf,
                       frozenset(tracepoints), modules, btf_funcs, btf_errors, loader_ok, loader_why)


def detect(root: str = "/", method: str = METHOD_AUTO,
           loader: Optional[Callable[[], Tuple[bool, str]]] = None) -> ProbePlan:
    """The plan for this system. `loader` answers whether the BPF loader can
    attach fentry to module functions (ctrace.sources.live.loader_facts
    imports bcc to find out); without it fentry is not considered."""
    return plan_from(read_facts(root, method, loader), method)
