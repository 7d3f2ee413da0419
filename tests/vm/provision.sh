#!/bin/sh
# Provision a ctrace lab guest.  Shared by the qemu image builder
# (tests/vm/lab.py runs it inside the mmdebstrap chroot) and by
# vagrant/Vagrantfile (runs it inside the booted box).
#
#   provision.sh image   [PACKAGES]   Debian suite kernel + headers, lab init
#   provision.sh vagrant [PACKAGES]   headers for the running kernel
#
# PACKAGES defaults to packages.txt beside this script.
set -eu

mode=${1:?usage: provision.sh image|vagrant [PACKAGES]}
list=${2:-$(dirname "$0")/packages.txt}
export DEBIAN_FRONTEND=noninteractive

case $mode in
image)
    kernel_pkgs="linux-image-amd64 linux-headers-amd64" ;;
vagrant)
    apt-get update -q
    kernel_pkgs="linux-headers-$(uname -r)" ;;
*)
    echo "provision.sh: unknown mode '$mode' (image|vagrant)" >&2; exit 2 ;;
esac

has_candidate() {
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'
}

pkgs=$kernel_pkgs
optional=""
for p in $(sed -e 's/#.*//' "$list"); do
    case $p in
    *\?) optional="$optional ${p%\?}" ;;
    *) pkgs="$pkgs $p" ;;
    esac
done
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $pkgs
# Optional packages one by one: a missing or unfetchable one (the archive
# is not always consistent) must not fail the guest.
for p in $optional; do
    if has_candidate "$p" && apt-get install -y -q --no-install-recommends "$p"; then
        pkgs="$pkgs $p"
    else
        echo "provision.sh: optional package $p not installed"
    fi
done

mkdir -p /etc/ctrace-lab
echo "$pkgs" | tr ' ' '\n' | sed '/^$/d' > /etc/ctrace-lab/packages

if [ "$mode" = image ]; then
    echo ctrace-lab > /etc/hostname
    # PID 1 of the qemu guest: mount the 9p shares, then hand over to
    # tests/vm/guest-run.sh from the working tree (so changing the test
    # driver needs no image rebuild).
    cat > /sbin/ctrace-lab-init <<'INIT'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname ctrace-lab
ip link set lo up
modprobe 9pnet_virtio 2>/dev/null; modprobe 9p 2>/dev/null
mkdir -p /mnt/tree /mnt/out
if grep -q 'ctrace_lab.probe' /proc/cmdline; then
    echo "ctrace-lab: probe ok"
else
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 tree /mnt/tree &&
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /mnt/out &&
    /bin/sh /mnt/tree/tests/vm/guest-run.sh
    [ $? -eq 0 ] || echo "ctrace-lab: guest-run failed"
fi
sync
echo o > /proc/sysrq-trigger
sleep 30
INIT
    chmod 755 /sbin/ctrace-lab-init
fi
