#!/bin/sh
# Runs inside a lab guest as root, started by /sbin/ctrace-lab-init (see
# provision.sh).  /mnt/tree is the working tree (read-only 9p), /mnt/out a
# per-kernel result directory on the host.  Writes there: kernel-release,
# bcc-version, python-version, junit.xml, pytest-rc, dmesg.txt.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
OUT=/mnt/out
TREE=/mnt/tree

# devtmpfs has no /dev/fd, /dev/stdin... (udev makes them); nft -f - needs them
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do
    [ -e /dev/${i#*:} ] || ln -s /proc/self/fd/${i%%:*} /dev/${i#*:}
done
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts 2>/dev/null

echo started > $OUT/started
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

# pytest arguments, one per line, written by lab.py
set --
while IFS= read -r arg; do
    set -- "$@" "$arg"
done < $OUT/pytest-args
[ $# -gt 0 ] || set -- tests/kernel

echo "ctrace-lab: $(uname -r): python3 -m pytest $*"
python3 -m pytest -p no:cacheprovider -rfEs --junitxml=$OUT/junit.xml "$@"
echo $? > $OUT/pytest-rc
dmesg > $OUT/dmesg.txt
sync
