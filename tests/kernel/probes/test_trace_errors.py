"""Why tracing cannot start, on a real kernel (lab guest only): `ctrace record`,
`ctrace probes --attach` and `ctrace top` each print one line on stderr and exit with
the documented status (ctrace/status.py, docs/CLI.md), without a traceback, and
before any bcc compile (a compile costs 50-140 s under emulation; these take seconds).

- not root: `setpriv` to nobody; root without capabilities: `setpriv --bounding-set=-all`
  (uid 0, empty effective set, as in a container without CAP_BPF/CAP_PERFMON).
- no kernel headers: a private mount namespace (`unshare -m`) with an empty tmpfs over
  the directories /lib/modules/$(uname -r)/build and source point to.
- nf_conntrack not loaded: the same, over /sys/module and /proc/sys/net/netfilter, the
  two places ctrace looks. The module itself is not unloaded: this test session's other
  tests keep kprobes in its text (the probes fixture, the recorders) and ct rules in
  their namespaces; an unload mid-session would disarm those kprobes silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import List, Tuple

import pytest

from ctrace.status import ExitStatus

TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NO_COMPILE_S = 40  # far below one bcc compile under emulation (50-140 s)

COMMANDS = {
    "record": ["record", "-o", "{out}"],
    "probes": ["probes", "--attach"],
    "top": ["top", "--once", "--plain"],
}

# Mounts an empty tmpfs over each path in $CTRACE_TEST_HIDE, then runs the command.
HIDE_SCRIPT = 'set -e; for d in $CTRACE_TEST_HIDE; do mount -t tmpfs ctrace-test-empty "$d"; done; exec "$@"'


def hide(*paths: str) -> Tuple[List[str], str]:
    """A wrapper running the command in a private mount namespace with `paths` emptied,
    and the value of CTRACE_TEST_HIDE it needs."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", HIDE_SCRIPT, "sh"], " ".join(paths)


def run_ctrace(cmd: str, wrap: List[str], env_extra: dict, out: str) -> Tuple[int, str, str, float]:
    argv = wrap + [sys.executable, "-m", "ctrace"] + [a.format(out=out) for a in COMMANDS[cmd]]
    env = dict(os.environ, PYTHONPATH=TREE, **env_extra)
    env.pop("BCC_KERNEL_SOURCE", None)
    t0 = time.monotonic()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TREE,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def check(cmd: str, wrap: List[str], env_extra: dict, status: ExitStatus, words: List[str]) -> str:
    out = f"/tmp/ctrace-errtest-{os.getpid()}-{cmd}.ctr"
    rc, stdout, stderr, took = run_ctrace(cmd, wrap, env_extra, out)
    lines = stderr.splitlines()
    what = f"{cmd} under {' '.join(wrap)}: rc={rc} took {took:.1f}s stdout={stdout!r} stderr={stderr!r}"
    assert rc == int(status), what
    assert len(lines) == 1 and lines[0].startswith("ctrace: "), what
    assert "Traceback" not in stderr, what
    assert stdout == "", what
    for w in words:
        assert w in lines[0], what
    assert took < NO_COMPILE_S, what
    assert not os.path.lexists(out), what
    return lines[0]


def release() -> str:
    return os.uname().release


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_not_root(cmd: str) -> None:
    wrap = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    check(cmd, wrap, {}, ExitStatus.NO_PRIVILEGE, ["needs root", "CAP_BPF+CAP_PERFMON"])


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_root_without_capabilities(cmd: str) -> None:
    wrap = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    check(cmd, wrap, {}, ExitStatus.NO_PRIVILEGE, ["CAP_BPF+CAP_PERFMON", "root process"])


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_no_kernel_headers(cmd: str) -> None:
    base = f"/lib/modules/{release()}"
    dirs = [os.path.realpath(os.path.join(base, d)) for d in ("build", "source")
            if os.path.isdir(os.path.join(base, d))]
    assert dirs, f"{base} has neither build nor source: the lab image lacks its headers"
    assert not os.path.exists("/sys/kernel/kheaders.tar.xz"), "kheaders loaded: headers cannot be hidden"
    wrap, hidden = hide(*dirs)
    line = check(cmd, wrap, {"CTRACE_TEST_HIDE": hidden}, ExitStatus.NO_KERNEL_HEADERS,
                 [f"linux-headers-{release()}"])
    assert line == f"ctrace: no kernel headers for {release()}: install linux-headers-{release()}"


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_conntrack_not_loaded(cmd: str) -> None:
    assert os.path.isdir("/sys/module/nf_conntrack"), "the lab guest loads nf_conntrack at boot"
    wrap, hidden = hide("/sys/module", "/proc/sys/net/netfilter")
    check(cmd, wrap, {"CTRACE_TEST_HIDE": hidden}, ExitStatus.NO_CONNTRACK, ["nf_conntrack is not loaded"])
