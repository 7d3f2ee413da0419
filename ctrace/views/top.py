"""The top view: one frame of text from a snapshot. Pure: same snapshot, same frame."""

import datetime
from typing import List, Optional, Sequence

from ctrace.model import Row, Snapshot

GROUPS = ("ip", "prefix", "netns")


def _age(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if v >= size:
            return f"{v / size:.0f}{unit}"
    return f"{v:.0f}s"


def _eta(v: Optional[float]) -> str:
    return "never" if v is None else "FULL" if v <= 0 else _age(v)


def header_lines(s: Snapshot, width: int = 80, netns_filter: Optional[int] = None) -> List[str]:
    ins, exp = s.rates(window=True)
    clock = datetime.datetime.fromtimestamp((s.now_boot_ns + s.info.boot_to_wall_ns) / 1e9, tz=datetime.timezone.utc)
    fill = f"{100 * s.count / s.table_max:5.1f}%" if s.table_max else "  ?  "
    lines = []
    if s.lost_total:
        causes = ", ".join(f"{k} {v}" for k, v in s.lost.items())
        lines.append(f"!! EVENTS LOST: {s.lost_total} ({causes}) -- counts below are incomplete !!"[:width])
    if s.info.synthetic:
        lines.append(f"SYNTHETIC DATA: scenario {s.info.extra.get('scenario', '?')}"[:width])
    lines.append(
        f"ctrace {s.info.hostname} {clock:%H:%M:%S}Z  entries {s.count}/{s.table_max or '?'} {fill}"
        f"  ttf {_eta(s.time_to_full_s(window=True))}"[:width]
    )
    drops = sum(s.drops_by_reason.values())
    lines.append(f"new {ins:8.1f}/s  gone {exp:8.1f}/s  net {ins - exp:+8.1f}/s  drops {drops}  orphans {sum(s.orphans_by_kind.values())}"[:width])
    probes = ",".join(sorted({p.get("method", "?") for p in s.info.probes})) or "-"
    ns = "all" if netns_filter is None else str(netns_filter)
    lines.append(f"probes {probes}  netns {ns}  by {s.by}"[:width])
    return lines


def table_lines(rows: Sequence[Row], width: int = 80, limit: int = 20) -> List[str]:
    name_w = max(15, min(40, width - 65))
    head = f"{'ADDRESS':<{name_w}} {'LIVE':>7} {'NEW/s':>7} {'GONE/s':>7} {'ESTAB':>6} {'T_WAIT':>6} {'OTHER':>6} {'ORPH':>5} {'DROP':>5} {'AGE':>5}"
    out = [head[:width]]
    for r in rows[:limit]:
        est = r.states.get("ESTABLISHED", 0)
        tw = r.states.get("TIME_WAIT", 0)
        label = r.label if len(r.label) <= name_w else r.label[: name_w - 1] + "~"
        out.append(
            f"{label:<{name_w}} {r.live:>7} {r.new_per_s:>7.1f} {r.gone_per_s:>7.1f} {est:>6} {tw:>6} {r.live - est - tw:>6}"
            f" {r.orphans:>5} {r.drops:>5} {_age(r.median_age_s):>5}"[:width]
        )
    return out


def render_frame(s: Snapshot, width: int = 80, limit: int = 20, group: str = "ip") -> str:
    rows = {"ip": s.ips, "prefix": s.prefixes, "netns": s.netns}[group]
    return "\n".join(header_lines(s, width) + [""] + table_lines(rows, width, limit)) + "\n"
