#!/usr/bin/env python3
"""ctrace real-kernel lab: build Debian guest images, boot them in qemu and
run ``tests/kernel`` inside each guest as root.

Host side, standard library only, Python 3.9+.

    python3 tests/vm/lab.py build [--suite S ...]
    python3 tests/vm/lab.py run   [--suite S ...] [-- PYTEST ARGS...]
    python3 tests/vm/lab.py kernels-table      # markdown from the last run

Images are cached in $CTRACE_LAB_CACHE (default /var/cache/ctrace-lab),
keyed by suite, archive sources, packages.txt and provision.sh.  See
docs/LAB.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, TextIO

HERE = Path(__file__).resolve().parent
TREE = HERE.parent.parent
PACKAGES_FILE = HERE / "packages.txt"
PROVISION_SCRIPT = HERE / "provision.sh"

# Bump when the on-disk image layout or boot contract changes.
IMAGE_FORMAT = 1
DEFAULT_CACHE = "/var/cache/ctrace-lab"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
IMAGE_SIZE = "4G"

# Exit codes of this script.
EXIT_OK = 0
EXIT_TESTS_FAILED = 1  # a test failed, or dmesg showed a splat
EXIT_USAGE = 2
EXIT_BUILD_FAILED = 3
EXIT_GUEST_FAILED = 4  # no boot, timeout, no results
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM: guests stopped, no summary

# Suites in matrix order; extra archive parts appended to the main suite.
SUITES: Dict[str, Dict[str, Sequence[str]]] = {
    "bullseye": {"updates": ("bullseye-updates",), "security": ("bullseye-security",)},
    "bookworm": {"updates": ("bookworm-updates",), "security": ("bookworm-security",)},
    "trixie": {"updates": ("trixie-updates",), "security": ("trixie-security",)},
    "sid": {"updates": (), "security": ()},
}

# Kernel log lines that fail a kernel.  "Call Trace" catches splats whose
# header line was rate limited or lost.
DMESG_BAD = re.compile(
    r"(^|\]\s)(WARNING:|BUG:|BUG |Oops|kernel BUG|general protection fault|"
    r"Kernel panic|UBSAN:|KASAN:|RCU detected stall|INFO: task .* blocked)"
    r"|Call Trace:"
)


class LabError(Exception):
    """A one-line, user-facing error with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# configuration and cache keys


def cache_root() -> Path:
    return Path(os.environ.get("CTRACE_LAB_CACHE", DEFAULT_CACHE))


def suite_sources(suite: str, mirror: Optional[str] = None,
                  security: Optional[str] = None) -> List[str]:
    """The one-line apt sources mmdebstrap uses for ``suite``."""
    if suite not in SUITES:
        raise LabError(f"unknown suite {suite!r} (known: {', '.join(SUITES)})", EXIT_USAGE)
    mirror = mirror or os.environ.get("CTRACE_LAB_MIRROR", DEFAULT_MIRROR)
    security = security or os.environ.get("CTRACE_LAB_SECURITY_MIRROR",
                                          DEFAULT_SECURITY_MIRROR)
    parts = SUITES[suite]
    lines = [f"deb {mirror} {suite} main"]
    lines += [f"deb {mirror} {s} main" for s in parts["updates"]]
    lines += [f"deb {security} {s} main" for s in parts["security"]]
    return lines


def cache_key(suite: str, sources: Sequence[str], packages: bytes,
              provision: bytes) -> str:
    """Key of an image: anything that changes what is inside it."""
    h = hashlib.sha256()
    for part in (f"format={IMAGE_FORMAT}", f"suite={suite}", *sources):
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(packages).digest())
    h.update(hashlib.sha256(provision).digest())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Image:
    suite: str
    key: str
    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root.img"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def meta_file(self) -> Path:
        return self.path / "meta.json"

    def meta(self) -> Dict[str, object]:
        return json.loads(self.meta_file.read_text())


def image_for(suite: str, cache: Optional[Path] = None) -> Image:
    cache = cache or cache_root()
    key = cache_key(suite, suite_sources(suite), PACKAGES_FILE.read_bytes(),
                    PROVISION_SCRIPT.read_bytes())
    return Image(suite, key, cache / "images" / f"{suite}-{key}")


def max_age_seconds() -> Optional[float]:
    days = float(os.environ.get("CTRACE_LAB_MAX_AGE_DAYS", "30"))
    return days * 86400 if days > 0 else None


def image_is_fresh(image: Image, now: Optional[float] = None,
                   max_age: Optional[float] = None) -> bool:
    """True if ``image`` is complete, has the expected key, and is not too old.

    A directory only gets its final name after meta.json is written, so a
    partial build is never mistaken for an image.
    """
    try:
        meta = image.meta()
    except (OSError, ValueError):
        return False
    if meta.get("key") != image.key or meta.get("suite") != image.suite:
        return False
    if not all(p.is_file() for p in (image.root, image.kernel, image.initrd)):
        return False
    if max_age is not None:
        built = float(meta.get("built_at", 0))  # type: ignore[arg-type]
        if (now if now is not None else time.time()) - built > max_age:
            return False
    return True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# image build


def _run_logged(cmd: Sequence[str], log: TextIO, what: str) -> None:
    log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
    log.flush()
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        rc = proc.wait()
    except BaseException:
        # Let mmdebstrap unmount its chroot before anything is removed.
        proc.terminate()
        proc.wait(timeout=300)
        raise
    if rc != 0:
        raise LabError(f"{what} failed (exit {rc}); see {log.name}", EXIT_BUILD_FAILED)


def build_image(suite: str, force: bool = False, out: TextIO = sys.stderr) -> Image:
    """Build (or reuse) the image of ``suite``; returns it when it is usable."""
    image = image_for(suite)
    images = image.path.parent
    with locked(images / f".{suite}.lock"):
        if not force and image_is_fresh(image, max_age=max_age_seconds()):
            return image
        for tool in ("mmdebstrap", "mkfs.ext4"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: apt-get install mmdebstrap e2fsprogs",
                               EXIT_BUILD_FAILED)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{suite}-build-", dir=images))
        log_path = images / f"{suite}-build.log"
        out.write(f"lab: building {suite} image {image.key} (log {log_path})\n")
        out.flush()
        try:
            with open(log_path, "w") as log:
                rootdir = tmp / "rootfs"
                cmd = [
                    "mmdebstrap", "--variant=minbase", "--mode=root",
                    "--aptopt=Acquire::Check-Valid-Until \"false\"",
                    "--aptopt=Acquire::Retries \"3\"",
                    "--customize-hook=cp " + shlex.quote(str(PROVISION_SCRIPT)) + " "
                    + shlex.quote(str(PACKAGES_FILE)) + ' "$1/tmp/"',
                    '--customize-hook=chroot "$1" sh /tmp/provision.sh image /tmp/packages.txt',
                    '--customize-hook=rm -f "$1/tmp/provision.sh" "$1/tmp/packages.txt"',
                    suite, str(rootdir), *suite_sources(suite),
                ]
                _run_logged(cmd, log, f"mmdebstrap {suite}")
                boot = rootdir / "boot"
                kernels = sorted(boot.glob("vmlinuz-*"))
                initrds = sorted(boot.glob("initrd.img-*"))
                if len(kernels) != 1 or len(initrds) != 1:
                    raise LabError(f"{suite}: expected one kernel and initrd in /boot, got "
                                   f"{[p.name for p in kernels + initrds]}", EXIT_BUILD_FAILED)
                shutil.copy2(kernels[0], tmp / "vmlinuz")
                shutil.copy2(initrds[0], tmp / "initrd.img")
                release = kernels[0].name[len("vmlinuz-"):]
                pkgs = (rootdir / "etc/ctrace-lab/packages").read_text().split()
                versions = _dpkg_versions(rootdir, ["python3-bpfcc", "linux-image-" + release,
                                                    "conntrack", "nftables", "python3"])
                _run_logged(["mkfs.ext4", "-q", "-F", "-L", "ctrace-lab", "-d", str(rootdir),
                             str(tmp / "root.img"), IMAGE_SIZE], log, "mkfs.ext4")
                shutil.rmtree(rootdir)
            meta = {
                "suite": suite, "key": image.key, "built_at": time.time(),
                "kernel_release": release, "packages": pkgs, "versions": versions,
                "sources": suite_sources(suite),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            for old in images.glob(f"{suite}-*"):
                if old.is_dir() and old != image.path:
                    shutil.rmtree(old, ignore_errors=True)
            if image.path.exists():
                shutil.rmtree(image.path)
            tmp.rename(image.path)
        finally:
            if tmp.exists():
                safe_rmtree(tmp)
        out.write(f"lab: built {suite} ({release}) in {meta['build_seconds']} s\n")
        return image


def mounts_under(path: Path) -> List[str]:
    """Mount points at or below ``path`` (a chroot left mounted)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


def safe_rmtree(path: Path) -> None:
    """Remove a build directory, never descending into mounted file systems."""
    for mnt in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.call(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
    if mounts_under(path):
        sys.stderr.write(f"lab: warning: {path} still has mounts; left in place\n")
        return
    shutil.rmtree(path, ignore_errors=True)


def _dpkg_versions(rootdir: Path, names: Sequence[str]) -> Dict[str, str]:
    res = subprocess.run(
        ["dpkg-query", f"--admindir={rootdir}/var/lib/dpkg", "-W",
         "-f=${Package} ${Version}\\n", *names],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = {}
    for line in res.stdout.splitlines():
        name, _, version = line.partition(" ")
        if version:
            out[name] = version
    return out


# --------------------------------------------------------------------------
# results: junit, dmesg, summary


@dataclasses.dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: List[str] = dataclasses.field(default_factory=list)


def parse_junit(text: str) -> TestCounts:
    """Count outcomes in a pytest junit xml; failures are ``file::test`` ids."""
    root = ET.fromstring(text)
    counts = TestCounts()
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        classname = case.get("classname", "")
        name = case.get("name", "")
        parts = classname.split(".")
        # pytest: classname "tests.kernel.test_x" or "tests.kernel.test_x.TestC"
        ident = f"{classname}::{name}" if classname else name
        for i in range(len(parts), 0, -1):
            if parts[i - 1].startswith("test_"):
                ident = "/".join(parts[:i]) + ".py::" + "::".join(parts[i:] + [name])
                break
        if kinds & {"failure", "error"}:
            counts.failed += 1
            bad = next(c for c in case if c.tag in ("failure", "error"))
            msg = (bad.get("message") or "").strip().splitlines()
            counts.failures.append(ident + (f" ({msg[0][:120]})" if msg else ""))
        elif "skipped" in kinds:
            counts.skipped += 1
        else:
            counts.passed += 1
    return counts


def dmesg_splats(text: str) -> List[str]:
    """Lines of a kernel log that show a WARNING, BUG, oops or call trace."""
    return [line.strip() for line in text.splitlines() if DMESG_BAD.search(line)]


@dataclasses.dataclass
class KernelResult:
    suite: str
    release: str = "?"
    bcc: str = "?"
    counts: TestCounts = dataclasses.field(default_factory=TestCounts)
    seconds: float = 0.0
    problems: List[str] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    code: int = EXIT_OK

    @property
    def ok(self) -> bool:
        return self.code == EXIT_OK


def summary_table(results: Sequence[KernelResult]) -> str:
    """The fixed-width table printed at the end of a run."""
    header = ("suite", "kernel", "bcc", "passed", "failed", "skipped", "seconds", "result")
    rows = [header]
    for r in results:
        rows.append((r.suite, r.release, r.bcc, str(r.counts.passed), str(r.counts.failed),
                     str(r.counts.skipped), f"{r.seconds:.0f}", "ok" if r.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {3, 4, 5, 6}
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                 for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in results:
        for n in r.notes:
            lines.append(f"note {r.suite} ({r.release}): {n}")
        for p in r.problems:
            lines.append(f"FAIL {r.suite} ({r.release}): {p}")
    return "\n".join(lines)


def closing_line(results: Sequence[KernelResult]) -> str:
    """Totals over all kernels in pytest's closing-line form.  A kernel that
    failed without a failed test (no boot, timeout, dmesg splat) counts as
    one failure, so the line never reads "0 failed" on a red run."""
    passed = sum(r.counts.passed for r in results)
    failed = sum(r.counts.failed or (0 if r.ok else 1) for r in results)
    skipped = sum(r.counts.skipped for r in results)
    return f"lab: {passed} passed, {failed} failed, {skipped} skipped"


def overall_exit(results: Sequence[KernelResult]) -> int:
    codes = {r.code for r in results}
    for code in (EXIT_GUEST_FAILED, EXIT_BUILD_FAILED, EXIT_TESTS_FAILED):
        if code in codes:
            return code
    return EXIT_OK


def collect_results(result: KernelResult, outdir: Path) -> None:
    """Fill ``result`` from the files the guest left in ``outdir``."""
    def read(name: str) -> Optional[str]:
        try:
            return (outdir / name).read_text(errors="replace").strip()
        except OSError:
            return None

    result.release = read("kernel-release") or result.release
    result.bcc = read("bcc-version") or result.bcc
    junit = read("junit.xml")
    rc = read("pytest-rc")
    if junit is None or rc is None:
        result.problems.append("guest produced no test results (see console.log)")
        result.code = EXIT_GUEST_FAILED
    else:
        try:
            result.counts = parse_junit(junit)
        except ET.ParseError as e:
            result.problems.append(f"unreadable junit.xml: {e}")
            result.code = EXIT_GUEST_FAILED
        for f in result.counts.failures:
            result.problems.append(f"test failed: {f}")
        if rc not in ("0",) and not result.counts.failures:
            result.problems.append(f"pytest exited {rc} "
                                   + ("(no tests collected)" if rc == "5" else ""))
        if rc != "0" and result.code == EXIT_OK:
            result.code = EXIT_TESTS_FAILED
    dmesg = read("dmesg.txt")
    if dmesg is None:
        if result.code == EXIT_OK:
            result.problems.append("guest left no dmesg")
            result.code = EXIT_GUEST_FAILED
    else:
        splats = dmesg_splats(dmesg)
        if splats:
            result.problems.append(f"dmesg: {splats[0]}"
                                   + (f" (+{len(splats) - 1} more lines)" if len(splats) > 1 else ""))
            if result.code == EXIT_OK:
                result.code = EXIT_TESTS_FAILED


# --------------------------------------------------------------------------
# qemu


def qemu_cmd(image: Image, accel: str, smp: int, mem_mb: int, outdir: Optional[Path],
             tree: Path, probe: bool = False) -> List[str]:
    append = ["root=/dev/vda", "rw", "console=ttyS0", "init=/sbin/ctrace-lab-init",
              "panic=-1", "loglevel=4",
              "net.ifnames=0", "mitigations=off"]
    if probe:
        append.append("ctrace_lab.probe=1")
    cmd = [
        "qemu-system-x86_64", "-accel", accel, "-smp", str(smp), "-m", str(mem_mb),
        "-cpu", "host" if accel == "kvm" else "max",
        "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot", "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", " ".join(a for a in append if a),
        "-drive", f"file={image.root},if=virtio,format=raw,snapshot=on",
    ]
    if not probe:
        assert outdir is not None
        cmd += [
            "-virtfs", f"local,path={tree},mount_tag=tree,security_model=none,readonly=on",
            "-virtfs", f"local,path={outdir},mount_tag=out,security_model=none",
        ]
    return cmd


def boot(cmd: Sequence[str], log_path: Path, timeout: float, echo: Optional[TextIO] = None,
         until: Optional[str] = None) -> str:
    """Run qemu until it exits, ``until`` shows on the console, or the timeout.

    Returns "exited", "matched" or "timeout".  The console goes to
    ``log_path`` (and to ``echo`` when given).
    """
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        return _watch(proc, log_path, timeout, echo, until)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)


_RUNNING: "set[subprocess.Popen]" = set()  # guests booted and not yet reaped
_RUNNING_LOCK = threading.Lock()


def stop_guests() -> None:
    """Kill every running guest (on SIGINT/SIGTERM: their threads then finish at once)."""
    with _RUNNING_LOCK:
        for proc in _RUNNING:
            if proc.poll() is None:
                proc.kill()


def _watch(proc: "subprocess.Popen", log_path: Path, timeout: float, echo: Optional[TextIO],
           until: Optional[str]) -> str:
    matched = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "wb") as log:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                if echo is not None:
                    echo.write(line.decode(errors="replace"))
                    echo.flush()
                if until is not None and until.encode() in line:
                    matched.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    state = "timeout"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state = "exited"
            break
        if matched.is_set():
            state = "matched"
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    t.join(timeout=5)
    if state == "exited" and matched.is_set():
        state = "matched"
    return state


def _host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def probe_kvm(image: Image, out: TextIO) -> bool:
    """Boot ``image`` under KVM for a few seconds; True if it reached init.

    The answer is remembered in the cache for the rest of this host boot
    (a failing probe costs its whole timeout).
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        out.write("lab: no usable /dev/kvm; using tcg\n")
        return False
    memo = cache_root() / "kvm-probe.json"
    tag = {"boot_id": _host_boot_id(), "qemu": shutil.which("qemu-system-x86_64") or ""}
    try:
        saved = json.loads(memo.read_text())
        if saved.get("tag") == tag:
            ok = bool(saved["ok"])
            out.write(f"lab: KVM boot probe {'succeeded' if ok else 'failed'} earlier in this "
                      f"host boot; using {'kvm' if ok else 'tcg'} (delete {memo} to re-probe)\n")
            return ok
    except (OSError, ValueError, KeyError):
        pass
    timeout = float(os.environ.get("CTRACE_LAB_KVM_PROBE_SECONDS", "20"))
    with tempfile.TemporaryDirectory(prefix="ctrace-lab-probe-") as d:
        state = boot(qemu_cmd(image, "kvm", 1, 512, None, TREE, probe=True),
                     Path(d) / "console.log", timeout, until="ctrace-lab: probe ok")
    ok = state == "matched"
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"tag": tag, "ok": ok}) + "\n")
    out.write(f"lab: KVM boot probe {'succeeded' if ok else f'failed ({state})'}; using "
              f"{'kvm' if ok else 'tcg'}\n")
    return ok


def run_kernel(image: Image, accel: str, smp: int, mem_mb: int, timeout: float,
               pytest_args: Sequence[str], results_dir: Path, echo: Optional[TextIO],
               out: TextIO) -> KernelResult:
    meta = image.meta()
    result = KernelResult(image.suite, release=str(meta.get("kernel_release", "?")))
    outdir = results_dir / image.suite
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    (outdir / "pytest-args").write_text("".join(a + "\n" for a in pytest_args))
    (outdir / "suite").write_text(image.suite + "\n")
    started = time.monotonic()
    for attempt in (1, 2):
        out.write(f"lab: {image.suite}: booting {result.release} ({accel}, -smp {smp})\n")
        out.flush()
        state = boot(qemu_cmd(image, accel, smp, mem_mb, outdir, TREE), outdir / "console.log",
                     timeout, echo=echo)
        if state == "timeout" or (outdir / "started").exists() or attempt == 2:
            break
        # The guest died before the tests started (seen once: an int3 oops
        # while the kernel patched its text under multi-vCPU TCG).  That is
        # the emulator, not the code under test: keep the log, boot again.
        first = outdir / "console-boot-failure.log"
        (outdir / "console.log").rename(first)
        splats = dmesg_splats(first.read_text(errors="replace"))
        result.notes.append("first boot died before the tests started"
                            + (f" ({splats[0]})" if splats else "") + f"; see {first}")
        out.write(f"lab: {image.suite}: {result.notes[-1]}; retrying once\n")
    result.seconds = time.monotonic() - started
    if state == "timeout":
        result.problems.append(f"timed out after {timeout:.0f} s (see {outdir}/console.log)")
        result.code = EXIT_GUEST_FAILED
    collect_results(result, outdir)
    out.write(f"lab: {image.suite}: {'ok' if result.ok else 'FAIL'} in {result.seconds:.0f} s"
              f" (results in {outdir})\n")
    out.flush()
    return result


# --------------------------------------------------------------------------
# kernels table (docs/KERNELS.md)


METHOD_CODES = {"kprobe": "K", "kretprobe": "R", "kprobe_clone": "Kc", "fentry": "F", "fexit": "X",
                "fentry_mod": "Fm", "fexit_mod": "Xm", "tracepoint": "TP"}


def kernels_table(results_dir: Path, suites: Sequence[str]) -> str:
    """Markdown tables from each kernel's smoke.json (docs/KERNELS.md)."""
    data: Dict[str, Dict[str, object]] = {}
    for s in suites:
        try:
            data[s] = json.loads((results_dir / s / "smoke.json").read_text())
        except (OSError, ValueError):
            continue
    if not data:
        raise LabError(f"no smoke.json under {results_dir}; run the lab first", EXIT_USAGE)
    order = list(data)
    yes = {True: "yes", False: "no"}
    lines = ["| suite | kernel | bcc | vmlinux BTF | nf_conntrack BTF | bcc MODULE_KFUNC_PROBE |",
             "|---|---|---|---|---|---|"]
    for s in order:
        d = data[s]
        lines.append(f"| {s} | {d.get('kernel', '?')} | {d.get('bcc', '?')} | "
                     f"{yes.get(d.get('btf_vmlinux'), '?')} | "  # type: ignore[arg-type]
                     f"{yes.get(d.get('btf_nf_conntrack'), '?')} | "  # type: ignore[arg-type]
                     f"{yes.get(d.get('module_kfunc_macro'), '?')} |")  # type: ignore[arg-type]
    names: List[str] = []
    for s in order:
        for name in data[s].get("targets", {}):  # type: ignore[union-attr]
            if name not in names:
                names.append(name)
    targets = {s: data[s].get("targets", {}) for s in order}
    head = "| attach point | " + " | ".join(order) + " |"
    sep = "|---|" + "---|" * len(order)
    lines += ["", head, sep]
    for name in names:
        cells = [format_target(targets[s].get(name)) for s in order]  # type: ignore[union-attr]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    phases = next((data[s].get("phases") for s in order if data[s].get("phases")), [])
    lines += ["", f"Hits of the first working method per phase ({' / '.join(phases)}):",  # type: ignore[arg-type]
              "", head, sep]
    for name in names:
        cells = [format_phases(targets[s].get(name), phases) for s in order]  # type: ignore[union-attr, arg-type]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _working(t: Optional[Dict[str, object]]) -> List[str]:
    methods = (t or {}).get("methods", {})
    assert isinstance(methods, dict)
    return [m for m, e in methods.items() if e.get("attached")]


def format_target(t: Optional[Dict[str, object]]) -> str:
    """One cell: codes of the methods that attached (K R F X Fm Xm TP)."""
    if not t or (t.get("symbol") is None and t.get("kind") != "tracepoint"):
        return "absent"
    ok = [METHOD_CODES.get(m, m) for m in METHOD_CODES if m in _working(t)]
    return " ".join(ok) if ok else "none"


def format_phases(t: Optional[Dict[str, object]], phases: Sequence[str]) -> str:
    work = _working(t)
    if not work:
        return "-"
    methods = t["methods"]  # type: ignore[index]
    per = methods[work[0]].get("phases", {})  # type: ignore[index]
    return "/".join(str(per.get(p, 0)) for p in phases)


# --------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lab.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def suites_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--suite", "-s", action="append", choices=list(SUITES),
                        help="suite to use (repeatable; default: all)")

    b = sub.add_parser("build", help="build missing or stale images")
    suites_opt(b)
    b.add_argument("--force", action="store_true", help="rebuild even if fresh")

    r = sub.add_parser("run", help="boot each kernel and run tests/kernel in it")
    suites_opt(r)
    r.add_argument("--accel", choices=("auto", "tcg", "kvm"),
                   default=os.environ.get("CTRACE_LAB_ACCEL", "auto"),
                   help="auto: KVM only if a short boot probe succeeds (default)")
    r.add_argument("--timeout", type=float,
                   default=float(os.environ.get("CTRACE_LAB_TIMEOUT", "1200")),
                   help="seconds per kernel (default 1200)")
    r.add_argument("--jobs", "-j", type=int,
                   default=int(os.environ.get("CTRACE_LAB_JOBS", "2")),
                   help="kernels booted at once (default 2)")
    r.add_argument("--smp", type=int, default=1,
                   help="vCPUs per guest (default 1: under TCG one vCPU runs the tests "
                        "faster than two)")
    r.add_argument("--mem", type=int, default=2048, help="guest memory in MiB")
    r.add_argument("--results", type=Path, default=None,
                   help="result directory (default $CTRACE_LAB_CACHE/results)")
    r.add_argument("--verbose", "-v", action="store_true", help="stream guest consoles")
    r.add_argument("--no-build", action="store_true", help="fail instead of building")
    r.add_argument("pytest_args", nargs="*",
                   help="after --: pytest arguments for the guest (default tests/kernel)")

    k = sub.add_parser("kernels-table", help="markdown table from the last run's smoke test")
    suites_opt(k)
    k.add_argument("--results", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    suites = args.suite or list(SUITES)
    results_dir = args.results if getattr(args, "results", None) else cache_root() / "results"
    try:
        if args.cmd == "build":
            for s in suites:
                img = build_image(s, force=args.force, out=out)
                out.write(f"lab: {s}: {img.path}\n")
            return EXIT_OK
        if args.cmd == "kernels-table":
            out.write(kernels_table(results_dir, suites) + "\n")
            return EXIT_OK
        return cmd_run(args, suites, results_dir, out)
    except LabError as e:
        out.write(f"lab: error: {e}\n")
        return e.code
    except KeyboardInterrupt as e:
        out.write(f"lab: interrupted ({e or 'SIGINT'}); guests stopped\n")
        return EXIT_INTERRUPTED


def guest_pytest_args(args: Sequence[str]) -> List[str]:
    """pytest arguments for the guest; ``tests/kernel`` unless a path is given
    (so ``-- -k flush`` selects among the kernel tests, not the whole tree)."""
    if any(a.startswith("tests") or "/" in a or a.endswith(".py") for a in args):
        return list(args)
    return ["tests/kernel", *args]


def cmd_run(args: argparse.Namespace, suites: Sequence[str], results_dir: Path,
            out: TextIO) -> int:
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 not found: apt-get install qemu-system-x86",
                       EXIT_USAGE)
    pytest_args = guest_pytest_args(args.pytest_args)
    results: List[KernelResult] = []
    images: Dict[str, Image] = {}
    for s in suites:
        try:
            if args.no_build:
                img = image_for(s)
                if not image_is_fresh(img):
                    raise LabError(f"{s}: no fresh image; run lab.py build", EXIT_BUILD_FAILED)
                images[s] = img
            else:
                images[s] = build_image(s, out=out)
        except LabError as e:
            results.append(KernelResult(s, problems=[str(e)], code=e.code))
    accel = args.accel
    if accel == "auto":
        accel = "kvm" if images and probe_kvm(next(iter(images.values())), out) else "tcg"
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_kernel, images[s], accel, args.smp, args.mem, args.timeout,
                               pytest_args, results_dir,
                               sys.stderr if args.verbose else None, out)
                   for s in suites if s in images]
        try:
            results += [f.result() for f in futures]
        except KeyboardInterrupt:
            stop_guests()  # else leaving the pool waits for every guest to finish its tests
            raise
    out.write(f"lab: {len(futures)} kernel(s) in {time.monotonic() - started:.0f} s "
              f"(jobs {args.jobs}, {accel})\n")
    results.sort(key=lambda r: list(SUITES).index(r.suite))
    out.write("\n" + summary_table(results) + "\n" + closing_line(results) + "\n")
    return overall_exit(results)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
