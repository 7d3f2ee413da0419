"""Which firewall rules make the kernel track connections.

Since Linux 4.10 conntrack hooks a network namespace only when something asks for it:
a rule that matches on conntrack state, a NAT table, a CT target, a connection limit,
a flowtable, IPVS with conntrack=1, Open vSwitch or tc `ct` actions. This module reads
saved rulesets (`iptables-save`, `ip6tables-save`, `nft list ruleset`) and lists the
rules that need conntrack, and those that already exempt traffic from it (notrack).
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# iptables matches/targets that need a conntrack entry, with a short reason.
_IPT_MATCHES = {
    "state": "state match",
    "conntrack": "conntrack match",
    "connmark": "connmark match",
    "connlimit": "connection limit",
    "connbytes": "connbytes match",
    "connlabel": "connlabel match",
    "helper": "helper match",
    "cluster": "cluster match",
}
_IPT_TARGETS = {
    "MASQUERADE": "NAT",
    "SNAT": "NAT",
    "DNAT": "NAT",
    "REDIRECT": "NAT",
    "NETMAP": "NAT",
    "CONNMARK": "CONNMARK target",
    "CONNSECMARK": "CONNSECMARK target",
    "SYNPROXY": "SYNPROXY target",
}

_NFT_CT = re.compile(
    r"\bct\s+(state|status|mark|zone|helper|label|direction|expiration|l3proto|protocol|"
    r"original|reply|bytes|packets|avgpkt|id|count|event|expectation|timeout|saddr|daddr|proto-src|proto-dst)\b"
)
_NFT_NAT = re.compile(r"(^|[\s;])(snat|dnat|masquerade|redirect)(\s|;|$)")
_NFT_FLOW = re.compile(r"\bflow\s+(add|offload)\s+@")
_NFT_SYNPROXY = re.compile(r"(^|\s)synproxy(\s|$)")
_NFT_NOTRACK = re.compile(r"(^|\s)notrack(\s|;|$)")
_NFT_XT = re.compile(r'\bxt\s+(match|target)\s+"?([A-Za-z]+)"?|#\s*xt_([A-Za-z]+)')
_NFT_NAT_CHAIN = re.compile(r"\btype\s+nat\s+hook\b")


@dataclass
class RuleUse:
    source: str  # ruleset file inside the tree
    line: int  # 1-based line number in that file
    where: str  # "nat/POSTROUTING", "inet filter/input"
    reason: str  # "conntrack match", "NAT", ...
    text: str  # the rule, trimmed

    def to_json(self) -> Dict[str, Any]:
        return {"source": self.source, "line": self.line, "where": self.where, "reason": self.reason, "rule": self.text}


@dataclass
class RulesetScan:
    sources: List[str] = field(default_factory=list)  # ruleset files that were read
    uses: List[RuleUse] = field(default_factory=list)  # rules that need conntrack
    notrack: List[RuleUse] = field(default_factory=list)  # rules exempting traffic
    rules: int = 0  # rules seen in all sources

    @property
    def needs_conntrack(self) -> bool:
        return bool(self.uses)


def _trim(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def scan_iptables_save(text: str, source: str, scan: RulesetScan) -> None:
    scan.sources.append(source)
    table = "?"
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:].strip()
            if table == "nat":
                scan.uses.append(RuleUse(source, n, "nat", "NAT table present", line))
            continue
        if not line.startswith("-A "):
            continue
        scan.rules += 1
        words = line.split()
        chain = words[1] if len(words) > 1 else "?"
        where = f"{table}/{chain}"
        reason = None
        for k, w in enumerate(words):
            nxt = words[k + 1] if k + 1 < len(words) else ""
            if w in ("-m", "--match") and nxt in _IPT_MATCHES:
                reason = _IPT_MATCHES[nxt]
            elif w in ("-j", "--jump") and nxt in _IPT_TARGETS:
                reason = _IPT_TARGETS[nxt]
            elif w in ("-j", "--jump") and nxt == "NOTRACK":
                scan.notrack.append(RuleUse(source, n, where, "NOTRACK", _trim(line)))
            elif w in ("-j", "--jump") and nxt == "CT":
                if "--notrack" in words:
                    scan.notrack.append(RuleUse(source, n, where, "CT --notrack", _trim(line)))
                else:
                    reason = "CT target"
            if reason:
                break
        if reason is None and table == "nat":
            reason = "NAT"
        if reason:
            scan.uses.append(RuleUse(source, n, where, reason, _trim(line)))


def scan_nft(text: str, source: str, scan: RulesetScan) -> None:
    scan.sources.append(source)
    table = "?"
    chain = "?"
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"table\s+(\S+)\s+(\S+)\s*\{", line)
        if m:
            table, chain = f"{m.group(1)} {m.group(2)}", "?"
            continue
        m = re.match(r"chain\s+(\S+)\s*\{", line)
        if m:
            chain = m.group(1)
            continue
        if line.startswith(("}", "set ", "map ", "flowtable ", "elements", "type ", "policy ")) and not _NFT_NAT_CHAIN.search(
            line
        ):
            continue
        where = f"{table}/{chain}"
        if _NFT_NAT_CHAIN.search(line):
            scan.uses.append(RuleUse(source, n, where, "NAT chain", _trim(line)))
            continue
        scan.rules += 1
        if _NFT_NOTRACK.search(line):
            scan.notrack.append(RuleUse(source, n, where, "notrack", _trim(line)))
            continue
        reason: Optional[str] = None
        m_ct = _NFT_CT.search(line)
        if m_ct:
            reason = f"ct {m_ct.group(1)}"
        elif _NFT_NAT.search(line):
            reason = "NAT"
        elif _NFT_FLOW.search(line):
            reason = "flowtable offload"
        elif _NFT_SYNPROXY.search(line):
            reason = "synproxy"
        else:
            m_xt = _NFT_XT.search(line)
            if m_xt:
                name = m_xt.group(2) or m_xt.group(3) or ""
                if name in _IPT_MATCHES:
                    reason = _IPT_MATCHES[name]
                elif name.upper() in _IPT_TARGETS:
                    reason = _IPT_TARGETS[name.upper()]
        if reason:
            scan.uses.append(RuleUse(source, n, where, reason, _trim(line)))
