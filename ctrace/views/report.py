"""`ctrace report`: a snapshot as the ctrace.report/1 JSON contract or as text."""

import datetime
from typing import Any, Dict, List, Optional, Sequence

from ctrace.model import Row, Snapshot
from ctrace.views.units import ring_fill, seconds

SCHEMA = "ctrace.report/1"


def _iso(boot_ns: int, boot_to_wall_ns: int) -> str:
    wall = (boot_ns + boot_to_wall_ns) / 1e9
    return datetime.datetime.fromtimestamp(wall, tz=datetime.timezone.utc).isoformat(timespec="milliseconds")


def _row(r: Row, name: str) -> Dict[str, Any]:
    return {
        name: r.label,
        "netns": r.netns,
        "live": r.live,
        "created": r.created,
        "destroyed": r.destroyed,
        "orphans": r.orphans,
        "orphans_live": r.orphans_live,
        "drops": r.drops,
        "states": dict(sorted(r.states.items())),
        "removals": dict(sorted(r.removals.items())),
        "median_age_s": None if r.median_age_s is None else round(r.median_age_s, 3),
    }


def to_json(s: Snapshot, top: Optional[int] = None, damage: Sequence[str] = ()) -> Dict[str, Any]:
    ins, exp = s.rates(window=False)
    d = s.duration_s
    ttf = s.time_to_full_s(window=False)
    drops: List[Dict[str, Any]] = [
        {"ip": r.label, "netns": r.netns, "count": r.drops, "samples": list(r.drop_samples)}
        for r in s.ips.top(top, sort="drops", where=lambda t: t.drops > 0)
    ]
    return {
        "schema": SCHEMA,
        "source": {
            "kernel": s.info.kernel,
            "hostname": s.info.hostname,
            "start": _iso(s.start_boot_ns, s.info.boot_to_wall_ns),
            "end": _iso(s.now_boot_ns, s.info.boot_to_wall_ns),
            "duration_s": round(d, 3),
            "probes": list(s.info.probes),
            "synthetic": s.info.synthetic,
            "scenario": s.info.extra.get("scenario"),
            "damage": list(damage),
        },
        "events": {"total": s.events_total, "lost": s.lost_total, "lost_by_cause": dict(s.lost), "by_kind": dict(s.events_by_kind)},
        "table": {
            "max": s.table_max,
            "buckets": s.buckets,
            "start_count": s.start_count,
            "end_count": s.count,
            "peak_count": s.peak_count,
            "kernel_count": s.kernel_count,
            "insert_rate_per_s": round(ins, 3),
            "expire_rate_per_s": round(exp, 3),
            "net_growth_per_s": round((s.count - s.start_count) / d, 3) if d else 0.0,
            "time_to_full_s": None if ttf is None else round(ttf, 1),
        },
        "removals": dict(s.removals),
        "lifetimes": s.lifetimes,
        "orphans_by_kind": dict(s.orphans_by_kind),
        "ips": [_row(r, "ip") for r in s.ips.top(top)],
        "prefixes": [_row(r, "prefix") for r in s.prefixes.top(top)],
        "netns": [_row(r, "netns_label") for r in s.netns],
        "orphans": list(s.orphans),
        "orphans_total": sum(s.orphans_by_kind.values()),
        "drops": drops,
        "drops_by_reason": dict(s.drops_by_reason),
        "untracked": dict(s.untracked),
        "kernel_counters": dict(s.kernel_counters),
        "ring": None if s.ring is None else {"size_bytes": s.ring.size_bytes, "peak_bytes": s.ring.max_peak_bytes},
    }


def render_text(s: Snapshot, top: int = 20, damage: Sequence[str] = ()) -> str:
    j = to_json(s, top)
    t = j["table"]
    src = j["source"]
    out = []
    if s.info.synthetic:
        out.append(f"SYNTHETIC DATA (scenario {src['scenario']}): modelled, not traced from a kernel")
    for line in damage:
        out.append(f"WARNING: {line}")
    out.append(f"host {src['hostname']}  kernel {src['kernel']}  {src['start']} .. {src['end']} ({seconds(src['duration_s'])})")
    ev = j["events"]
    lost = f"  LOST {ev['lost']} ({', '.join(f'{k} {v}' for k, v in ev['lost_by_cause'].items())})" if ev["lost"] else "  lost 0"
    out.append(f"events {ev['total']}{lost}")
    ring = j["ring"]
    if ring:
        out.append(f"ring buffer at its fullest {ring_fill(ring['peak_bytes'], ring['size_bytes'])} of {ring['size_bytes'] >> 10} KiB"
                   " when read")
    fill = f" ({100 * t['end_count'] / t['max']:.1f}% of {t['max']})" if t["max"] else ""
    out.append(f"entries {t['start_count']} -> {t['end_count']}{fill}, peak {t['peak_count']}")
    out.append(
        f"inserts {t['insert_rate_per_s']:.1f}/s  expiries {t['expire_rate_per_s']:.1f}/s  net {t['net_growth_per_s']:+.2f}/s"
        f"  time to full {seconds(t['time_to_full_s']) if t['time_to_full_s'] is not None else 'not growing'}"
    )
    if j["removals"]:
        out.append("removals  " + "  ".join(f"{k} {v}" for k, v in sorted(j["removals"].items(), key=lambda kv: -kv[1])))
    ob = j["orphans_by_kind"]
    out.append(f"orphans   socket closed while ESTABLISHED {ob['socket-closed']}  expired idle in ESTABLISHED {ob['expired-established']}")
    if j["drops_by_reason"]:
        out.append("drops     " + "  ".join(f"{k} {v}" for k, v in j["drops_by_reason"].items()))
    for title, rows, name in (("ADDRESS", j["ips"], "ip"), ("PREFIX", j["prefixes"], "prefix")):
        out.append("")
        out.append(f"{title:<28} {'NETNS':>10} {'LIVE':>7} {'NEW':>7} {'GONE':>7} {'ESTAB':>6} {'ORPH':>5} {'DROPS':>6}")
        for r in rows:
            out.append(
                f"{r[name]:<28} {r['netns']:>10} {r['live']:>7} {r['created']:>7} {r['destroyed']:>7}"
                f" {r['states'].get('ESTABLISHED', 0):>6} {r['orphans']:>5} {r['drops']:>6}"
            )
    un = j["untracked"]
    if un["keys_evicted"]:
        out.append(f"untracked: {un['keys_evicted']} addresses evicted from the bounded table ({un['live']} live entries)")
    if un.get("removed_unborn"):
        out.append(f"unborn: {un['removed_unborn']} removals of entries neither listed at start nor seen created "
                   "(inserts the probes missed, or entries the start-up listing missed)")
    if j["orphans"]:
        out.append("")
        out.append(f"ORPHANS (last {min(len(j['orphans']), top)} of {j['orphans_total']})")
        for o in j["orphans"][-top:]:
            out.append(
                f"  {o['kind']:<20} {o['proto']} {o['src']}:{o['sport']} -> {o['dst']}:{o['dport']} netns {o['netns']}"
                f" age {seconds(o['age_s'])}"
            )
    return "\n".join(out) + "\n"
