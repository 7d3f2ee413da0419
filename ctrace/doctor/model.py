"""What `ctrace doctor` produces: findings with evidence and a recommendation, the
inputs it could not read, and the report that carries both. Pure data, no I/O."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

SCHEMA = "ctrace.doctor/1"
# Bumped whenever a threshold or a severity rule changes: two reports with the same
# rules_version judge the same inputs the same way.
RULES_VERSION = 1


class Severity(str, Enum):
    INFO = "info"  # worth knowing; does not change the exit status
    WARNING = "warning"  # something is wrong or wastes the table: act on it
    CRITICAL = "critical"  # packets are being dropped, or will be soon

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


@dataclass
class Recommendation:
    text: str  # what to do, in one or two sentences
    commands: List[str] = field(default_factory=list)  # shell lines to apply it
    tradeoff: str = ""  # what it costs

    def to_json(self) -> Dict[str, Any]:
        return {"text": self.text, "commands": list(self.commands), "tradeoff": self.tradeoff}


@dataclass
class Finding:
    id: str  # stable identifier, e.g. "table-near-full"
    severity: Severity
    title: str  # one line with the key numbers
    detail: str  # why it matters
    evidence: Dict[str, Any]  # the numbers behind it (JSON-safe values)
    recommendation: Recommendation

    def to_json(self) -> Dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity.value,
            "title": self.title,
            "detail": self.detail,
            "evidence": self.evidence,
            "recommendation": self.recommendation.to_json(),
        }


@dataclass
class Missing:
    input: str  # path inside the root tree, e.g. "proc/net/nf_conntrack"
    reason: str  # why it could not be read
    needed_for: List[str] = field(default_factory=list)  # check names it blocked or weakened

    def to_json(self) -> Dict[str, Any]:
        return {"input": self.input, "reason": self.reason, "needed_for": list(self.needed_for)}


@dataclass
class Check:
    name: str  # e.g. "table-size"
    ran: bool
    reason: str = ""  # why it did not run, or what limited it

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "ran": self.ran, "reason": self.reason}


@dataclass
class Report:
    source: Dict[str, Any]  # kind, path, hostname, kernel, collected_at
    findings: List[Finding]
    checks: List[Check]
    missing: List[Missing]
    notes: List[str]  # damaged lines, assumptions
    tables: Dict[str, Any]  # supporting tables: per-IP, prefixes, timeouts, stats, rules

    @property
    def worst(self) -> Optional[Severity]:
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=lambda s: s.rank)

    @property
    def status(self) -> str:
        """"critical", "warning", "incomplete" or "ok" (see docs/DOCTOR.md, Exit status)."""
        worst = self.worst
        if worst is Severity.CRITICAL:
            return "critical"
        if worst is Severity.WARNING:
            return "warning"
        if not any(c.ran for c in self.checks if c.name == "table-size"):
            return "incomplete"
        return "ok"
