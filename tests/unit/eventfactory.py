"""Build event records by hand for model and view tests."""

from typing import Any, Dict, List

import numpy as np

from ctrace import abi
from ctrace.keys import parse_addr
from ctrace.sources.base import SourceInfo

NS = 1_000_000_000
T0 = 100 * NS
INFO = SourceInfo("testhost", "6.1.0-test", 1_700_000_000 * NS, T0, sysctls={"nf_conntrack_max": 100})


def records(*specs: Dict[str, Any]) -> np.ndarray:
    """Each spec: kind, ct_id, t (seconds after T0), src, dst, sport, dport, proto, state,
    oldstate, reason, flags, netns, start (seconds), value, status."""
    out = abi.empty(len(specs))
    for i, s in enumerate(specs):
        r = out[i]
        fam, src = parse_addr(s.get("src", "10.0.0.1"))
        _, dst = parse_addr(s.get("dst", "10.9.9.9" if fam == abi.AF_INET else "fd00::9"))
        r["kind"] = s["kind"]
        r["ct_id"] = s.get("ct_id", 0)
        r["ts_boot_ns"] = T0 + int(s.get("t", 0) * NS)
        r["family"] = fam
        r["orig_src"] = np.frombuffer(src, np.uint8)
        r["orig_dst"] = np.frombuffer(dst, np.uint8)
        r["orig_sport_be"] = s.get("sport", 40000)
        r["orig_dport_be"] = s.get("dport", 443)
        r["l4proto"] = s.get("proto", abi.IPPROTO_TCP)
        r["ct_state"] = s.get("state", abi.TcpState.ESTABLISHED)
        r["ct_oldstate"] = s.get("oldstate", 0)
        r["reason"] = s.get("reason", 0)
        r["netns_ino"] = s.get("netns", 4026531840)
        r["status_raw"] = s.get("status", abi.IPS_CONFIRMED)
        r["value"] = s.get("value", 0)
        if "start" in s:
            r["start_boot_ns"] = T0 + int(s["start"] * NS)
            r["flags"] = abi.FLAG_START_KNOWN
        r["flags"] |= s.get("flags", 0)
    return out


def new(ct_id: int, t: float, **kw: Any) -> Dict[str, Any]:
    return dict(kw, kind=abi.Kind.NEW, ct_id=ct_id, t=t, state=kw.get("state", abi.TcpState.SYN_SENT))


def destroy(ct_id: int, t: float, state: int, reason: int = abi.DestroyReason.TIMEOUT, **kw: Any) -> Dict[str, Any]:
    return dict(kw, kind=abi.Kind.DESTROY, ct_id=ct_id, t=t, state=state, reason=reason)


def state(ct_id: int, t: float, new_state: int, **kw: Any) -> Dict[str, Any]:
    return dict(kw, kind=abi.Kind.STATE, ct_id=ct_id, t=t, state=new_state)


def seq(specs: List[Dict[str, Any]]) -> np.ndarray:
    return records(*specs)
