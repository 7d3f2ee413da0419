#!/bin/sh
# Runs tests/kernel inside a lab guest as root.  Started by
# /sbin/ctrace-lab-init in the qemu images (see provision.sh), or by
# vagrant/run-kernel-tests.sh.
#
# CTRACE_LAB_TREE (default /mnt/tree, read-only 9p) is the working tree,
# CTRACE_LAB_OUT (default /mnt/out, a per-kernel directory on the host) gets
# started, kernel-release, bcc-version, python-version, junit.xml,
# pytest-rc, dmesg.txt (and whatever tests write, e.g. smoke.json).
# Optional $OUT/pytest-args: pytest arguments, one per line.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
OUT=${CTRACE_LAB_OUT:-/mnt/out}
TREE=${CTRACE_LAB_TREE:-/mnt/tree}

echo started > $OUT/started
# devtmpfs has no /dev/fd, /dev/stdin... (udev makes them); nft -f - needs them
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do
    [ -e /dev/${i#*:} ] || ln -s /proc/self/fd/${i%%:*} /dev/${i#*:}
done
for d in shm:tmpfs pts:devpts; do
    mkdir -p /dev/${d%%:*}
    grep -q " /dev/${d%%:*} " /proc/mounts || mount -t ${d#*:} ${d#*:} /dev/${d%%:*}
done

uname -r > $OUT/kernel-release
dpkg-query -W -f='${Version}\n' python3-bpfcc > $OUT/bcc-version 2>/dev/null
python3 -c 'import platform; print(platform.python_version())' > $OUT/python-version

for m in nf_conntrack nf_conntrack_netlink nf_tables nft_ct veth; do
    modprobe $m || echo "ctrace-lab: modprobe $m failed"
done

export CTRACE_LAB_GUEST=1
export CTRACE_LAB_SUITE="$(cat $OUT/suite 2>/dev/null)"
export CTRACE_LAB_OUT=$OUT
export PYTHONPATH=$TREE
export PYTHONDONTWRITEBYTECODE=1
export PYTHONUNBUFFERED=1
cd $TREE || exit 1

set --
if [ -f $OUT/pytest-args ]; then
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < $OUT/pytest-args
fi
[ $# -gt 0 ] || set -- tests/kernel

echo "ctrace-lab: $(uname -r): python3 -m pytest $*"
python3 -m pytest -p no:cacheprovider -rfEs --junitxml=$OUT/junit.xml "$@"
rc=$?
echo $rc > $OUT/pytest-rc
dmesg > $OUT/dmesg.txt
sync
# The qemu init powers off whatever happens and lab.py reads pytest-rc;
# under Vagrant the exit status is the verdict.
[ -z "${CTRACE_LAB_EXIT_RC:-}" ] || exit $rc
exit 0
