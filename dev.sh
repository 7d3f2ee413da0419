#!/bin/sh
# ctrace's one entry point for people and CI on a Debian machine (run as root):
#   ./dev.sh demo       set up and run the main job
#   ./dev.sh test       set up and run every test: unit tests, then the VM kernel matrix
#   ./dev.sh unit       only the host tests (no root needed once set up)
#   ./dev.sh compat     the host tests on Debian 11's Python 3.9 stack, in a cached chroot
#   ./dev.sh lab ARGS   the VM lab directly, e.g. ./dev.sh lab run --suite bookworm
set -eu
cd "$(dirname "$0")"
PY=/usr/bin/python3
RUNTIME_PKGS="python3 python3-click python3-numpy libdeflate0"
TEST_PKGS="$RUNTIME_PKGS python3-prometheus-client prometheus python3-pytest python3-hypothesis gcc libc6-dev tmux mmdebstrap qemu-system-x86 qemu-utils e2fsprogs vagrant"

apt_install() {
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)" >&2
        exit 1
    fi
    echo "dev.sh: installing$missing" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
}

demo() {
    apt_install $RUNTIME_PKGS
    if $PY -m ctrace probes >/dev/null 2>&1; then
        apt_install python3-bpfcc "linux-headers-$(uname -r)"
        echo "== ctrace demo: tracing this kernel live; q quits (h lists the keys)"
        if [ -t 1 ]; then exec $PY -m ctrace top; else exec $PY -m ctrace top 2 5 --plain; fi
    fi
    # Live tracing is impossible here: replay the real recording bundled with ctrace.
    rec=ctrace/data/incident-6.1.ctr
    kernel=$($PY -c 'import sys; from ctrace.recording import read; print(read(sys.argv[1]).info.kernel)' "$rec")
    why=$($PY -m ctrace probes --json 2>&1 | $PY -c '
import json, sys
text = sys.stdin.read()
try:
    plan = json.loads(text)
    why = next(p["why"].rsplit("; ", 1)[-1] for p in plan["probes"] if p["method"] == "absent")
except Exception:
    why = (text.strip().splitlines() or ["ctrace probes failed"])[-1]
print(why)')
    echo "== ctrace demo: this kernel cannot be traced live: $why."
    echo "== Replaying instead a REAL recording that 'ctrace record' made on Linux $kernel (Debian 12)"
    echo "== in ctrace's VM lab during a reproduced incident: a web server's clients in 198.51.100.0/24"
    echo "== lose their FIN/RST (orphans), 203.0.113.0/24 floods it, and a 200-entry table fills and drops."
    echo "== Same model and views as live; how it was made: ctrace/data/README.md."
    if [ -t 1 ]; then
        echo "== Watch the table fill (18 s at double speed); q quits, then the report follows."
        sleep 3
        $PY -m ctrace replay --speed 2 --group prefix "$rec"
    else
        $PY -m ctrace replay --fast --interval 4 --rows 6 --group prefix "$rec"
    fi
    $PY -m ctrace report --top 10 "$rec"
}

unit() {
    $PY -m pytest tests/unit tests/vm -q "$@"
}

case "${1:-}" in
    demo) demo ;;
    unit) shift; apt_install $TEST_PKGS; unit "$@" ;;
    compat) shift; apt_install $TEST_PKGS; tests/compat/debian11.sh "$@" ;;
    test)
        apt_install $TEST_PKGS
        unit
        tests/compat/debian11.sh
        $PY tests/vm/lab.py run
        ;;
    lab) shift; apt_install $TEST_PKGS; $PY tests/vm/lab.py "$@" ;;
    *) echo "usage: ./dev.sh demo|test|unit|compat|lab [args]" >&2; exit 2 ;;
esac
