"""What the system says about conntrack without BPF: sysctls, the per-CPU
statistics of /proc/net/stat/nf_conntrack (conntrack -S), network namespaces,
and the entries that already exist (conntrack -L, or /proc/<pid>/net/nf_conntrack).

No bcc here: the parsers are pure functions tested on the host.
"""

import os
import shutil
import subprocess
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ctrace import abi

SYSCTL_DIR = "/proc/sys/net/netfilter"


def read_sysctls(root: str = "/") -> Dict[str, int]:
    """Every integer net.netfilter.nf_conntrack_* sysctl, by short name."""
    out: Dict[str, int] = {}
    d = os.path.join(root, SYSCTL_DIR.lstrip("/"))
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return out
    for name in names:
        if not name.startswith("nf_conntrack_"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        try:
            out[name] = int(text.split()[0]) if text else 0
        except ValueError:
            continue
    return out


def parse_stat(text: str) -> Dict[str, int]:
    """/proc/net/stat/nf_conntrack: a header of names, one hex line per CPU.
    Returns the sum over CPUs (`entries` is global: taken once)."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    names = lines[0]
    sums = {n: 0 for n in names}
    for row in lines[1:]:
        for n, v in zip(names, row):
            try:
                x = int(v, 16)
            except ValueError:
                continue
            if n == "entries":
                sums[n] = x
            else:
                sums[n] += x
    return sums


def read_stat(root: str = "/") -> Dict[str, int]:
    try:
        with open(os.path.join(root, "proc/net/stat/nf_conntrack")) as f:
            return parse_stat(f.read())
    except OSError:
        return {}


def own_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def netns_paths(root: str = "/") -> Dict[int, Tuple[str, Optional[int]]]:
    """Every network namespace we can name: inode -> (path to enter it, a pid in it or None)."""
    found: Dict[int, Tuple[str, Optional[int]]] = {}
    proc = os.path.join(root, "proc")
    try:
        pids = sorted((int(p) for p in os.listdir(proc) if p.isdigit()))
    except OSError:
        pids = []
    for pid in pids:
        path = os.path.join(proc, str(pid), "ns", "net")
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue
        if ino not in found:
            found[ino] = (path, pid)
    for d in ("run/netns", "var/run/netns"):
        base = os.path.join(root, d)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            path = os.path.join(base, name)
            try:
                ino = os.stat(path).st_ino
            except OSError:
                continue
            if ino not in found:
                found[ino] = (path, None)
    return found


# ---------------------------------------------------------------- entry listings

_TCP_STATES = {s.name: int(s) for s in abi.TcpState}
_L3 = {"ipv4": abi.AF_INET, "ipv6": abi.AF_INET6}


def _addr(text: str, family: int) -> bytes:
    import ipaddress

    ip = ipaddress.ip_address(text)
    b = ip.packed
    return b + bytes(16 - len(b)) if family == abi.AF_INET else b


def parse_entries(text: str, netns: int, ts_boot_ns: int, first_id: int = 1) -> np.ndarray:
    """Lines of `conntrack -L -o extended` or /proc/net/nf_conntrack -> EXISTING records.

    ct_id: the kernel pointer is not visible in a listing, so EXISTING records get
    small sequential ids from `first_id` (never a kernel pointer, which has its top
    bits set) and CT_FLAG_DUMP_ID; their later records carry the pointer, and the model
    matches them on netns, zone and original tuple.
    """
    out = abi.empty(0)
    recs = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 6 or tok[0] not in _L3:
            continue
        family = _L3[tok[0]]
        try:
            l4 = int(tok[3])
            timeout = int(tok[4])
        except ValueError:
            continue
        rest = tok[5:]
        state = 0
        if rest and "=" not in rest[0] and not rest[0].startswith("["):
            state = _TCP_STATES.get(rest[0], 0) if l4 == abi.IPPROTO_TCP else 0
            rest = rest[1:]
        groups: List[Dict[str, str]] = []
        flags = set()
        zone = 0
        for t in rest:
            if t.startswith("[") and t.endswith("]"):
                flags.add(t[1:-1])
                continue
            if "=" not in t:
                continue
            k, v = t.split("=", 1)
            if k == "src":
                groups.append({})
            if k == "zone":
                try:
                    zone = int(v)
                except ValueError:
                    pass
                continue
            if groups:
                groups[-1].setdefault(k, v)
        if len(groups) < 2 or "src" not in groups[0] or "dst" not in groups[0]:
            continue
        rec = abi.empty(1)[0]
        rec["kind"] = abi.Kind.EXISTING
        rec["flags"] = abi.FLAG_DUMP_ID
        rec["ts_boot_ns"] = ts_boot_ns
        rec["netns_ino"] = netns
        rec["family"] = family
        rec["l4proto"] = l4
        rec["ct_state"] = state
        rec["timeout_s"] = max(timeout, 0)
        rec["zone"] = zone
        status = abi.IPS_CONFIRMED
        if "UNREPLIED" not in flags:
            status |= abi.IPS_SEEN_REPLY
        if "ASSURED" in flags:
            status |= abi.IPS_ASSURED
        rec["status_raw"] = status
        try:
            for g, pre in ((groups[0], "orig"), (groups[1], "reply")):
                rec[f"{pre}_src"] = np.frombuffer(_addr(g["src"], family), dtype=np.uint8)
                rec[f"{pre}_dst"] = np.frombuffer(_addr(g["dst"], family), dtype=np.uint8)
                if "sport" in g:
                    rec[f"{pre}_sport_be"] = int(g["sport"])
                    rec[f"{pre}_dport_be"] = int(g.get("dport", 0))
                elif "type" in g:  # ICMP: id in the source port, type<<8|code in the destination
                    rec[f"{pre}_sport_be"] = int(g.get("id", 0))
                    rec[f"{pre}_dport_be"] = (int(g["type"]) << 8) | int(g.get("code", 0))
        except (ValueError, KeyError):
            continue
        rec["ct_id"] = first_id + len(recs)
        recs.append(rec)
    if recs:
        out = np.array(recs, dtype=abi.EVENT_DTYPE)
    return out


def _conntrack_list(path: str) -> Optional[str]:
    exe = shutil.which("conntrack")
    nsenter = shutil.which("nsenter")
    if not exe or not nsenter:
        return None
    text = []
    for fam in ("ipv4", "ipv6"):
        try:
            r = subprocess.run([nsenter, f"--net={path}", exe, "-L", "-f", fam, "-o", "extended"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode != 0:
            return None
        text.append(r.stdout.decode("ascii", "replace"))
    return "".join(text)


def dump_entries(ts_boot_ns: int, namespaces: Optional[Dict[int, Tuple[str, Optional[int]]]] = None
                 ) -> Tuple[np.ndarray, List[str]]:
    """Entries of every nameable netns as EXISTING records, and problems met.

    Prefers /proc/<pid>/net/nf_conntrack (one read, both families); a netns
    held only by a mount (ip netns add) is listed with `nsenter conntrack -L`.
    """
    ns = namespaces if namespaces is not None else netns_paths()
    parts: List[np.ndarray] = []
    problems: List[str] = []
    next_id = 1
    for ino, (path, pid) in sorted(ns.items()):
        text = None
        if pid is not None:
            try:
                with open(f"/proc/{pid}/net/nf_conntrack") as f:
                    text = f.read()
            except OSError:
                text = None
        if text is None:
            text = _conntrack_list(path)
        if text is None:
            problems.append(f"netns {ino}: no /proc/net/nf_conntrack and no conntrack tool")
            continue
        arr = parse_entries(text, ino, ts_boot_ns, next_id)
        next_id += len(arr)
        parts.append(arr)
    if not parts:
        return abi.empty(0), problems
    return abi.concat(parts), problems


def entry_keys(arr: np.ndarray) -> Iterable[bytes]:
    """A hashable (netns, family, proto, orig tuple) key per record."""
    for r in arr:
        yield (int(r["netns_ino"]).to_bytes(4, "little") + bytes([int(r["family"]), int(r["l4proto"])])
               + r["orig_src"].tobytes() + r["orig_dst"].tobytes()
               + int(r["orig_sport_be"]).to_bytes(2, "big") + int(r["orig_dport_be"]).to_bytes(2, "big"))
