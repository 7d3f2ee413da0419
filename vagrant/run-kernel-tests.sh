#!/bin/sh
# Runs tests/kernel inside a Vagrant guest exactly as the qemu lab does:
# tests/vm/guest-run.sh with the synced tree; fails when a test fails.
# Results (junit.xml, dmesg.txt, smoke.json) land in /var/tmp/ctrace-lab.
set -eu
export CTRACE_LAB_TREE=/vagrant
export CTRACE_LAB_OUT=/var/tmp/ctrace-lab
export CTRACE_LAB_EXIT_RC=1
rm -rf "$CTRACE_LAB_OUT"
mkdir -p "$CTRACE_LAB_OUT"
echo "${1:-vagrant}" > "$CTRACE_LAB_OUT/suite"
exec sh /vagrant/tests/vm/guest-run.sh
