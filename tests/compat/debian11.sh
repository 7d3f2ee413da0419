#!/bin/sh
# Run the host tests on Debian 11's stack (Python 3.9, numpy 1.19, click 7.1, libdeflate 1.7),
# the oldest ctrace supports, in a bullseye chroot built once and cached outside the checkout.
#   tests/compat/debian11.sh [pytest args]
set -eu
cd "$(dirname "$0")/../.."
CACHE=${CTRACE_LAB_CACHE:-/var/cache/ctrace-lab}
PKGS="python3,python3-numpy,python3-click,libdeflate0,python3-prometheus-client,python3-pytest,python3-hypothesis,gcc,libc6-dev,tmux"
KEY=$(printf '%s' "bullseye $PKGS v1" | sha256sum | cut -c1-12)
ROOT="$CACHE/compat/bullseye-$KEY"
if [ ! -e "$ROOT/.complete" ]; then
    mkdir -p "$CACHE/compat"
    tmp="$CACHE/compat/.build-$$"
    rm -rf "$tmp"
    echo "compat: building the Debian 11 chroot (once, about a minute)" >&2
    mmdebstrap --quiet --variant=minbase --include="$PKGS" bullseye "$tmp" \
        "deb http://deb.debian.org/debian bullseye main" >"$CACHE/compat/build.log" 2>&1 \
        || { echo "compat: mmdebstrap failed, see $CACHE/compat/build.log" >&2; rm -rf "$tmp"; exit 3; }
    touch "$tmp/.complete"
    rm -rf "$ROOT"
    mv "$tmp" "$ROOT"
fi
work="$ROOT/work"
rm -rf "$work"
mkdir -p "$work"
# Only tracked and new (not ignored) files: what a clean checkout has.
git ls-files -co --exclude-standard -z | grep -z -E '^(ctrace|bpf|docs|tests/unit)/|^pyproject.toml$' | xargs -0 cp --parents -t "$work"
cat >"$work/run.sh" <<'RUN'
cd /work
python3 -c 'import sys, numpy, click; from ctrace import crc; print("compat: Python", sys.version.split()[0], "numpy", numpy.__version__, "click", click.__version__, "CRC-32 by", crc.implementation())'
exec python3 -m pytest -q -p no:cacheprovider tests/unit "$@"
RUN
# A private mount namespace gives the chroot /proc, /sys and /dev (ptys for tmux) and
# takes them away when it ends.
exec unshare --mount --propagation private /bin/sh -c '
    root=$1; shift
    mount -t proc proc "$root/proc" && mount --rbind /sys "$root/sys" && mount --rbind /dev "$root/dev" || exit 3
    exec chroot "$root" /bin/sh /work/run.sh "$@"
' sh "$ROOT" "$@"
