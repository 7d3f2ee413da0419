"""Report -> text for a person in the middle of an incident, or JSON (ctrace.doctor/1)."""

import json
import textwrap
from typing import Any, Dict, List, Optional

from ctrace import __version__
from ctrace.doctor.model import RULES_VERSION, SCHEMA, Finding, Report

WIDTH = 80


def to_json(report: Report, exit_code: int) -> Dict[str, Any]:
    return {
        "schema": SCHEMA,
        "ctrace_version": __version__,
        "rules_version": RULES_VERSION,
        "source": report.source,
        "status": report.status,
        "exit_code": exit_code,
        "findings": [f.to_json() for f in report.findings],
        "missing": [m.to_json() for m in report.missing],
        "checks": [c.to_json() for c in report.checks],
        "notes": list(report.notes),
        "tables": report.tables,
    }


def render_json(report: Report, exit_code: int) -> str:
    return json.dumps(to_json(report, exit_code), indent=2, sort_keys=False) + "\n"


def _wrap(text: str, indent: str, first: Optional[str] = None) -> List[str]:
    first = indent if first is None else first
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False) or [first.rstrip()]


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str)) or v is None


def _evidence_lines(ev: Dict[str, Any]) -> List[str]:
    flat = [f"{k}={v}" for k, v in ev.items() if _scalar(v) and v is not None and k != "basis"]
    lines = _wrap(", ".join(flat), "            ", "  evidence: ") if flat else []
    for k, v in ev.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"  {k}:")
            for row in v[:10]:
                cells = []
                for rk, rv in row.items():
                    if isinstance(rv, list):
                        rv = "[" + "; ".join(
                            " ".join(f"{a}={b}" for a, b in x.items()) if isinstance(x, dict) else str(x) for x in rv[:5]
                        ) + "]"
                    cells.append(f"{rk}={rv}")
                lines += _wrap(" ".join(cells), "      ", "    - ")
        elif isinstance(v, list) and v:
            lines += _wrap(", ".join(str(x) for x in v[:32]), "      ", f"  {k}: ")
        elif isinstance(v, dict) and v:
            lines += _wrap(", ".join(f"{a}={b}" for a, b in v.items()), "      ", f"  {k}: ")
    return lines


def _finding(f: Finding) -> List[str]:
    out = _wrap(f.title, "    ", f"{f.severity.value.upper():8} {f.id}: ")
    out += _wrap(f.detail, "  ")
    out += _evidence_lines(f.evidence)
    r = f.recommendation
    out += _wrap(r.text, "        ", "  do:   ")
    for cmd in r.commands:
        out.append(f"        $ {cmd}")
    if r.tradeoff:
        out += _wrap(r.tradeoff, "        ", "  cost: ")
    return out


def _table(rows: List[List[str]], header: List[str]) -> List[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  " + "  ".join(f"{{:{'>' if i else '<'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header)] + [fmt.format(*[str(c) for c in r]) for r in rows]


def _states(d: Dict[str, int], n: int = 4) -> str:
    return " ".join(f"{k}={v}" for k, v in list(d.items())[:n]) or "-"


def render_text(report: Report, exit_code: int) -> str:
    src = report.source
    out: List[str] = []
    where = {"live": "this machine", "directory": f"tree {src.get('path')}", "bundle": f"bundle {src.get('path')}"}
    head = f"ctrace doctor: {where.get(src.get('kind', ''), src.get('path'))}"
    extras = [str(src[k]) for k in ("hostname", "kernel", "collected_at") if src.get(k)]
    if extras:
        head += " (" + ", ".join(extras) + ")"
    out.append(head)  # not wrapped: it holds a path
    t = report.tables.get("table")
    if t:
        line = f"conntrack: {t['count']:,} of {t['max']:,} entries"
        if t.get("fill_percent") is not None:
            line += f" ({t['fill_percent']}%)"
        if t.get("buckets"):
            line += f", {t['buckets']:,} hash buckets"
        if t.get("entries_read") is not None:
            line += f"; {t['entries_read']:,} entries read ({t['local_entries']:,} local, {t['forwarded_entries']:,} forwarded)"
        out += _wrap(line, "  ")
    counts = {s: sum(1 for f in report.findings if f.severity.value == s) for s in ("critical", "warning", "info")}
    out.append(
        f"status: {report.status} (exit {exit_code}): {counts['critical']} critical, "
        f"{counts['warning']} warning, {counts['info']} info"
    )
    if report.findings:
        for f in report.findings:
            out.append("")
            out += _finding(f)
    else:
        out.append("")
        out.append("No findings." if report.status == "ok" else "No findings, but little could be judged (see below).")

    per_ip = report.tables.get("per_ip")
    if per_ip:
        out += ["", "Per local address: conntrack TCP entries vs sockets (conntrack -L | awk, ss)"]
        rows = [[r["ip"], _states(r["conntrack"]), _states(r["sockets"]), r["orphaned"]] for r in per_ip]
        out += _table(rows, ["address", "conntrack", "sockets", "orphaned"])
    sources = report.tables.get("sources")
    if sources:
        out += ["", "Top sources by entries (original direction, local addresses excluded)"]
        out += _table([[r["ip"], r["entries"], _states(r.get("states", {}), 3)] for r in sources],
                      ["source", "entries", "states"])
    prefixes = report.tables.get("prefixes")
    if prefixes:
        out += ["", "Top source prefixes"]
        out += _table([[p["prefix"], p["entries"], p["addresses"], _states(p.get("states", {}), 3)] for p in prefixes[:5]],
                      ["prefix", "entries", "addresses", "states"])
    idle = report.tables.get("established_idle")
    if idle and idle.get("sample"):
        out.append("")
        out += _wrap(f"ESTABLISHED idle ages (timeout - remaining), {idle['sample']:,} entries: "
                     f"p50 {idle['p50_s']} s, p90 {idle['p90_s']} s, p99 {idle['p99_s']} s, max {idle['max_s']} s", "  ", "")
    timeouts = report.tables.get("timeouts")
    if timeouts:
        out += ["", "Timeouts (s)"]
        cells = [f"{r['name'].replace('nf_conntrack_', '')}={r['value']}" + ("*" if r["value"] != r["default"] else "")
                 for r in timeouts]
        out += _wrap("  ".join(cells), "  ")
        if any(r["value"] != r["default"] for r in timeouts):
            out.append("  (* differs from the kernel default)")
    stats = report.tables.get("stats")
    if stats:
        tot = stats["totals"]
        keys = [k for k in ("insert_failed", "drop", "early_drop", "clash_resolve", "chaintoolong", "search_restart", "invalid") if k in tot]
        out += ["", f"Statistics since boot, {stats['cpus']} CPUs ({stats['source']})"]
        out += _wrap("  ".join(f"{k}={tot[k]:,}" for k in keys), "  ")
    rules = report.tables.get("rules")
    if rules:
        out.append("")
        out += _wrap(f"Rules that need conntrack: {rules['needs_conntrack_total']} of {rules['rules']} "
                     f"({', '.join(rules['sources'])})", "  ", "")
        for u in rules["needs_conntrack"][:5]:
            out += _wrap(f"{u['source']}:{u['line']} [{u['reason']}] {u['rule']}", "      ", "    ")
        if rules["notrack"]:
            out.append(f"  already exempted (notrack): {len(rules['notrack'])} rules")
    if report.missing:
        out += ["", "Could not read:"]
        for m in report.missing:
            suffix = f" -> affects {', '.join(m.needed_for)}" if m.needed_for else ""
            out += _wrap(f"{m.input}: {m.reason}{suffix}", "      ", "  - ")
    skipped = [c for c in report.checks if not c.ran]
    if skipped:
        out.append("")
        out += _wrap("Not checked: " + "; ".join(f"{c.name} ({c.reason})" for c in skipped), "  ", "")
    if report.notes:
        out += ["", "Notes:"]
        for n in report.notes:
            out += _wrap(n, "    ", "  - ")
    return "\n".join(out) + "\n"
