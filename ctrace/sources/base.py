"""What every source provides: facts about where the events come from, the entries
that existed when it began, and then batches of events in time order."""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

DEFAULT_RING_PAGES = 4096  # the live source's BPF ring buffer: 16 MiB, ~115k events of headroom per poll


@dataclass(frozen=True)
class SourceInfo:
    """Everything a recording header carries about its source."""

    hostname: str
    kernel: str
    boot_to_wall_ns: int  # wall-clock ns = ts_boot_ns + boot_to_wall_ns
    start_boot_ns: int  # when tracing began, CLOCK_BOOTTIME
    sysctls: Dict[str, int] = field(default_factory=dict)  # net.netfilter.nf_conntrack_* by short name
    probes: List[Dict[str, str]] = field(default_factory=list)  # {function, method, why}
    synthetic: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. synthetic ground truth, scenario name

    def to_json(self) -> Dict[str, Any]:
        return {
            "hostname": self.hostname,
            "kernel": self.kernel,
            "boot_to_wall_ns": self.boot_to_wall_ns,
            "start_boot_ns": self.start_boot_ns,
            "sysctls": dict(self.sysctls),
            "probes": [dict(p) for p in self.probes],
            "synthetic": self.synthetic,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SourceInfo":
        return cls(
            hostname=str(d.get("hostname", "")),
            kernel=str(d.get("kernel", "")),
            boot_to_wall_ns=int(d.get("boot_to_wall_ns", 0)),
            start_boot_ns=int(d.get("start_boot_ns", 0)),
            sysctls={str(k): int(v) for k, v in dict(d.get("sysctls", {})).items()},
            probes=[{str(k): str(v) for k, v in dict(p).items()} for p in d.get("probes", [])],
            synthetic=bool(d.get("synthetic", False)),
            extra=dict(d.get("extra", {})),
        )


class Source:
    """Base class. `existing()` is the initial snapshot (Kind.EXISTING records);
    `batches()` yields arrays of abi.EVENT_DTYPE sorted by ts_boot_ns, LOST and
    COUNTER records included in-band, until the source ends or `stop()`."""

    info: SourceInfo

    def existing(self) -> np.ndarray:
        raise NotImplementedError

    def batches(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask batches() to end after the current batch (safe from a signal handler)."""

    def close(self) -> None:
        """Release kernel resources. Idempotent."""

    def end_boot_ns(self) -> Optional[int]:
        """Where the stream ended (recordings know it; live sources: None)."""
        return None
