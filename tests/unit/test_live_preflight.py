"""Preflight checks of the live source (no bcc, no kernel): who may trace."""

import pytest

from ctrace.sources import live
from ctrace.status import CtraceError, ExitStatus

SYS_ADMIN, PERFMON, BPF = 1 << 21, 1 << 38, 1 << 39


@pytest.mark.parametrize("euid,caps,ok", [
    (0, (1 << 41) - 1, True),        # root with the full set
    (0, 0, False),                   # root without capabilities (setpriv --bounding-set=-all)
    (0, PERFMON, False),             # root with only one of the two
    (1000, BPF | PERFMON, True),     # an unprivileged user given CAP_BPF+CAP_PERFMON
    (1000, SYS_ADMIN, True),
    (1000, BPF, False),
    (1000, 0, False),
    (0, None, True),                 # no /proc: the uid decides
    (1000, None, False),
])
def test_check_privileges(monkeypatch, euid, caps, ok):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(live.os, "geteuid", lambda: euid)
    monkeypatch.setattr(live, "_cap_eff", lambda: caps)
    if ok:
        live.check_privileges()
        return
    with pytest.raises(CtraceError) as e:
        live.check_privileges()
    assert e.value.status == ExitStatus.NO_PRIVILEGE
    assert "\n" not in str(e.value) and "CAP_BPF+CAP_PERFMON" in str(e.value)
