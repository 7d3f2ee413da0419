"""Where doctor's inputs come from: this machine (live), a directory laid out like the
filesystem root, or a bundle written by `ctrace doctor --collect`.

All three answer the same question, "give me the bytes at this path of the root
tree", and remember why a path could not be read. Command output (rulesets, the
conntrack-tools fallbacks) lives at fixed paths too, so a bundle holds exactly what
a live run reads. The layout is documented in docs/DOCTOR.md ("Root tree layout").
"""

import json
import os
import posixpath
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

from ctrace.status import CtraceError, ExitStatus

# Paths inside a root tree.
NETFILTER = "proc/sys/net/netfilter"  # nf_conntrack_count, _max, _buckets, timeouts
HASHSIZE = "sys/module/nf_conntrack/parameters/hashsize"
STAT = "proc/net/stat/nf_conntrack"  # per-CPU statistics, hex, with a header line
TABLE = "proc/net/nf_conntrack"  # the table (needs CAP_NET_ADMIN; absent without NF_CONNTRACK_PROCFS)
TCP4 = "proc/net/tcp"
TCP6 = "proc/net/tcp6"
FIB_TRIE = "proc/net/fib_trie"  # local IPv4 addresses ("/32 host LOCAL")
IF_INET6 = "proc/net/if_inet6"  # local IPv6 addresses
KEEPALIVE = "proc/sys/net/ipv4/tcp_keepalive_time"
IPVS_CONNTRACK = "proc/sys/net/ipv4/vs/conntrack"
MODULES = "proc/modules"
SLABINFO = "proc/slabinfo"
OSRELEASE = "proc/sys/kernel/osrelease"
IPT_NAMES = "proc/net/ip_tables_names"
IP6T_NAMES = "proc/net/ip6_tables_names"
CT_LIST = "conntrack/conntrack-L.txt"  # `conntrack -L -o extended`, when TABLE is absent
CT_STATS = "conntrack/conntrack-S.txt"  # `conntrack -S`, when STAT is absent
STAT_LATER = "proc/net/stat/nf_conntrack.later"  # STAT read again after --interval seconds
NFT = "ruleset/nft.txt"  # `nft list ruleset`
IPT = "ruleset/iptables-save.txt"
IP6T = "ruleset/ip6tables-save.txt"
IPT_LEGACY = "ruleset/iptables-legacy-save.txt"  # only when legacy tables are loaded
IP6T_LEGACY = "ruleset/ip6tables-legacy-save.txt"
META = "ctrace-bundle.json"

BUNDLE_FORMAT = "ctrace.bundle/1"

# Commands whose output stands at a path of the tree: argv, timeout in seconds.
COMMANDS: Dict[str, Tuple[List[str], int]] = {
    NFT: (["nft", "list", "ruleset"], 60),
    IPT: (["iptables-save"], 60),
    IP6T: (["ip6tables-save"], 60),
    IPT_LEGACY: (["iptables-legacy-save"], 60),
    IP6T_LEGACY: (["ip6tables-legacy-save"], 60),
    CT_LIST: (["conntrack", "-L", "-o", "extended"], 300),
    CT_STATS: (["conntrack", "-S"], 30),
}

RULESETS = (NFT, IPT, IP6T)
LEGACY_RULESETS = ((IPT_LEGACY, IPT_NAMES, IPT), (IP6T_LEGACY, IP6T_NAMES, IP6T))

# Every path doctor reads, in the order it reads them (sockets before the table, so a
# connection opened between the two reads is young, never a false orphan). The
# netfilter sysctl directory is listed first and read file by file.
ORDER: Tuple[str, ...] = (
    HASHSIZE,
    STAT,
    CT_STATS,
    KEEPALIVE,
    IPVS_CONNTRACK,
    OSRELEASE,
    MODULES,
    SLABINFO,
    FIB_TRIE,
    IF_INET6,
    TCP4,
    TCP6,
    TABLE,
    CT_LIST,
    NFT,
    IPT,
    IP6T,
    IPT_NAMES,
    IP6T_NAMES,
    IPT_LEGACY,
    IP6T_LEGACY,
    STAT_LATER,
)

NOT_PRESENT = "not present"


class InputMissing(Exception):
    """One input could not be read; the message says why, for the user."""


class Inputs:
    """A read-only root tree. Subclasses implement `_open` and `_list`."""

    kind = "directory"

    def __init__(self, label: str) -> None:
        self.label = label
        self.meta: Dict[str, Any] = {}
        self.missing: Dict[str, str] = {}  # path -> reason, for paths that were asked for
        self.notes: List[str] = []  # damage the reader noticed (truncated bundle, ...)
        self.timing: Dict[str, List[float]] = {}  # path -> [opened, finished], monotonic s

    # -- for subclasses ---------------------------------------------------------
    def _open(self, rel: str) -> IO[bytes]:
        raise NotImplementedError

    def _list(self, rel: str) -> List[str]:
        raise NotImplementedError

    # -- public -----------------------------------------------------------------
    @property
    def byteorder(self) -> str:
        """Byte order of the machine the tree comes from (for /proc/net/tcp addresses)."""
        order = self.meta.get("byteorder")
        return order if order in ("little", "big") else "little"

    def open(self, rel: str, optional: bool = False) -> Optional[IO[bytes]]:
        """The file at `rel`, or None (and its reason noted unless `optional`)."""
        try:
            f = self._open(rel)
        except InputMissing as exc:
            if not optional:
                self.missing[rel] = str(exc)
            return None
        started = time.monotonic()  # after opening: STAT_LATER sleeps in _open
        self.timing[rel] = [started, started]
        return f

    def _finish(self, rel: str) -> None:
        if rel in self.timing:
            self.timing[rel][1] = time.monotonic()

    def read_text(self, rel: str, optional: bool = False) -> Optional[str]:
        f = self.open(rel, optional)
        if f is None:
            return None
        try:
            with f:
                data = f.read()
        except OSError as exc:
            if not optional:
                self.missing[rel] = f"read failed: {exc.strerror or exc}"
            return None
        self._finish(rel)
        return data.decode("utf-8", "replace")

    def iter_lines(self, rel: str, optional: bool = False) -> Optional[Iterator[str]]:
        """The file's lines, read as they are consumed (the table can be large)."""
        f = self.open(rel, optional)
        if f is None:
            return None

        def lines() -> Iterator[str]:
            try:
                with f:
                    for raw in f:
                        yield raw.decode("utf-8", "replace")
            except OSError as exc:
                self.notes.append(f"{rel}: read stopped early: {exc.strerror or exc}")
            self._finish(rel)

        return lines()

    def list_dir(self, rel: str) -> Optional[List[str]]:
        """Names of the regular files directly under `rel`, sorted; None if absent."""
        try:
            return sorted(self._list(rel))
        except InputMissing as exc:
            self.missing[rel] = str(exc)
            return None

    def started(self, rel: str) -> Optional[float]:
        """When `rel` was opened (monotonic seconds; from the bundle's record if any)."""
        timing = self.meta.get("timing") if "timing" in self.meta else (self.timing if self.kind == "live" else None)
        try:
            return float(timing[rel][0]) if isinstance(timing, dict) and rel in timing else None
        except (TypeError, ValueError, IndexError, KeyError):
            return None

    def race_window(self) -> Optional[float]:
        """Seconds from opening the socket lists to finishing the table: a connection
        opened in between has a table entry but no socket, and is at most this idle."""
        if "timing" in self.meta:
            timing = self.meta["timing"]  # recorded when the bundle was collected
        else:
            timing = self.timing if self.kind == "live" else None
        if not isinstance(timing, dict):
            return None
        starts = [timing[p][0] for p in (TCP4, TCP6) if p in timing]
        ends = [timing[p][1] for p in (TABLE, CT_LIST) if p in timing]
        if not starts or not ends:
            return None
        try:
            return max(0.0, float(max(ends)) - float(min(starts)))
        except (TypeError, ValueError):
            return None

    def close(self) -> None:
        pass


def _os_reason(exc: OSError, live: bool) -> str:
    if isinstance(exc, FileNotFoundError):
        return NOT_PRESENT
    if isinstance(exc, PermissionError):
        return "permission denied (run as root)" if live else "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    return f"cannot read: {exc.strerror or exc}"


class DirectoryInputs(Inputs):
    """A directory laid out like the filesystem root (DIR/proc/sys/net/netfilter/...)."""

    kind = "directory"
    live = False

    def __init__(self, root: str, label: Optional[str] = None) -> None:
        super().__init__(label or root)
        self.root = root
        meta = os.path.join(root, META)
        if not self.live and os.path.isfile(meta):
            self.meta = _load_meta(self._read_file(meta), self.notes)

    @staticmethod
    def _read_file(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def _open(self, rel: str) -> IO[bytes]:
        try:
            return open(self._path(rel), "rb")
        except OSError as exc:
            raise InputMissing(self._reason(rel, exc)) from None

    def _reason(self, rel: str, exc: OSError) -> str:
        reason = _os_reason(exc, self.live)
        recorded = self.meta.get("missing", {}) if isinstance(self.meta.get("missing"), dict) else {}
        if reason == NOT_PRESENT and rel in recorded:
            return f"when collected: {recorded[rel]}"
        return reason

    def _list(self, rel: str) -> List[str]:
        path = self._path(rel)
        try:
            names = os.listdir(path)
        except OSError as exc:
            raise InputMissing(self._reason(rel, exc)) from None
        return [n for n in names if os.path.isfile(os.path.join(path, n))]


def _load_meta(data: bytes, notes: List[str]) -> Dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        notes.append(f"{META} is damaged: collection details (times, reasons) unknown")
        return {}
    if not isinstance(meta, dict):
        notes.append(f"{META} is not a JSON object: ignored")
        return {}
    fmt = meta.get("format", "")
    if isinstance(fmt, str) and fmt.split("/")[0] == "ctrace.bundle" and fmt != BUNDLE_FORMAT:
        notes.append(f"{META} says format {fmt!r}; this ctrace reads {BUNDLE_FORMAT}: read as far as understood")
    return meta


class BundleInputs(Inputs):
    """A tar.gz bundle from `ctrace doctor --collect` (or a tarred root tree). Members
    are copied into unnamed temporary files; nothing is extracted to disk by name."""

    kind = "bundle"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._files: Dict[str, IO[bytes]] = {}
        try:
            raw = open(path, "rb")
        except OSError as exc:
            raise CtraceError(f"cannot read {path}: {exc.strerror or exc}", ExitStatus.NO_INPUT) from None
        with raw:
            self._load(path, raw)
        self._strip_wrapper()
        if META in self._files:
            self.meta = _load_meta(self._files[META].read(), self.notes)

    def _load(self, path: str, raw: IO[bytes]) -> None:
        count = 0
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CtraceError(
                f"{path} is neither a directory nor a ctrace bundle (tar.gz): {exc}", ExitStatus.NO_INPUT
            ) from None
        try:
            for member in tar:
                name = _member_name(member.name)
                if name is None or not member.isfile():
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                spool = tempfile.TemporaryFile()
                shutil.copyfileobj(src, spool)
                if spool.tell() != member.size:
                    spool.close()
                    raise EOFError("member shorter than its header says")
                spool.seek(0)
                old = self._files.pop(name, None)
                if old is not None:
                    old.close()
                self._files[name] = spool
                count += 1
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            if count == 0:
                raise CtraceError(f"{path} is damaged and holds no readable file: {exc}", ExitStatus.NO_INPUT) from None
            self.notes.append(
                f"bundle is damaged or truncated after {count} files ({exc}): inputs after that point are missing"
            )
            self.meta.setdefault("truncated", True)
        finally:
            tar.close()

    def _strip_wrapper(self) -> None:
        """Accept `tar czf b.tgz mytree/`: one top directory wrapping proc/... ."""
        names = list(self._files)
        if not names or any(n.startswith("proc/") or n == META for n in names):
            return
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) == 1 and all("/" in n for n in names):
            top = tops.pop() + "/"
            self._files = {n[len(top):]: f for n, f in self._files.items()}

    def _open(self, rel: str) -> IO[bytes]:
        f = self._files.get(rel)
        if f is None:
            recorded = self.meta.get("missing", {}) if isinstance(self.meta.get("missing"), dict) else {}
            if rel in recorded:
                raise InputMissing(f"when collected: {recorded[rel]}")
            raise InputMissing("not in the bundle" + (" (bundle truncated)" if self.meta.get("truncated") else ""))
        f.seek(0)
        return _Unclosable(f)  # type: ignore[return-value]

    def _list(self, rel: str) -> List[str]:
        prefix = rel.rstrip("/") + "/"
        names = [n[len(prefix):] for n in self._files if n.startswith(prefix) and "/" not in n[len(prefix):]]
        if not names:
            raise InputMissing("not in the bundle")
        return names

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class _Unclosable:
    """A view of a spooled member that the reader may close without losing it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._f)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Unclosable":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _member_name(name: str) -> Optional[str]:
    """A safe relative name, or None for absolute paths and `..` components."""
    name = name.replace("\\", "/")
    if name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return posixpath.join(*parts)


class LiveInputs(DirectoryInputs):
    """This machine: the real /proc and /sys, plus the ruleset and conntrack-tools
    commands, whose output is presented at the tree's command paths."""

    kind = "live"
    live = True

    def __init__(self, run: Optional[Callable[..., "subprocess.CompletedProcess[bytes]"]] = None, root: str = "/",
                 interval: float = 0.0) -> None:
        # `root` and `run` exist for tests: a constructed tree read as if it were live
        super().__init__(root, label="this machine" if root == "/" else root)
        self.interval = interval  # seconds between the two reads of the statistics (0: one read)
        self._run = run or subprocess.run
        self._which: Callable[[str], Optional[str]] = shutil.which if run is None else (lambda name: name)
        self.meta = {
            "format": BUNDLE_FORMAT,
            "hostname": socket.gethostname(),
            "kernel": os.uname().release,
            "byteorder": sys.byteorder,
            "euid": os.geteuid(),
            "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _reason(self, rel: str, exc: OSError) -> str:
        reason = _os_reason(exc, True)
        if rel == TABLE and isinstance(exc, PermissionError):
            return "permission denied (reading the table needs root or CAP_NET_ADMIN)"
        if rel == TABLE and reason == NOT_PRESENT:
            return "not present (kernel built without NF_CONNTRACK_PROCFS, or nf_conntrack not loaded)"
        if rel.startswith(NETFILTER) and reason == NOT_PRESENT:
            return "not present (nf_conntrack not loaded in this network namespace)"
        return reason

    def _open(self, rel: str) -> IO[bytes]:
        if rel in COMMANDS:
            return self._command(rel)
        if rel == STAT_LATER:
            return self._stat_later()
        return super()._open(rel)

    def _stat_later(self) -> IO[bytes]:
        """The statistics again, `interval` seconds after their first read (the other
        inputs were read meanwhile, so only the rest of the interval is waited)."""
        if self.interval <= 0:
            raise InputMissing("not asked for (--interval)")
        first = self.timing.get(STAT)
        if first is None:
            raise InputMissing(f"{STAT} was not read")
        wait = first[0] + self.interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return super()._open(STAT)

    def _command(self, rel: str) -> IO[bytes]:
        argv, timeout = COMMANDS[rel]
        shown = " ".join(argv)
        if self._which(argv[0]) is None:
            raise InputMissing(f"{argv[0]} is not installed")
        out = tempfile.TemporaryFile()
        env = dict(os.environ, LC_ALL="C")
        try:
            proc = self._run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            out.close()
            raise InputMissing(f"`{shown}` did not finish within {timeout} s") from None
        except OSError as exc:
            out.close()
            raise InputMissing(f"`{shown}` could not run: {exc.strerror or exc}") from None
        if proc.returncode != 0:
            out.close()
            err = (proc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
            first = err[0] if err else "no message"
            hint = " (run as root)" if os.geteuid() != 0 and "root" not in first else ""
            raise InputMissing(f"`{shown}` failed with exit {proc.returncode}: {first}{hint}")
        out.seek(0)
        return out


def open_root(root: Optional[str], interval: float = 0.0) -> Inputs:
    """Inputs for `--root` (a directory or a bundle file), or this machine when None."""
    if root is None or os.path.realpath(root) == "/":
        return LiveInputs(interval=interval)
    if os.path.isdir(root):
        if not os.path.isdir(os.path.join(root, "proc")):
            raise CtraceError(
                f"{root} has no proc/ directory: not a root tree (expected {root}/proc/sys/net/netfilter/...)",
                ExitStatus.NO_INPUT,
            )
        return DirectoryInputs(root)
    if os.path.exists(root):
        return BundleInputs(root)
    raise CtraceError(f"{root}: no such file or directory", ExitStatus.NO_INPUT)
