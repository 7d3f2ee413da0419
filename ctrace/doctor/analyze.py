"""The checks: a Snapshot in, a Report out. Pure; thresholds are in `Thresholds` and
documented in docs/DOCTOR.md. Every finding carries the numbers it is based on, a
concrete recommendation and what that recommendation costs."""

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ctrace.doctor import inputs as P
from ctrace.doctor.model import (
    SCHEMA,
    Check,
    Finding,
    Missing,
    Recommendation,
    Report,
    Severity,
)
from ctrace.doctor.parse import prefix_of
from ctrace.doctor.snapshot import DEFAULT_TIMEOUTS, Snapshot, TableSummary

__all__ = ["SCHEMA", "Thresholds", "analyze"]


@dataclass(frozen=True)
class Thresholds:
    fill_warning: float = 0.75  # count / max
    fill_critical: float = 0.90
    chain_warning: float = 8.0  # max / buckets: mean hash chain length when full
    orphan_min: int = 10  # orphaned ESTABLISHED entries on one local address
    prefix_min_entries: int = 100
    prefix_min_share: float = 0.30  # of the entries read
    prefix_warning_of_max: float = 0.25  # one prefix could fill this much of the table
    udp_unreplied_min: int = 50
    udp_unreplied_min_share: float = 0.05
    udp_warning_share: float = 0.25
    service_min_entries: int = 100
    service_min_share: float = 0.30
    est_sample_min: int = 20  # idle ages needed to derive a timeout from them
    est_percentile: float = 99.0
    est_margin: float = 2.0
    pressure_fill: float = 0.50  # above this, "info" advice about the table becomes "warning"
    reclaim_warning_share: float = 0.10


ENTRY_BYTES_TYPICAL = 320  # struct nf_conn plus extensions, 64-bit; used without /proc/slabinfo

# What each input is for (shown next to inputs that could not be read).
NEEDED_FOR = {
    P.NETFILTER + "/nf_conntrack_count": ["table-size"],
    P.NETFILTER + "/nf_conntrack_max": ["table-size", "hash-size"],
    P.NETFILTER + "/nf_conntrack_buckets": ["hash-size"],
    P.NETFILTER + "/nf_conntrack_tcp_timeout_established": ["timeouts"],
    P.HASHSIZE: ["hash-size"],
    P.STAT: ["statistics"],
    P.CT_STATS: ["statistics"],
    P.TABLE: ["table-contents", "orphans", "established-idle"],
    P.CT_LIST: ["table-contents", "orphans", "established-idle"],
    P.TCP4: ["orphans"],
    P.TCP6: ["orphans"],
    P.FIB_TRIE: ["orphans (local addresses)"],
    P.IF_INET6: ["orphans (local addresses)"],
    P.KEEPALIVE: ["timeouts (keepalive floor)"],
    P.MODULES: ["ruleset (other conntrack users)"],
    P.SLABINFO: ["table-size (memory per entry)"],
    P.NFT: ["ruleset"],
    P.IPT: ["ruleset"],
    P.IP6T: ["ruleset"],
}


def _n(x: float) -> str:
    return f"{int(x):,}"


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def _dur(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400 and s % 3600 == 0:
        d = s / 86400
        return f"{s} s ({d:g} days)" if d != 1 else f"{s} s (1 day)"
    if s >= 3600 and s % 60 == 0:
        h = s / 3600
        return f"{s} s ({h:g} h)"
    return f"{s} s"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step) if x > 0 else step


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of unsorted values (0 for none)."""
    if not values:
        return 0
    ordered = sorted(values)
    k = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(k, len(ordered)) - 1]


def _sysctl_cmds(name: str, value: int) -> List[str]:
    return [
        f"sysctl -w net.netfilter.{name}={value}",
        f"echo 'net.netfilter.{name} = {value}' >> /etc/sysctl.d/90-conntrack.conf  # keep it after reboot",
    ]


class _Analysis:
    def __init__(self, snap: Snapshot, th: Thresholds, top: int) -> None:
        self.s = snap
        self.th = th
        self.top = top
        self.findings: List[Finding] = []
        self.checks: List[Check] = []
        self.notes: List[str] = list(snap.notes)
        self.tables: Dict[str, Any] = {}

    # -- helpers -----------------------------------------------------------------
    @property
    def fill(self) -> Optional[float]:
        if self.s.count is None or not self.s.max:
            return None
        return self.s.count / self.s.max

    def pressure(self) -> bool:
        fill = self.fill
        return fill is not None and fill >= self.th.pressure_fill

    def add(self, finding: Optional[Finding]) -> None:
        if finding is not None:
            self.findings.append(finding)

    def check(self, name: str, ran: bool, reason: str = "") -> bool:
        self.checks.append(Check(name, ran, reason))
        return ran

    def entry_bytes(self) -> int:
        return self.s.slab_objsize or ENTRY_BYTES_TYPICAL

    def entry_bytes_text(self) -> str:
        if self.s.slab_objsize:
            return f"{self.s.slab_objsize} B per entry (slab nf_conntrack) plus extensions"
        return f"about {ENTRY_BYTES_TYPICAL} B per entry (typical; /proc/slabinfo not read)"

    # -- checks ------------------------------------------------------------------
    def run(self) -> None:
        self.table_size()
        self.hash_size()
        self.timeouts()
        self.statistics()
        self.table_contents()
        self.orphans()
        self.ruleset()

    def table_size(self) -> None:
        s, th = self.s, self.th
        if not self.check("table-size", s.count is not None and s.max is not None,
                          "nf_conntrack_count or nf_conntrack_max missing"):
            return
        count, mx = s.count or 0, s.max or 0
        self.tables["table"] = self._table_overview()
        if mx == 0:
            self.notes.append("nf_conntrack_max is 0: no limit, table-near-full not judged")
            return
        fill = count / mx
        if fill < th.fill_warning:
            return
        sev = Severity.CRITICAL if fill >= th.fill_critical else Severity.WARNING
        new_max = max(_pow2_at_least(2 * count), 2 * mx)
        worst = new_max * self.entry_bytes()
        evidence: Dict[str, Any] = {
            "count": count,
            "max": mx,
            "fill_percent": _pct(count, mx),
            "recommended_max": new_max,
            "bytes_per_entry": self.entry_bytes(),
            "bytes_at_recommended_max": worst,
        }
        if s.table is not None:
            evidence["top_states"] = dict(s.table.by_state.most_common(5))
        self.add(Finding(
            id="table-near-full",
            severity=sev,
            title=f"conntrack table {_pct(count, mx)}% full: {_n(count)} of {_n(mx)} entries",
            detail=(
                "When the count reaches nf_conntrack_max, the kernel first evicts entries that never saw "
                "traffic both ways from near the new entry's hash bucket (early_drop); if there are none, it "
                "drops the packet that would create the entry and logs \"nf_conntrack: table full, dropping "
                "packet\". New connections then fail while existing ones keep working. Raising the limit buys "
                "time; the other findings say what fills the table."
            ),
            evidence=evidence,
            recommendation=Recommendation(
                text=f"Raise nf_conntrack_max to {_n(new_max)} now, then remove what fills the table.",
                commands=_sysctl_cmds("nf_conntrack_max", new_max),
                tradeoff=(
                    f"Kernel memory grows with the entries actually used: {self.entry_bytes_text()}, so up to "
                    f"{_bytes(worst)} when {_n(new_max)} entries are full. Keep nf_conntrack_buckets in step "
                    "(see hashsize-small) or lookups slow down as chains grow."
                ),
            ),
        ))

    def _table_overview(self) -> Dict[str, Any]:
        s = self.s
        out: Dict[str, Any] = {
            "count": s.count,
            "max": s.max,
            "buckets": s.buckets,
            "fill_percent": _pct(s.count or 0, s.max or 0) if s.max else None,
        }
        if s.table is not None:
            t = s.table
            out.update({
                "entries_read": t.entries,
                "source": t.source,
                "by_protocol": dict(t.by_proto.most_common()),
                "by_state": dict(t.by_state.most_common()),
                "local_entries": t.local_entries,
                "forwarded_entries": t.forwarded_entries,
                "offloaded": t.offloaded,
            })
        return out

    def hash_size(self) -> None:
        s, th = self.s, self.th
        buckets, mx = s.buckets, s.max
        if not self.check("hash-size", bool(buckets) and mx is not None,
                          "nf_conntrack_buckets (or the hashsize parameter) or nf_conntrack_max missing"):
            return
        assert buckets and mx is not None
        ratio = mx / buckets
        toolong = s.stats.total("chaintoolong") if s.stats is not None else None
        if ratio <= th.chain_warning and not toolong:
            return
        target = _pow2_at_least(max(mx, buckets * 2))
        evidence: Dict[str, Any] = {
            "buckets": buckets,
            "max": mx,
            "max_per_bucket": round(ratio, 2),
            "count_per_bucket": round((s.count or 0) / buckets, 2),
            "recommended_buckets": target,
        }
        if toolong is not None:
            evidence["chaintoolong"] = toolong
        why = []
        if ratio > th.chain_warning:
            why.append(f"a full table means {ratio:.1f} entries per bucket on average (more than {th.chain_warning:g})")
        if toolong:
            why.append(f"the kernel already refused {_n(toolong)} inserts because a hash chain was too long (chaintoolong)")
        self.add(Finding(
            id="hashsize-small",
            severity=Severity.WARNING,
            title=f"hash table too small for the limit: {_n(buckets)} buckets for up to {_n(mx)} entries",
            detail=(
                "Every packet looks its connection up in one hash chain, so the average chain length, "
                "entries divided by buckets, multiplies the lookup cost; since Linux 5.15 the default is one "
                "bucket per allowed entry. Here " + "; ".join(why) + "."
            ),
            evidence=evidence,
            recommendation=Recommendation(
                text=f"Resize the hash table to {_n(target)} buckets, and set it at module load so it survives a reboot.",
                commands=[
                    f"echo {target} > /sys/module/nf_conntrack/parameters/hashsize",
                    f"echo 'options nf_conntrack hashsize={target}' > /etc/modprobe.d/nf_conntrack.conf",
                ],
                tradeoff=(
                    f"{_bytes(target * 8)} of kernel memory (8 B per bucket). The resize rehashes every "
                    "entry while new connections wait: a short stall, so do it outside the peak."
                ),
            ),
        ))

    def timeouts(self) -> None:
        s = self.s
        rows: List[Dict[str, Any]] = []
        for name, default in DEFAULT_TIMEOUTS.items():
            if name in s.sysctls:
                rows.append({"name": name, "value": s.sysctls[name], "default": default})
        self.tables["timeouts"] = rows
        est_name = "nf_conntrack_tcp_timeout_established"
        if not self.check("timeouts", est_name in s.sysctls, f"{est_name} missing"):
            return
        self._established(s.sysctls[est_name])
        above = [r for r in rows if r["name"] != est_name and r["value"] > r["default"]
                 and (r["name"].startswith("nf_conntrack_tcp") or r["name"].startswith("nf_conntrack_udp"))]
        if above:
            short = ", ".join(
                f"{r['name'].replace('nf_conntrack_', '')} {r['value']} s (default {r['default']} s)" for r in above
            )
            cmds = []
            for r in above:
                cmds.append(f"sysctl -w net.netfilter.{r['name']}={r['default']}")
            self.add(Finding(
                id="timeout-above-default",
                severity=Severity.INFO,
                title=f"{len(above)} TCP/UDP conntrack timeouts are above the kernel default: {short}",
                detail=(
                    "Each of these keeps entries in that state longer than the kernel would. Some are set "
                    "on purpose (kube-proxy sets tcp_timeout_close_wait to 3600 s); if nobody knows why, they "
                    "only make the table fuller."
                ),
                evidence={"timeouts": above},
                recommendation=Recommendation(
                    text="Restore the defaults unless something documented needs the longer values.",
                    commands=cmds,
                    tradeoff="A connection that stays silent in that state longer than the default loses its entry.",
                ),
            ))

    def _established(self, timeout: int) -> None:
        s, th = self.s, self.th
        keepalive = s.keepalive or 7200
        floor = _round_up(keepalive * 1.5, 3600)
        t = s.table
        sample: Sequence[int] = t.est_idle_keep if t is not None else []
        idle_stats: Dict[str, Any] = {}
        derived = 0
        if t is not None:
            idle_stats = {
                "sample": len(sample),
                "p50_s": percentile(sample, 50),
                "p90_s": percentile(sample, 90),
                "p99_s": percentile(sample, th.est_percentile),
                "max_s": max(sample) if sample else 0,
                "ambiguous": t.est_ambiguous,
            }
            self.tables["established_idle"] = idle_stats
        floor_text = f"1.5 x tcp_keepalive_time ({keepalive} s), rounded up to the hour, so TCP keepalive keeps connections alive"
        if len(sample) >= th.est_sample_min:
            derived = _round_up(idle_stats["p99_s"] * th.est_margin, 3600)
            basis_code = "observed-idle-ages"
            basis = (
                f"the p{th.est_percentile:g} idle age of {_n(len(sample))} ESTABLISHED entries "
                f"({_n(idle_stats['p99_s'])} s) x {th.est_margin:g}, rounded up to the hour, and at least {floor_text}"
            )
        elif t is not None:
            basis_code = "keepalive-floor-few-entries"
            basis = (
                f"{floor_text}; only {len(sample)} ESTABLISHED entries have a known idle age, "
                f"too few (under {th.est_sample_min}) to derive more"
            )
        else:
            basis_code = "keepalive-floor-no-table"
            basis = f"{floor_text}; the table could not be read, so no idle ages were seen"
        recommended = max(floor, derived)
        if timeout < recommended * 2:
            return
        reclaim = sum(1 for v in t.est_idle_all if v > recommended) if t is not None else None
        # a warning when the table is under pressure and the long timeout is (or may be) part of it
        severity = Severity.INFO
        if self.pressure() and (t is None or (t.entries and (reclaim or 0) >= th.reclaim_warning_share * t.entries)):
            severity = Severity.WARNING
        evidence: Dict[str, Any] = {
            "timeout_s": timeout,
            "recommended_s": recommended,
            "basis": basis_code,
            "tcp_keepalive_time_s": keepalive,
        }
        evidence.update({f"idle_{k}": v for k, v in idle_stats.items()})
        if reclaim is not None and t is not None:
            evidence["reclaimable_entries"] = reclaim
            evidence["table_entries"] = t.entries
        loose = s.sysctls.get("nf_conntrack_tcp_loose")
        reclaim_text = ""
        if reclaim is not None:
            reclaim_text = (
                f" {_n(reclaim)} of the {_n(t.est_entries if t else 0)} ESTABLISHED entries now in the table "
                f"have been idle longer than that and would already be gone."
            )
        self.add(Finding(
            id="established-timeout-long",
            severity=severity,
            title=(
                f"ESTABLISHED entries are kept {_dur(timeout)} after their last packet; "
                f"{_dur(recommended)} would do here"
            ),
            detail=(
                f"A connection that ends without conntrack seeing a FIN or RST (peer crashed, RST dropped, "
                f"NAT or load balancer forgot it) holds its entry for the full {_dur(timeout)}. "
                f"The suggested value is {basis}.{reclaim_text}"
                + ((
                    " How the estimate works: idle age = configured timeout - seconds left, per entry. It assumes "
                    "the timeout was not changed since the entry's last packet and no timeout policy applies; "
                    "it only sees connections alive now (longer-idle ones already expired) at one moment; "
                    f"entries with {s.timeout('nf_conntrack_tcp_timeout_unacknowledged')} s or less left are "
                    "left out, because the kernel shortens the timeout of connections with unacknowledged data."
                ) if t is not None and sample else "")
            ),
            evidence=evidence,
            recommendation=Recommendation(
                text=f"Lower nf_conntrack_tcp_timeout_established to {recommended}.",
                commands=_sysctl_cmds("nf_conntrack_tcp_timeout_established", recommended),
                tradeoff=(
                    f"A connection idle longer than {_dur(recommended)} loses its entry. NAT'd connections then "
                    "break; behind `ct state established` rules the next packet is "
                    + ("picked up again as a new mid-stream connection if the ruleset accepts it (tcp_loose=1), "
                       "otherwise dropped" if loose != 0 else "dropped (tcp_loose=0)")
                    + ", and the application sees a hang or reset. Applications with TCP keepalive shorter than "
                    "the timeout are unaffected. The new value applies when an entry next sees a packet: entries "
                    "already idle keep their old expiry (delete them with conntrack -D)."
                ),
            ),
        ))

    def _growth(self, name: str) -> Optional[int]:
        """How much counter `name` grew between the two reads (--interval), or None."""
        a, b = self.s.stats, self.s.stats_later
        if a is None or b is None:
            return None
        first, second = a.total(name), b.total(name)
        if first is None or second is None or second < first:
            return None
        return second - first

    def _growth_text(self, name: str) -> Tuple[str, Dict[str, Any]]:
        grew = self._growth(name)
        if grew is None:
            return "", {}
        interval = self.s.stats_interval
        ev: Dict[str, Any] = {"grew_by": grew, "interval_s": interval}
        if interval:
            ev["per_second"] = round(grew / interval, 2)
        span = f"in the last {interval:g} s" if interval else "between the two reads"
        if grew:
            return f"; +{_n(grew)} {span}", ev
        return f"; none {span}", ev

    def _counter_severity(self, name: str, critical_now: bool, growing_is: Severity) -> Severity:
        """Severity of a cumulative counter: by its growth when read twice (--interval)."""
        grew = self._growth(name)
        if critical_now:
            return Severity.CRITICAL
        if grew is None:
            return Severity.WARNING
        return growing_is if grew else Severity.INFO

    def statistics(self) -> None:
        s = self.s
        st = s.stats
        if not self.check("statistics", st is not None, "no /proc/net/stat/nf_conntrack and no `conntrack -S`"):
            return
        assert st is not None
        totals = {c: st.total(c) for c in st.columns}
        self.tables["stats"] = {
            "source": st.source,
            "cpus": len(st.per_cpu),
            "totals": totals,
            "per_cpu": {c: st.by_cpu(c) for c in ("insert_failed", "drop", "early_drop", "search_restart") if c in st.columns},
        }
        if s.stats_later is not None:
            self.tables["stats"]["interval_s"] = s.stats_interval
            self.tables["stats"]["growth"] = {c: self._growth(c) for c in st.columns}
        critical_now = self.fill is not None and self.fill >= self.th.fill_critical
        since = "since boot or module load"
        failed = totals.get("insert_failed") or 0
        drop = totals.get("drop") or 0
        early = totals.get("early_drop") or 0
        cumulative = (
            "The counter is cumulative: run doctor with --interval 60 (or conntrack -S twice) to see whether it "
            "still grows." if s.stats_later is None else ""
        )
        if failed:
            more, gev = self._growth_text("insert_failed")
            ev: Dict[str, Any] = {"insert_failed": failed, "per_cpu": st.by_cpu("insert_failed"), "drop": drop}
            for extra in ("clash_resolve", "chaintoolong", "search_restart"):
                if extra in totals:
                    ev[extra] = totals[extra]
            ev.update(gev)
            self.add(Finding(
                id="insert-failed",
                severity=self._counter_severity("insert_failed", False, Severity.WARNING),
                title=f"{_n(failed)} new connections failed to enter the table (insert_failed, {since}{more})",
                detail=(
                    "insert_failed counts packets whose new entry could not be inserted: another CPU inserted "
                    "the same connection first and the clash could not be resolved (typically UDP through NAT: "
                    "DNS A and AAAA queries sent at once from one socket), or the hash chain was too long "
                    "(chaintoolong). That packet is dropped; for DNS it means a 5-second resolver timeout. "
                    + (f"The kernel did resolve {_n(totals['clash_resolve'] or 0)} clashes (clash_resolve). "
                       if totals.get("clash_resolve") else "")
                    + cumulative
                ),
                evidence=ev,
                recommendation=Recommendation(
                    text=(
                        "If it still grows: for DNS through NAT, use a node-local DNS cache or glibc's "
                        "`options single-request-reopen` in /etc/resolv.conf; if chaintoolong grows, see "
                        "hashsize-small."
                    ),
                    commands=["conntrack -S; sleep 60; conntrack -S"],
                    tradeoff=(
                        "single-request-reopen sends the A and AAAA queries from different sockets, one socket "
                        "more per lookup; a node-local cache is one more daemon to run."
                    ),
                ),
            ))
        if early:
            more, gev = self._growth_text("early_drop")
            ev = {"early_drop": early, "per_cpu": st.by_cpu("early_drop"), "drop": drop, "count": s.count, "max": s.max}
            ev.update(gev)
            self.add(Finding(
                id="early-drop",
                severity=self._counter_severity("early_drop", critical_now, Severity.CRITICAL),
                title=f"the table overflowed: {_n(early)} entries were evicted to admit new ones (early_drop, {since}{more})",
                detail=(
                    "The kernel evicts only when the count has reached nf_conntrack_max: it removes entries "
                    "that never saw traffic both ways (handshakes in progress, unanswered UDP) from near the new "
                    "entry's hash bucket. Connections being set up at that moment lost their state."
                    + (" The table is that full right now." if critical_now else "")
                    + (" " + cumulative if cumulative else "")
                ),
                evidence=ev,
                recommendation=Recommendation(
                    text="Give the table headroom (table-near-full) and remove what fills it (orphans, long timeouts, unanswered UDP).",
                    commands=_sysctl_cmds("nf_conntrack_max", max(_pow2_at_least(2 * (s.count or 0)), 2 * (s.max or 0))) if s.max else [],
                    tradeoff=f"A larger table costs kernel memory: {self.entry_bytes_text()}.",
                ),
            ))
        if drop:
            more, gev = self._growth_text("drop")
            ev = {"drop": drop, "per_cpu": st.by_cpu("drop"), "insert_failed": failed, "early_drop": early}
            ev.update(gev)
            self.add(Finding(
                id="packets-dropped",
                severity=self._counter_severity("drop", critical_now, Severity.CRITICAL),
                title=f"conntrack dropped {_n(drop)} packets (drop, {since}{more})",
                detail=(
                    "The drop counter counts packets conntrack refused: the table was full and nothing could be "
                    "evicted (the kernel logs \"nf_conntrack: table full, dropping packet\"), or an insert clash "
                    "could not be resolved (those are also in insert_failed: "
                    f"{_n(failed)}). Each is a lost packet, usually the first of a new connection."
                    + (" The table is that full right now." if critical_now else "")
                    + (" " + cumulative if cumulative else "")
                ),
                evidence=ev,
                recommendation=Recommendation(
                    text="Find when it happened (dmesg shows the \"table full\" lines) and give the table headroom.",
                    commands=["dmesg -T | grep -i 'nf_conntrack: table full'", "conntrack -S"],
                    tradeoff="None for looking; see table-near-full for the cost of a larger table.",
                ),
            ))

    def table_contents(self) -> None:
        s = self.s
        t = s.table
        if not self.check("table-contents", t is not None, "the table could not be read"):
            return
        assert t is not None
        if s.count is not None and t.entries == 0 and s.count > 0:
            self.notes.append(
                f"the table read was empty but nf_conntrack_count is {s.count}: this view may be another "
                "network namespace's"
            )
        if t.above_timeout:
            self.notes.append(
                f"{_n(t.above_timeout)} TCP entries have more time left than their state's timeout allows: the "
                "timeout was lowered after their last packet, and they keep the old expiry until they see a packet "
                "or are deleted (conntrack -D)"
            )
        self.tables["sources"] = [
            {"ip": ip, "entries": n, "states": dict(t.src_states.get(ip, Counter()).most_common())}
            for ip, n in t.src_ips.most_common(self.top)
        ]
        if len(t.src_states) < len(t.src_ips):
            self.notes.append(
                f"per-state counts cover the first {_n(len(t.src_states))} of {_n(len(t.src_ips))} source addresses"
            )
        top_prefixes = t.prefixes.most_common(self.top)
        self.tables["prefixes"] = [
            {"prefix": p, "entries": n, "addresses": len(addrs), "states": dict(t.prefix_states[p].most_common())}
            for (p, n), addrs in zip(top_prefixes, self._prefix_addrs(top_prefixes))
        ]
        self.tables["services"] = [
            {"proto": proto, "port": port, "entries": n} for (proto, port), n in t.services.most_common(self.top)
        ]
        if t.ages:
            self.tables["entry_age"] = {"sample": len(t.ages), "p50_s": percentile(t.ages, 50),
                                        "p99_s": percentile(t.ages, 99), "max_s": max(t.ages)}
        self._prefix(t)
        self._udp(t)

    def _prefix_addrs(self, top: List[Any]) -> List[Counter]:
        """Addresses of each of the `top` prefixes, in one pass over the sources."""
        wanted = {p: Counter() for p, _ in top}  # type: Dict[str, Counter]
        if self.s.table is not None:
            for ip, n in self.s.table.src_ips.items():
                c = wanted.get(prefix_of(ip)[0])
                if c is not None:
                    c[ip] = n
        return [wanted[p] for p, _ in top]

    def _prefix(self, t: TableSummary) -> None:
        th, s = self.th, self.s
        hits = [(p, n) for p, n in t.prefixes.most_common(3)
                if n >= th.prefix_min_entries and t.entries and n / t.entries >= th.prefix_min_share]
        if not hits:
            return
        pfx, n = hits[0]
        addrs = self.s.prefix_addresses(pfx)
        top_addr, top_n = addrs.most_common(1)[0]
        sev = Severity.WARNING if s.max and n >= th.prefix_warning_of_max * s.max else Severity.INFO
        evidence: Dict[str, Any] = {
            "prefix": pfx,
            "entries": n,
            "share_percent": _pct(n, t.entries),
            "percent_of_max": _pct(n, s.max or 0) if s.max else None,
            "addresses": len(addrs),
            "top_addresses": [{"ip": a, "entries": c} for a, c in addrs.most_common(5)],
            "states": dict(t.prefix_states[pfx].most_common()),
            "other_prefixes": [{"prefix": p, "entries": c} for p, c in hits[1:]],
        }
        v6 = ":" in pfx
        mask = 64 if v6 else 24
        ipt = "ip6tables" if v6 else "iptables"
        self.add(Finding(
            id="concentrated-prefix",
            severity=sev,
            title=(
                f"{_n(n)} entries ({_pct(n, t.entries)}% of the table) come from {pfx}: "
                f"{len(addrs)} addresses, most from {top_addr} ({_n(top_n)})"
            ),
            detail=(
                f"One /{mask} holds a large part of the table. That is expected behind a NAT gateway or load "
                "balancer, or for one big client; otherwise it is a runaway client, a retry loop or a scan. "
                + (f"At this rate it alone could take {_pct(n, s.max or 1)}% of nf_conntrack_max." if s.max else "")
            ),
            evidence=evidence,
            recommendation=Recommendation(
                text=(
                    f"Find out who {pfx} is. If it is not expected, cap what one /{mask} may hold with a "
                    "connection limit (INPUT for traffic to this host, FORWARD for routed traffic)."
                ),
                commands=[
                    f"conntrack -L -s {top_addr} | head",
                    f"{ipt} -I INPUT -s {pfx} -p tcp --syn -m connlimit --connlimit-above 1000 "
                    f"--connlimit-mask {mask} -j REJECT --reject-with tcp-reset",
                ],
                tradeoff=(
                    "Legitimate clients behind that prefix (one NAT, many users) are refused above the limit; "
                    "connlimit itself needs conntrack and costs a lookup per new connection."
                ),
            ),
        ))

    def _udp(self, t: TableSummary) -> None:
        th, s = self.th, self.s
        u = t.udp_unreplied
        if u < th.udp_unreplied_min or not t.entries or u < th.udp_unreplied_min_share * t.entries:
            return
        share = u / t.entries
        sev = Severity.WARNING if share >= th.udp_warning_share or (self.fill or 0) >= th.fill_warning else Severity.INFO
        timeout = s.timeout("nf_conntrack_udp_timeout")
        dest, dest_n = t.udp_unreplied_dest.most_common(1)[0]
        evidence: Dict[str, Any] = {
            "udp_entries": t.udp_entries,
            "unreplied": u,
            "share_percent": _pct(u, t.entries),
            "fresh": t.udp_unreplied_fresh,
            "udp_timeout_s": timeout,
            "idle_p50_s": percentile(t.udp_unreplied_idle, 50),
            "top_destinations": [{"destination": d, "entries": c} for d, c in t.udp_unreplied_dest.most_common(5)],
            "dnat": [{"mapping": m, "entries": c} for m, c in t.udp_unreplied_dnat.most_common(5)],
        }
        host, _, port = dest.rpartition(":")
        host = host.strip("[]")
        cmds = [f"conntrack -D -p udp -d {host}" + (f" --dport {port}" if port.isdigit() else "")]
        cmds += _sysctl_cmds("nf_conntrack_udp_timeout", max(5, min(timeout, 10)))
        dnat_text = ""
        if t.udp_unreplied_dnat:
            m, c = t.udp_unreplied_dnat.most_common(1)[0]
            dnat_text = (
                f" {_n(sum(t.udp_unreplied_dnat.values()))} of them are DNAT'd (e.g. {m}, {_n(c)} entries): if that "
                "backend is gone, each entry keeps steering new packets to it; flush them."
            )
        self.add(Finding(
            id="udp-stale",
            severity=sev,
            title=(
                f"{_n(u)} UDP entries ({_pct(u, t.entries)}% of the table) never saw a reply; "
                f"most go to {dest} ({_n(dest_n)})"
            ),
            detail=(
                f"An unanswered UDP flow keeps its entry for nf_conntrack_udp_timeout ({timeout} s) after its last "
                f"packet. {_n(t.udp_unreplied_fresh)} of them saw a packet in the last {5} s: something keeps "
                "sending to a peer that does not answer (a dead DNS server, a deleted backend), and as long as "
                "it keeps sending, the entry never expires." + dnat_text
            ),
            evidence=evidence,
            recommendation=Recommendation(
                text="Fix or remove the unanswered destination and flush its entries; lower the UDP timeout only if they are merely numerous.",
                commands=cmds,
                tradeoff=(
                    "A shorter UDP timeout drops the entry of request/response exchanges whose answer comes "
                    "later; behind `ct state established` rules that late answer is dropped. Flushing a working "
                    "flow's entry just makes its next packet start a new one."
                ),
            ),
        ))

    def orphans(self) -> None:
        s, th = self.s, self.th
        t = s.table
        reason = ""
        if t is None:
            reason = "the table could not be read"
        elif s.sockets is None:
            reason = "/proc/net/tcp and tcp6 could not be read"
        if not self.check("orphans", not reason, reason):
            return
        assert t is not None and s.sockets is not None
        sock_states, sock_peers = s.sockets.states, s.sockets.peers
        rows = []
        for ip, row in sorted(t.local_ips.items(), key=lambda kv: -sum(kv[1].ct_states.values()))[: self.top]:
            rows.append({
                "ip": ip,
                "conntrack": dict(row.ct_states.most_common()),
                "sockets": dict(sock_states.get(ip, Counter()).most_common()),
                "orphaned": row.orphans,
            })
        self.tables["per_ip"] = rows
        if not s.local_addrs:
            self.notes.append("no local addresses known: every entry counts as forwarded, orphans cannot be seen")
        hits = []
        for ip, row in t.local_ips.items():
            socks = sock_states.get(ip, Counter()).get("ESTABLISHED", 0)
            if row.orphans >= th.orphan_min and row.orphans >= socks:
                hits.append((ip, row, socks))
        if not hits:
            return
        hits.sort(key=lambda h: -h[1].orphans)
        total = sum(h[1].orphans for h in hits)
        addresses: List[Dict[str, Any]] = []
        cmds: List[str] = []
        for ip, row, socks in hits[: self.top]:
            peers = []
            for (peer, side), c in row.orphan_peers.most_common(5):
                live = sock_peers.get(peer, 0)
                peers.append({"peer": peer, "orphaned": c, "local_is": side, "sockets_to_peer": live})
                if live == 0 and len(cmds) < 6:
                    if side == "server":
                        cmds.append(f"conntrack -D -p tcp --state ESTABLISHED -r {ip} -q {peer}")
                    else:
                        cmds.append(f"conntrack -D -p tcp --state ESTABLISHED -s {ip} -d {peer}")
            addresses.append({
                "ip": ip,
                "conntrack_established": row.ct_states.get("ESTABLISHED", 0),
                "sockets_established": socks,
                "orphaned": row.orphans,
                "orphaned_idle_p50_s": percentile(row.orphan_idle, 50),
                "orphaned_idle_max_s": max(row.orphan_idle) if row.orphan_idle else 0,
                "peers": peers,
            })
        ip, row, socks = hits[0]
        est_timeout = s.timeout("nf_conntrack_tcp_timeout_established")
        if len(hits) == 1:
            title = (
                f"{ip}: conntrack holds {_n(row.ct_states.get('ESTABLISHED', 0))} ESTABLISHED entries but only "
                f"{_n(socks)} ESTABLISHED sockets exist: {_n(row.orphans)} have no socket (lost FIN/RST)"
            )
        else:
            title = (
                f"{_n(total)} ESTABLISHED entries on {len(hits)} local addresses have no socket (lost FIN/RST); "
                f"most on {ip}: {_n(row.orphans)} orphaned, {_n(socks)} ESTABLISHED sockets"
            )
        top_peer = addresses[0]["peers"][0] if addresses[0]["peers"] else None
        self.add(Finding(
            id="orphaned-established",
            severity=Severity.WARNING,
            title=title,
            detail=(
                "Each of these entries is ESTABLISHED in conntrack, but no local socket has its addresses and "
                "ports: the connection ended without conntrack seeing the FIN or RST (a RST dropped by a "
                "`ct state invalid drop` rule, a peer that vanished, asymmetric routing). Each holds a slot until "
                f"the ESTABLISHED timeout, {_dur(est_timeout)} after its last packet. "
                + (f"Most point at {top_peer['peer']} ({_n(top_peer['orphaned'])}). " if top_peer else "")
                + f"Entries idle {s.race_window:.0f} s or less were not counted: a connection opened while "
                "doctor read the sockets and the table looks the same."
                + (f" ({_n(sum(r.young_unmatched for r in t.local_ips.values()))} such young entries.)"
                   if any(r.young_unmatched for r in t.local_ips.values()) else "")
            ),
            evidence={
                "orphaned_total": total,
                "addresses": addresses,
                "min_idle_s": round(s.race_window, 1),
                "established_timeout_s": est_timeout,
                "local_addresses_from": s.local_source,
            },
            recommendation=Recommendation(
                text=(
                    "Delete the orphaned entries (the commands below cover peers with no live socket here), then "
                    "find where the FIN/RST are lost; a shorter ESTABLISHED timeout bounds how long future orphans stay."
                ),
                commands=cmds or ["conntrack -L -p tcp --state ESTABLISHED"],
                tradeoff=(
                    "Deleting the entry of a connection that is in fact alive (its socket in another network "
                    "namespace, e.g. a container, which this view does not see) breaks it if it is NAT'd or needs "
                    "`ct state established`; with nf_conntrack_tcp_loose=1 it is picked up again on its next packet."
                ),
            ),
        ))

    def ruleset(self) -> None:
        s = self.s
        scan = s.ruleset
        if not self.check("ruleset", scan is not None, "no saved ruleset (nft, iptables-save) could be read"):
            return
        assert scan is not None
        self.tables["rules"] = {
            "sources": scan.sources,
            "rules": scan.rules,
            "needs_conntrack": [u.to_json() for u in scan.uses[: self.top]],
            "needs_conntrack_total": len(scan.uses),
            "notrack": [u.to_json() for u in scan.notrack[: self.top]],
        }
        users = []
        if s.modules is not None:
            users = sorted(set(s.modules.get("nf_conntrack", [])))
        if not scan.uses:
            count = s.count
            missing_sources = [p for p in P.RULESETS if p in s.missing]
            other = [u for u in users if u not in ("nf_conntrack_netlink",)]
            self.add(Finding(
                id="conntrack-unneeded",
                severity=Severity.WARNING if self.pressure() else Severity.INFO,
                title=(
                    f"no rule needs connection tracking ({scan.rules} rules in {', '.join(scan.sources)})"
                    + (f", yet the table holds {_n(count)} entries" if count
                       else ", and this namespace tracks nothing (0 entries)" if count == 0 else "")
                ),
                detail=(
                    "Since Linux 4.10 conntrack tracks a network namespace only when something asks for it: a "
                    "state/conntrack match, a NAT table, a CT target, a connection limit, a flowtable. Nothing in "
                    "this ruleset does. "
                    + (f"Modules that depend on nf_conntrack: {', '.join(other)}; some of them (openvswitch, ip_vs, "
                       "act_ct, nf_nat) track connections without any firewall rule. " if other else "")
                    + ("IPVS has conntrack=1. " if s.ipvs_conntrack else "")
                    + (f"Not read: {', '.join(missing_sources)}, so rules there were not seen. " if missing_sources else "")
                    + "If nothing else needs it, every entry is pure cost."
                ),
                evidence={
                    "ruleset_sources": scan.sources,
                    "rules_examined": scan.rules,
                    "notrack_rules": len(scan.notrack),
                    "count": count,
                    "modules_using_nf_conntrack": users,
                    "ipvs_conntrack": s.ipvs_conntrack,
                },
                recommendation=Recommendation(
                    text=(
                        "If nothing needs it, stop tracking: unload the conntrack modules, or exempt all traffic "
                        "before conntrack sees it (raw priority)."
                    ),
                    commands=[
                        "nft add table inet notrack_all",
                        "nft add chain inet notrack_all prerouting '{ type filter hook prerouting priority -300; }'",
                        "nft add chain inet notrack_all output '{ type filter hook output priority -300; }'",
                        "nft add rule inet notrack_all prerouting notrack",
                        "nft add rule inet notrack_all output notrack",
                    ],
                    tradeoff=(
                        "Untracked traffic cannot be NAT'd or matched by ct state: a NAT or stateful rule added "
                        "later sees every packet as untracked until the exemption is removed."
                    ),
                ),
            ))
            return
        self._notrack_candidate(scan)

    def _notrack_candidate(self, scan: Any) -> None:
        s, th = self.s, self.th
        t = s.table
        if t is None or not t.entries:
            return
        for (proto, port), n in t.services.most_common(1):
            if n < th.service_min_entries or n / t.entries < th.service_min_share or proto not in ("tcp", "udp"):
                return
            first = scan.uses[0]
            self.add(Finding(
                id="notrack-candidate",
                severity=Severity.INFO,
                title=f"{proto}/{port} accounts for {_n(n)} entries ({_pct(n, t.entries)}% of the table): a candidate for notrack",
                detail=(
                    f"The ruleset needs conntrack ({len(scan.uses)} rules, e.g. {first.source}:{first.line} "
                    f"`{first.text}`), so it stays. But one service holds a large share of the table; if its "
                    "traffic needs neither NAT nor ct-state rules, exempting it frees those entries and the "
                    "per-packet conntrack work."
                ),
                evidence={"proto": proto, "port": port, "entries": n, "share_percent": _pct(n, t.entries),
                          "rules_needing_conntrack": len(scan.uses)},
                recommendation=Recommendation(
                    text=f"Exempt {proto}/{port} in the raw hook, and accept it with stateless rules in both directions.",
                    commands=[
                        "nft add table inet notrack_svc",
                        "nft add chain inet notrack_svc prerouting '{ type filter hook prerouting priority -300; }'",
                        "nft add chain inet notrack_svc output '{ type filter hook output priority -300; }'",
                        f"nft add rule inet notrack_svc prerouting {proto} dport {port} notrack",
                        f"nft add rule inet notrack_svc prerouting {proto} sport {port} notrack",
                        f"nft add rule inet notrack_svc output {proto} sport {port} notrack",
                        f"nft add rule inet notrack_svc output {proto} dport {port} notrack",
                    ],
                    tradeoff=(
                        "Rules that accept this traffic by `ct state established` no longer match it: add stateless "
                        "accept rules for both directions first. NAT cannot apply to it."
                    ),
                ),
            ))

    def missing(self) -> List[Missing]:
        out = []
        for path, reason in sorted(self.s.missing.items()):
            out.append(Missing(path, reason, NEEDED_FOR.get(path, [])))
        return out


def analyze(snap: Snapshot, thresholds: Optional[Thresholds] = None, top: int = 10) -> Report:
    a = _Analysis(snap, thresholds or Thresholds(), top)
    a.run()
    order = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.INFO: 2}
    findings = sorted(a.findings, key=lambda f: order[f.severity])
    meta = snap.meta
    source = {
        "kind": snap.kind,
        "path": snap.label,
        "hostname": meta.get("hostname"),
        "kernel": meta.get("kernel"),
        "collected_at": meta.get("collected_at"),
    }
    return Report(source=source, findings=findings, checks=a.checks, missing=a.missing(), notes=a.notes, tables=a.tables)

