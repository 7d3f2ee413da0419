"""The top view: a screen of text from a snapshot and a view state. Pure: the same
inputs always give the same lines; keys change the view state, never the model."""

import dataclasses
import datetime
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ctrace.keys import EventFilter, KeySpace, parse_filter
from ctrace.keytable import Ages, RowTable
from ctrace.model import Row, Snapshot
from ctrace.views.units import ring_fill, seconds
from ctrace.grouping import group_rows

GROUPS = ("ip", "prefix", "wide", "netns")
GROUP_TITLES = {"ip": "ADDRESS", "prefix": "PREFIX", "wide": "PREFIX", "netns": "NETNS"}
SORTS = ("live", "new/s", "gone/s", "estab", "orphans", "drops", "age")
WIDE_V4, WIDE_V6 = 16, 48

HELP = """\
ctrace top -- keys
  s / S     next / previous sort column (live, new/s, gone/s, estab, orphans, drops, age)
  g / G     next / previous grouping: address (/32, /128) -> prefix (/24, /64)
            -> wide prefix (/16, /48) -> netns
  f         filter: netns=INODE proto=tcp|udp port=N addr=TEXT (empty clears)
  p, space  pause / resume the display (events are still counted)
  [ / ]     replay: seek back / forward one minute
  n         replay, paused: step one interval
  h, ?      this help (any key returns)
  q         quit
Columns: LIVE entries now; NEW/s and GONE/s since the last frame; ESTAB and T_WAIT
entries in those conntrack states; OTHER the rest; ORPH entries whose connection ended
without conntrack seeing FIN/RST; DROP refused new entries; AGE median entry age."""


@dataclasses.dataclass(frozen=True)
class ViewState:
    group: str = "ip"
    sort: str = "live"
    addr: str = ""  # address substring filter (applied to row labels)
    filter: EventFilter = EventFilter()
    paused: bool = False
    help: bool = False
    prompt: Optional[str] = None  # filter text being typed
    message: str = ""


def _cycle(seq: Sequence[str], cur: str, step: int) -> str:
    return seq[(seq.index(cur) + step) % len(seq)]


def handle_key(state: ViewState, key: str) -> Tuple[ViewState, Optional[str]]:
    """A key press -> (new state, action for the runner: quit, refilter, seek:+60, seek:-60, step)."""
    rep = dataclasses.replace
    if state.prompt is not None:
        if key in ("\n", "\r", "KEY_ENTER"):
            try:
                f, addr = parse_filter(state.prompt)
            except ValueError as exc:
                return rep(state, prompt=None, message=str(exc)), None
            action = "refilter" if f != state.filter else None
            return rep(state, prompt=None, filter=f, addr=addr, message=""), action
        if key == "\x1b":
            return rep(state, prompt=None), None
        if key in ("KEY_BACKSPACE", "\x7f", "\b"):
            return rep(state, prompt=state.prompt[:-1]), None
        if len(key) == 1 and key.isprintable():
            return rep(state, prompt=state.prompt + key), None
        return state, None
    if state.help:
        return rep(state, help=False), None
    if key in ("q", "Q"):
        return state, "quit"
    if key in ("h", "?"):
        return rep(state, help=True), None
    if key in ("s", "S"):
        return rep(state, sort=_cycle(SORTS, state.sort, 1 if key == "s" else -1)), None
    if key in ("g", "G"):
        return rep(state, group=_cycle(GROUPS, state.group, 1 if key == "g" else -1)), None
    if key in ("p", " "):
        return rep(state, paused=not state.paused), None
    if key == "f":
        current = " ".join(x for x in (state.filter.describe(), f"addr={state.addr}" if state.addr else "") if x)
        return rep(state, prompt=current), None
    if key == "]":
        return state, "seek:+60"
    if key == "[":
        return state, "seek:-60"
    if key == "n" and state.paused:
        return state, "step"
    return state, None


def _eta(v: Optional[float]) -> str:
    return "never" if v is None else "FULL" if v <= 0 else seconds(v, 0)


def wide_table(prefixes: RowTable) -> RowTable:
    """Roll /24 (/64) prefix rows up to /16 (/48). Ages are not additive: left out."""
    wide = KeySpace(by=prefixes.by, prefix_v4=WIDE_V4, prefix_v6=WIDE_V6).prefix_words(list(prefixes.words))
    rep, gid = group_rows(wide)
    g = len(rep)

    def total(col: np.ndarray) -> np.ndarray:
        if col.ndim == 2:
            return np.stack([total(col[:, i]) for i in range(col.shape[1])], axis=1) if col.shape[1] else col[:g]
        return np.bincount(gid, weights=col, minlength=g).astype(col.dtype)

    return RowTable(
        by=prefixes.by, words=tuple(w[rep] for w in wide), live=total(prefixes.live), created=total(prefixes.created),
        destroyed=total(prefixes.destroyed), orphans=total(prefixes.orphans), orphans_live=total(prefixes.orphans_live),
        drops=total(prefixes.drops), new_per_s=total(prefixes.new_per_s), gone_per_s=total(prefixes.gone_per_s),
        ages=Ages(g), states=total(prefixes.states), removals=total(prefixes.removals),
        state_names=prefixes.state_names, removal_names=prefixes.removal_names,
    )


def table_for(s: Snapshot, group: str) -> RowTable:
    return {"ip": s.ips, "prefix": s.prefixes, "netns": s.netns}.get(group) or wide_table(s.prefixes)


def rows_for(s: Snapshot, state: ViewState, limit: Optional[int] = None) -> List[Row]:
    """The rows to show: grouped, filtered by address text, sorted; only `limit` are built."""
    where = None
    if state.addr:
        where = lambda t: np.array([state.addr in name for name in t.labels()], dtype=bool)  # noqa: E731
    return table_for(s, state.group).top(limit, state.sort, where)


def header_lines(s: Snapshot, width: int = 80, state: ViewState = ViewState()) -> List[str]:
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
    shown = " ".join(x for x in (state.filter.describe(), f"addr~{state.addr}" if state.addr else "") if x) or "none"
    extra = f"  untracked {s.untracked['keys_evicted']}" if s.untracked.get("keys_evicted") else ""
    ring = f"  ring {ring_fill(s.ring.peak_bytes, s.ring.size_bytes)}" if s.ring else ""
    lines.append(f"probes {probes}{ring}  filter {shown}  by {s.by}  sort {state.sort}{extra}{'  [PAUSED]' if state.paused else ''}"[:width])
    return lines


def table_lines(rows: Sequence[Row], width: int = 80, limit: int = 20, title: str = "ADDRESS") -> List[str]:
    show_ns = width >= 96
    name_w = max(15, min(40, width - 65 - (11 if show_ns else 0)))
    ns_head = f" {'NETNS':>10}" if show_ns else ""
    head = (f"{title:<{name_w}}{ns_head} {'LIVE':>7} {'NEW/s':>7} {'GONE/s':>7} {'ESTAB':>6} {'T_WAIT':>6} {'OTHER':>6}"
            f" {'ORPH':>5} {'DROP':>5} {'AGE':>5}")
    out = [head[:width]]
    for r in rows[:limit]:
        est = r.states.get("ESTABLISHED", 0)
        tw = r.states.get("TIME_WAIT", 0)
        name = r.label if len(r.label) <= name_w else r.label[: name_w - 1] + "~"
        ns = f" {r.netns:>10}" if show_ns else ""
        out.append(
            f"{name:<{name_w}}{ns} {r.live:>7} {r.new_per_s:>7.1f} {r.gone_per_s:>7.1f} {est:>6} {tw:>6} {r.live - est - tw:>6}"
            f" {r.orphans:>5} {r.drops:>5} {seconds(r.median_age_s, 0):>5}"[:width]
        )
    return out


def render_screen(s: Snapshot, state: ViewState = ViewState(), width: int = 80, height: Optional[int] = None) -> List[str]:
    """The whole screen: header, table (as many rows as fit), status line."""
    if state.help:
        return [line[:width] for line in HELP.splitlines()]
    head = header_lines(s, width, state) + [""]
    status = []
    if state.prompt is not None:
        status = [f"filter: {state.prompt}_"[:width]]
    elif state.message:
        status = [state.message[:width]]
    room = (height - len(head) - len(status) - 1) if height else 20
    body = table_lines(rows_for(s, state, max(0, room)), width, max(0, room), GROUP_TITLES[state.group])
    return head + body + status


def render_frame(s: Snapshot, width: int = 80, limit: int = 20, group: str = "ip") -> str:
    """One plain-text frame (non-interactive top, replay to a pipe)."""
    state = ViewState(group=group)
    return "\n".join(header_lines(s, width, state) + [""] + table_lines(rows_for(s, state, limit), width, limit, GROUP_TITLES[group])) + "\n"
