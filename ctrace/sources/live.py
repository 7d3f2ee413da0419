"""The live source: ctrace's BPF programs in the running kernel (bcc).

The only module that imports bcc. Order of start-up, so the picture is exact
from the first second: preflight checks -> plan (ctrace.kernel) -> one compile
-> attach every probe (return probes before entry probes; a fentry/fexit pair
whose load fails falls back to its kprobes, unless fentry was demanded)
-> read the entries
that already exist -> drain what the probes saw meanwhile (an entry that shows
up both as NEW and in the listing keeps only its NEW) -> stream.
"""

import ctypes
import mmap
import os
import re
import socket
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ctrace import abi, kernel, sysinfo
from ctrace.sources import prog_info
from ctrace.sources.base import DEFAULT_RING_PAGES, Source, SourceInfo
from ctrace.status import CtraceError, ExitStatus

CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", 7)
# Events this close to "now" wait for the next batch: keeps cross-CPU order,
# and gives an ORPHAN candidate its grace period (see _confirm_orphans).
ORPHAN_GRACE_NS = 300_000_000
HOLDBACK_NS = ORPHAN_GRACE_NS
RINGBUF_BUSY_BIT = 1 << 31  # a reserved record not yet submitted (kernel/bpf/ringbuf.c)
RINGBUF_FLAG_BITS = RINGBUF_BUSY_BIT | 1 << 30  # busy, discarded
RINGBUF_RECORD_BYTES = 8 + -(-abi.EVENT_SIZE // 8) * 8  # one event in the ring: length word, pad, data to 8 bytes
SKIPS_COUNTED = "each program's recursion_misses (kprobe and raw tracepoint skips only since 6.7)"
SKIPS_UNCOUNTED = "not counted: this kernel reports no recursion_misses for BPF programs"


def boot_ns() -> int:
    return time.clock_gettime_ns(CLOCK_BOOTTIME)


def bpf_dir() -> Path:
    """bpf/ in a source tree, or the installed ctrace.bpf package data."""
    here = Path(__file__).resolve().parent.parent.parent / "bpf"
    if (here / "ctrace.bpf.c").is_file():
        return here
    import importlib.util

    spec = importlib.util.find_spec("ctrace.bpf")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "ctrace.bpf.c").is_file():
                return Path(loc)
    raise CtraceError("cannot find ctrace's BPF sources (bpf/ctrace.bpf.c)", ExitStatus.ERROR)


# ---------------------------------------------------------------- preflight


def _cap_eff() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def check_privileges() -> None:
    """The effective capabilities decide, for root too: root without them (a container,
    `setpriv --bounding-set=-all`) would otherwise fail only after the compile."""
    caps = _cap_eff()
    if caps is None:  # no /proc: trust the uid
        caps = -1 if os.geteuid() == 0 else 0
    cap_sys_admin, cap_perfmon, cap_bpf = 1 << 21, 1 << 38, 1 << 39
    if caps & cap_sys_admin or (caps & cap_bpf and caps & cap_perfmon):
        return
    if os.geteuid() == 0:
        raise CtraceError("tracing needs CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN) and this root process has "
                          "neither (a container without them?)", ExitStatus.NO_PRIVILEGE)
    raise CtraceError("tracing needs root (or CAP_BPF+CAP_PERFMON): run it with sudo",
                      ExitStatus.NO_PRIVILEGE)


def check_conntrack() -> None:
    if os.path.isdir("/sys/module/nf_conntrack") or os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        return
    raise CtraceError("nf_conntrack is not loaded (modprobe nf_conntrack, or load a ruleset that uses "
                      "conntrack)", ExitStatus.NO_CONNTRACK)


def check_headers(release: str) -> None:
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    base = f"/lib/modules/{release}"
    for d in ("build", "source"):
        if os.path.isdir(os.path.join(base, d, "include")):
            return
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return
    raise CtraceError(f"no kernel headers for {release}: install linux-headers-{release}",
                      ExitStatus.NO_KERNEL_HEADERS)


def import_bcc() -> Any:
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise CtraceError("bcc is not installed: install python3-bpfcc (the distribution package)",
                          ExitStatus.NO_BCC) from None
    return bcc


def load_module(name: str) -> None:
    """Best effort modprobe (ctnetlink must be loaded before we attach to it)."""
    if os.path.isdir(f"/sys/module/{name}"):
        return
    try:
        import subprocess

        subprocess.run(["modprobe", "-q", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=30)
    except (OSError, Exception):
        pass


_BCC_KPROBE = re.compile(r"^[pr]:kprobes/(?P<name>\S*_bcc_(?P<pid>\d+))\s")


def clear_orphan_kprobes() -> List[str]:
    """Remove kprobe_events entries left by bcc processes that died (SIGKILL with
    legacy kprobes). Returns the names removed."""
    root = kernel.tracefs_root()
    if not root:
        return []
    path = os.path.join(root, "kprobe_events")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    removed = []
    for line in lines:
        m = _BCC_KPROBE.match(line + " ")
        if not m or os.path.exists(f"/proc/{m.group('pid')}"):
            continue
        try:
            with open(path, "a") as f:
                f.write(f"-:kprobes/{m.group('name')}\n")
            removed.append(m.group("name"))
        except OSError:
            pass
    return removed


@contextmanager
def captured_stderr() -> Iterator[List[str]]:
    """Capture fd 2 (where bcc's C code prints compiler and verifier logs)."""
    out: List[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


ATTACH_METHOD_ENV = "CTRACE_ATTACH_METHOD"


def attach_method(method: Optional[str] = None) -> str:
    """The attach method asked for: the argument, else $CTRACE_ATTACH_METHOD, else auto."""
    m = method or os.environ.get(ATTACH_METHOD_ENV) or kernel.METHOD_AUTO
    if m not in kernel.METHODS:
        raise CtraceError(f"attach method must be one of {', '.join(kernel.METHODS)}, not {m!r}"
                          f"{' (from $' + ATTACH_METHOD_ENV + ')' if not method else ''}", ExitStatus.USAGE)
    return m


def loader_facts() -> Tuple[bool, str]:
    """(bcc can attach fentry/fexit to module functions, why not): a feature
    test of the installed bcc (kernel.loader_verdict), never its version."""
    try:
        import bcc
    except ImportError:
        return kernel.loader_verdict(None, None)
    except Exception as exc:  # a broken install raises more than ImportError
        return False, f"bcc does not import ({type(exc).__name__}), so no fentry"
    return kernel.loader_verdict(bcc.BPF, kernel.libbcc_path())


def detect(method: Optional[str] = None) -> kernel.ProbePlan:
    """The attach plan for the running kernel and the installed bcc."""
    return kernel.detect(method=attach_method(method), loader=loader_facts)


def _no_autoload(bcc: Any) -> Any:
    """bcc's BPF without auto-attach: it would attach every kfunc__ program at
    load, and one that fails would fail the whole object. ctrace attaches each
    program itself, as the plan says."""

    class BPF(bcc.BPF):  # type: ignore[misc,name-defined]
        def _trace_autoload(self) -> None:
            pass

    return BPF


def _log_tail(log: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no log)"


# ---------------------------------------------------------------- aggregates

IPSTAT_DTYPE = np.dtype([
    ("netns_ino", "<u4"), ("family", "u1"), ("addr", "16u1"),
    ("created", "<u8"), ("destroyed", "<u8", (8,)), ("orphans", "<u8"),
    ("drop_table_full", "<u8"), ("drop_insert_failed", "<u8"),
])


def ring_positions(m: Any, page: int, size: int) -> Dict[str, int]:
    """Parse a BPF ring buffer's mapping (consumer page, producer page, data mapped
    twice): consumer and producer positions, pending (the oldest record not yet
    committed, kept by kernels since 6.8; 0 before), and the length word of the record
    the consumer waits at. Its busy bit set means a program reserved that record and
    has not submitted it; then what the program had written so far is decoded too."""
    (cons,) = struct.unpack_from("<Q", m, 0)
    prod, pend = struct.unpack_from("<QQ", m, page)
    at = 2 * page + (cons & (size - 1))
    (head,) = struct.unpack_from("<I", m, at)
    busy = bool(head & RINGBUF_BUSY_BIT) and cons < prod
    out = {"consumer": cons, "producer": prod, "pending": pend, "head_len": head & ~RINGBUF_FLAG_BITS,
           "head_busy": int(busy)}
    if busy:
        r = abi.decode(bytes(m[at + 8:at + 8 + abi.EVENT_SIZE]))[0]
        out.update(head_kind=int(r["kind"]), head_ts_boot_ns=int(r["ts_boot_ns"]))
    return out


class LiveSource(Source):
    """Events from the running kernel. Raises CtraceError (one line, an exit
    status) when it cannot start."""

    def __init__(self, interval: float = 0.2, ring_pages: int = DEFAULT_RING_PAGES,
                 map_entries: Optional[int] = None, verbose: bool = False,
                 counter_every: float = 1.0, read_existing: bool = True,
                 log: Any = None, method: Optional[str] = None) -> None:
        self.interval = interval
        self.counter_every = counter_every
        self.verbose = verbose
        self._log = log or sys.stderr
        self._stopping = False
        self._closed = False
        self._b: Any = None
        self._chunks: List[bytes] = []
        self._pending = abi.empty(0)
        self._lost_seen = [0] * 8
        self._skips_seen: Dict[str, Optional[int]] = {}
        self._last_counter = 0.0
        self._ring_map: Optional[mmap.mmap] = None
        self._ring_peak = 0  # most bytes waiting in the ring at a poll since the last COUNTER records
        self._existing = abi.empty(0)
        self.orphans_withdrawn = 0
        self.attach_seconds = 0.0
        self.fentry_fallbacks: List[str] = []  # "function: why" of fentry loads that failed

        method = attach_method(method)
        release = os.uname().release
        check_privileges()
        bcc = import_bcc()
        check_conntrack()
        check_headers(release)
        self.cleared = clear_orphan_kprobes()
        load_module("nf_conntrack_netlink")
        self.plan = detect(method)
        missing = self.plan.missing_required()
        if missing:
            p = missing[0]
            raise CtraceError(f"cannot attach {p.name} on {release}: {p.why}", ExitStatus.ATTACH_FAILED)
        unmet = self.plan.unmet()
        if unmet:
            p = unmet[0]
            raise CtraceError(f"cannot attach fentry to {p.function} ({p.name}) on {release}: "
                              f"{p.why.rsplit('fentry impossible: ', 1)[-1]}", ExitStatus.ATTACH_FAILED)

        sysctls = sysinfo.read_sysctls()
        ct_max = sysctls.get("nf_conntrack_max", 65536)
        if map_entries is None:
            map_entries = min(max(ct_max + ct_max // 4 + 1024, 16384), 1 << 21)
        pages = 1 << max(0, int(ring_pages) - 1).bit_length()  # power of two
        self.ring_pages = pages
        self.map_entries = map_entries
        src = (bpf_dir() / "ctrace.bpf.c").read_text()
        cflags = self.plan.cflags() + [
            f"-I{bpf_dir()}",
            f"-DCT_RING_PAGES={pages}",
            f"-DCT_MAP_ENTRIES={map_entries}",
            "-Wno-macro-redefined",
            "-Wno-unused-function",
        ]
        t0 = time.monotonic()
        with captured_stderr() as logs:
            try:
                self._b = _no_autoload(bcc)(text=src.encode(), cflags=cflags)
            except Exception as exc:  # bcc raises bare Exception
                self._b = None
                err: Optional[Exception] = exc
            else:
                err = None
        log_text = "".join(logs)
        if err is not None:
            if self.verbose:
                self._log.write(log_text)
            raise CtraceError(f"BPF compile failed on {release}: {_log_tail(log_text)}", ExitStatus.ERROR)
        self.compile_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            self._attach_all(release)
            self._open_output()
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - t0
        skips = self.prog_skips()
        self.skips_counted = all(v is not None for v in skips.values())
        # streamed per program from 0, like the lost counters (_lost_seen)
        self._skips_seen = {name: None if v is None else 0 for name, v in skips.items()}
        self.start_boot_ns = boot_ns()
        self.boot_to_wall_ns = time.time_ns() - boot_ns()
        self.problems: List[str] = []
        if read_existing:
            self._existing, self.problems = sysinfo.dump_entries(boot_ns())
            self._drain()
            self._dedupe_existing()
        self.info = SourceInfo(
            hostname=socket.gethostname(),
            kernel=release,
            boot_to_wall_ns=self.boot_to_wall_ns,
            start_boot_ns=self.start_boot_ns,
            sysctls=sysctls,
            probes=self.plan.probes_info(),
            synthetic=False,
            extra={"plan": self.plan.to_json(), "ring_pages": pages, "map_entries": map_entries,
                   "existing_problems": list(self.problems),
                   "skipped_runs": SKIPS_COUNTED if self.skips_counted else SKIPS_UNCOUNTED,
                   "compile_seconds": round(self.compile_seconds, 2),
                   "attach_seconds": round(self.attach_seconds, 2)},
        )

    # ------------------------------------------------------------ attach

    def _load_fentry(self, p: kernel.Probe, release: str) -> kernel.Probe:
        """Load p's fentry/fexit programs (the BTF lookup and the verifier
        run here). On failure: p's kprobe fallback, its why saying what failed
        (or, when fentry was demanded, a one-line error)."""
        b = self._b
        with captured_stderr() as logs:
            try:
                for name in (p.ret, p.entry):
                    if name:
                        b.load_func(name.encode(), b.TRACING)
                err: Optional[Exception] = None
            except Exception as exc:
                err = exc
        if err is None:
            return p
        log_text = "".join(logs)
        if self.verbose:
            self._log.write(log_text)
        detail = f"{str(err).strip()} ({_log_tail(log_text, 2)})"
        if self.plan.method == kernel.METHOD_FENTRY or p.fallback is None:
            raise CtraceError(f"cannot load fentry for {p.function} on {release}: {detail}",
                              ExitStatus.ATTACH_FAILED)
        self.fentry_fallbacks.append(f"{p.function}: {detail}")
        self._log.write(f"ctrace: note: fentry load failed for {p.function}, using kprobes: {detail}\n")
        kp = p.fallback
        return kernel.Probe(kp.name, kp.function, kp.method,
                            f"{kp.why}; fentry load failed: {detail}",
                            kp.entry, kp.ret, kp.required)

    def _attach_all(self, release: str) -> None:
        b = self._b
        for p in self.plan.probes:
            if not p.attached:
                continue
            if p.method in (kernel.FENTRY, kernel.FENTRY_FEXIT):
                q = self._load_fentry(p, release)
                if q is not p:
                    self.plan = self.plan.replace(q)
                    p = q
            with captured_stderr() as logs:
                try:
                    if p.method in (kernel.FENTRY, kernel.FENTRY_FEXIT):
                        if p.ret:  # return program first: no entry without its return
                            b.attach_kretfunc(fn_name=p.ret.encode())
                        b.attach_kfunc(fn_name=p.entry.encode())
                    elif p.method == kernel.RAW_TRACEPOINT:
                        b.attach_raw_tracepoint(tp=p.function.split(":")[-1], fn_name=p.entry)
                    else:
                        if p.ret:  # return probe first: no entry without its return
                            b.attach_kretprobe(event=p.function, fn_name=p.ret)
                        b.attach_kprobe(event=p.function, fn_name=p.entry)
                    err: Optional[Exception] = None
                except Exception as exc:
                    err = exc
            if err is None:
                continue
            log_text = "".join(logs)
            msg = str(err)
            if self.verbose:
                self._log.write(log_text)
            if "Failed to load BPF program" in msg or "load program" in msg.lower():
                prog = p.ret if p.ret and p.ret.encode() in msg.encode() else p.entry
                raise CtraceError(f"verifier rejected {prog} ({p.function}) on {release}: "
                                  f"{_log_tail(log_text)}", ExitStatus.VERIFIER_REJECTED)
            if p.required:
                raise CtraceError(f"cannot attach {p.method} to {p.function} on {release}: {msg}",
                                  ExitStatus.ATTACH_FAILED)
            self._log.write(f"ctrace: warning: {p.function} not attached ({msg}); {p.name} events missing\n")

    def _open_output(self) -> None:
        table = self._b["events"]
        if self.plan.ringbuf:
            table.open_ring_buffer(self._on_ring)
        else:
            per_cpu = max(8, self.ring_pages // max(1, os.cpu_count() or 1))
            per_cpu = 1 << (per_cpu - 1).bit_length()
            table.open_perf_buffer(self._on_perf, page_cnt=per_cpu, lost_cb=self._on_perf_lost)

    def _on_ring(self, ctx: Any, data: Any, size: int) -> None:
        self._chunks.append(ctypes.string_at(data, size))

    def _on_perf(self, cpu: int, data: Any, size: int) -> None:
        self._chunks.append(ctypes.string_at(data, abi.EVENT_SIZE))

    def _on_perf_lost(self, lost: int) -> None:
        # The BPF side already counted these (perf_submit failed): nothing to add.
        pass

    # ------------------------------------------------------------ reading

    def _drain(self) -> None:
        if self._b is None:
            return
        if self.plan.ringbuf:
            self._b.ring_buffer_consume()
        else:
            self._b.perf_buffer_poll(timeout=0)
        if self._chunks:
            arr = abi.decode(b"".join(self._chunks)).copy()
            self._chunks = []
            self._pending = abi.concat([self._pending, arr]) if len(self._pending) else arr

    def _dedupe_existing(self) -> None:
        if not len(self._existing) or not len(self._pending):
            return
        new = self._pending[self._pending["kind"] == abi.Kind.NEW]
        seen = set(sysinfo.entry_keys(new))
        keep = np.array([k not in seen for k in sysinfo.entry_keys(self._existing)], dtype=bool)
        self._existing = self._existing[keep]

    def per_cpu_sum(self, name: str, n: int) -> List[int]:
        t = self._b[name]
        return [int(t.sum(t.Key(i)).value) for i in range(n)]

    def prog_skips(self) -> Dict[str, Optional[int]]:
        """Per loaded program: runs the kernel skipped (None where the kernel does not count them)."""
        return {name: prog_info.recursion_misses(fd) for name, fd in self._prog_fds().items()}

    def _prog_fds(self) -> Dict[str, int]:
        funcs = self._b.funcs if self._b is not None else {}
        return {(k.decode() if isinstance(k, bytes) else str(k)): fn.fd for k, fn in funcs.items()}

    def _lost_totals(self) -> Tuple[List[int], Dict[str, Optional[int]]]:
        """Lost records by cause, index = ct_lost_cause: the BPF side's counters plus the
        program runs the kernel skipped (each may have lost one record); and those skips
        per program, read together."""
        vals = self.per_cpu_sum("lost", 8)
        skips = self.prog_skips()
        vals[abi.LostCause.PROBE_SKIPPED] = sum(v or 0 for v in skips.values())
        return vals, skips

    def lost_counts(self) -> Dict[int, int]:
        """Lost records by cause, now."""
        vals = self._lost_totals()[0]
        return {int(c): vals[int(c)] for c in abi.LostCause}

    def streamed_losses(self) -> Tuple[Dict[int, int], Dict[str, Optional[int]]]:
        """Lost records by cause and skipped runs per program as of the last poll: what the
        LOST records streamed so far add up to (a recording's trailer states these, not
        losses of events after its last batch, which it never held)."""
        return {int(c): self._lost_seen[int(c)] for c in abi.LostCause}, dict(self._skips_seen)

    def produced_counts(self) -> Dict[int, int]:
        vals = self.per_cpu_sum("produced", 16)
        return {int(k): vals[int(k)] for k in abi.Kind if int(k) < 16}

    def ring_state(self) -> Optional[Dict[str, int]]:
        """The ring buffer's positions, read from its read-only mapping (see ring_positions);
        None with a perf buffer."""
        if self._b is None or not self.plan.ringbuf:
            return None
        page, size = mmap.PAGESIZE, self.ring_bytes
        if self._ring_map is None:
            self._ring_map = mmap.mmap(self._b["events"].map_fd, 2 * page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ)
        return ring_positions(self._ring_map, page, size)

    @property
    def ring_bytes(self) -> int:
        return self.ring_pages * mmap.PAGESIZE

    def sock_stats(self) -> Dict[str, int]:
        v = self.per_cpu_sum("sockstats", 3)
        return {"closed": v[0], "entry_found": v[1], "established": v[2]}

    def _lost_records(self) -> np.ndarray:
        """LOST records for what the counters grew by since the last poll, stamped when
        they were read: never before a loss they count (a reader stopped mid-poll, by
        SIGSTOP or the scheduler, may read them much later than the poll began)."""
        vals, self._skips_seen = self._lost_totals()
        ts = boot_ns()
        out = []
        for cause in abi.LostCause:
            d = vals[cause] - self._lost_seen[cause]
            if d > 0:
                r = abi.empty(1)
                r["kind"] = abi.Kind.LOST
                r["reason"] = cause
                r["value"] = d
                r["ts_boot_ns"] = ts
                out.append(r)
        self._lost_seen = vals
        return abi.concat(out) if out else abi.empty(0)

    def _counter_records(self) -> np.ndarray:
        """COUNTER records of the kernel's own figures and of the ring's headroom (then reset),
        stamped when they were read."""
        sysctls = sysinfo.read_sysctls()
        stat = sysinfo.read_stat()
        ns = sysinfo.own_netns()
        ts = boot_ns()
        vals = [
            (abi.Counter.COUNT, sysctls.get("nf_conntrack_count")),
            (abi.Counter.MAX, sysctls.get("nf_conntrack_max")),
            (abi.Counter.BUCKETS, sysctls.get("nf_conntrack_buckets")),
            (abi.Counter.INSERT_FAILED, stat.get("insert_failed")),
            (abi.Counter.DROP, stat.get("drop")),
            (abi.Counter.EARLY_DROP, stat.get("early_drop")),
        ]
        if self.plan.ringbuf and self._b is not None:
            vals += [(abi.Counter.RING_BYTES, self.ring_bytes), (abi.Counter.RING_PEAK_BYTES, self._ring_peak)]
            self._ring_peak = 0
        vals = [(c, v) for c, v in vals if v is not None]
        r = abi.empty(len(vals))
        for i, (c, v) in enumerate(vals):
            r[i]["kind"] = abi.Kind.COUNTER
            r[i]["reason"] = c
            r[i]["value"] = v
            r[i]["ts_boot_ns"] = ts
            r[i]["netns_ino"] = ns
        return r

    def existing(self) -> np.ndarray:
        return self._existing

    def poll(self, final: bool = False) -> np.ndarray:
        """One poll: everything up to now (minus a few ms of hold-back unless final), sorted."""
        now = boot_ns()  # before draining: whatever happened before it is drained now
        ring = self.ring_state()
        if ring is not None:
            self._ring_peak = max(self._ring_peak, ring["producer"] - ring["consumer"])
        self._drain()
        extra = [self._lost_records()]
        if final or time.monotonic() - self._last_counter >= self.counter_every:
            self._last_counter = time.monotonic()
            extra.append(self._counter_records())
        arr = abi.concat([self._pending] + extra)
        order = np.argsort(arr["ts_boot_ns"], kind="stable")
        arr = arr[order]
        if final:
            self._pending = abi.empty(0)
            return arr
        cut = int(np.searchsorted(arr["ts_boot_ns"], now - HOLDBACK_NS, side="right"))
        arr = self._confirm_orphans(arr, cut)
        cut = int(np.searchsorted(arr["ts_boot_ns"], now - HOLDBACK_NS, side="right"))
        self._pending = arr[cut:]
        return arr[:cut]

    def _confirm_orphans(self, arr: np.ndarray, cut: int) -> np.ndarray:
        """Drop ORPHAN candidates (released at index < cut) whose entry left
        ESTABLISHED within the grace period: a local abortive close changes the
        socket to CLOSE just before its own RST reaches conntrack."""
        head = arr[:cut]
        orph = np.nonzero(head["kind"] == abi.Kind.ORPHAN)[0]
        if not len(orph):
            return arr
        st = arr[(arr["kind"] == abi.Kind.STATE) & (arr["ct_oldstate"] == abi.TcpState.ESTABLISHED)]
        drop = []
        for i in orph:
            o = arr[i]
            m = (st["ct_id"] == o["ct_id"]) & (st["ts_boot_ns"] >= o["ts_boot_ns"]) & \
                (st["ts_boot_ns"] <= o["ts_boot_ns"] + ORPHAN_GRACE_NS)
            if m.any():
                drop.append(i)
        self.orphans_withdrawn += len(drop)
        return np.delete(arr, drop) if drop else arr

    def batches(self) -> Iterator[np.ndarray]:
        while not self._closed and self._b is not None:
            deadline = time.monotonic() + self.interval
            while not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.05))
            if self._closed or self._b is None:
                return
            final = self._stopping
            arr = self.poll(final=final)
            if len(arr):
                yield arr
            if final:
                return

    def aggregates(self) -> np.ndarray:
        """In-kernel per netns+source-IP counters (batch lookup where bcc has it)."""
        t = self._b["ipstats"]
        try:
            items = list(t.items_lookup_batch())
        except Exception:
            items = list(t.items())
        out = np.zeros(len(items), dtype=IPSTAT_DTYPE)
        for i, (k, v) in enumerate(items):
            out[i]["netns_ino"] = k.netns
            out[i]["family"] = k.family
            out[i]["addr"] = np.frombuffer(bytes(bytearray(k.addr)), dtype=np.uint8)
            out[i]["created"] = v.created
            out[i]["destroyed"] = list(v.destroyed)
            out[i]["orphans"] = v.orphans
            out[i]["drop_table_full"] = v.drop_table_full
            out[i]["drop_insert_failed"] = v.drop_insert_failed
        return out

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ring_map is not None:
            self._ring_map.close()
            self._ring_map = None
        b, self._b = self._b, None
        if b is not None:
            try:
                b.cleanup()
            except Exception:
                pass
