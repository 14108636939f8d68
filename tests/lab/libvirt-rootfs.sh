#!/usr/bin/env bash
# The root filesystem of a Debian ppc64el host with systemd and libvirt, for the emulated POWER9
# of tests/lab/libvirt-host.sh. Made once per suite, package list, kernel and this script's
# customisation, and cached as an ext4 image:
#
#   $CACHE/libvirt-rootfs-<suite>-<hash>/rootfs.ext4     (sparse, 2 GiB; booted with snapshot=on)
#
# How: mmdebstrap --arch ppc64el (variant apt, no recommends), its maintainer scripts run by
# qemu-user-static through binfmt_misc (registered here for ppc64le only, if it is not yet);
# the kernel modules are the lab's 6.12 kernel's (tests/lab/setup.sh extracts the very
# linux-image .deb of that version), copied rather than installed, so that no initramfs-tools
# run is needed; then mkfs.ext4 -d. Prints `libvirt rootfs: <path>` last; `SKIP: ...` and exit 0
# when a tool cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}
SUITE=${LIBVIRT_ROOTFS_SUITE:-bookworm}
MIRROR=${LIBVIRT_ROOTFS_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(systemd-sysv udev kmod dbus libvirt-daemon-system libvirt-clients
    libvirt-daemon-driver-qemu iproute2 procps busybox)
# bump when the customisation below changes
CUSTOM_VERSION=1
skip() {
    echo "SKIP: $1 ($2)"
    exit 0
}
log() { echo "libvirt rootfs: $*"; }
t0=$SECONDS

[ "$(id -u)" = 0 ] || skip "libvirt rootfs" "not root"
[ -f "$CACHE/lab.env" ] || skip "libvirt rootfs" "no $CACHE/lab.env: run tests/lab/setup.sh"
# shellcheck disable=SC1091
. "$CACHE/lab.env"

key=$(printf '%s\n' "$SUITE" "$MIRROR" "${PACKAGES[@]}" "$LAB_KERNEL_RELEASE" "$CUSTOM_VERSION" |
    sha256sum | cut -c1-12)
OUT=$CACHE/libvirt-rootfs-$SUITE-$key
if [ -f "$OUT/.done" ]; then
    log "cached ($OUT)"
    echo "libvirt rootfs: $OUT/rootfs.ext4"
    exit 0
fi

# --- tools ------------------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v arch-test >/dev/null || need+=(arch-test)
[ -x /usr/bin/qemu-ppc64le ] || need+=(qemu-user-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
    # from bookworm-backports where tests/lab/setup.sh added it (as there for qemu-system-ppc): the
    # versions this was measured with, mmdebstrap 1.5 and qemu-user-static 10.0
    bpo=()
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && bpo=(-t bookworm-backports)
    log "installing ${need[*]}"
    apt-get install -y -q --no-install-recommends "${bpo[@]}" "${need[@]}" >/dev/null 2>&1 ||
        skip "libvirt rootfs" "apt-get install ${need[*]} failed"
fi
# binfmt_misc: mounted and ppc64le registered (flag F: works inside the chroot)
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
        skip "libvirt rootfs" "cannot mount binfmt_misc"
fi
registered=""
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-ppc64le ]; then
    conf=/usr/lib/binfmt.d/qemu-ppc64le.conf
    [ -f "$conf" ] || skip "libvirt rootfs" "no $conf (qemu-user-binfmt)"
    cat "$conf" >/proc/sys/fs/binfmt_misc/register || skip "libvirt rootfs" "cannot register ppc64le in binfmt_misc"
    registered=1
fi

# --- the root filesystem ---------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tce-rootfs.XXXXXX")
cleanup() {
    rm -rf "$WORK"
    # what this script registered, it takes away again
    if [ -n "$registered" ]; then echo -1 >/proc/sys/fs/binfmt_misc/qemu-ppc64le || true; fi
}
trap cleanup EXIT
R=$WORK/root
log "mmdebstrap $SUITE ppc64el: ${PACKAGES[*]}"
t1=$SECONDS
mmdebstrap --quiet --arch=ppc64el --variant=apt --components=main \
    --aptopt='Apt::Install-Recommends "false"' \
    --include="$(
        IFS=,
        echo "${PACKAGES[*]}"
    )" \
    --customize-hook='chroot "$1" passwd -d root' \
    --customize-hook='echo l1 >"$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda / ext4 rw,noatime 0 0\n" >"$1/etc/fstab"' \
    --customize-hook='rm -f "$1"/etc/systemd/system/timers.target.wants/*' \
    "$SUITE" "$R" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1 || {
    tail -n 20 "$WORK/mmdebstrap.log"
    echo "libvirt rootfs: mmdebstrap failed" >&2
    exit 1
}
log "mmdebstrap took $((SECONDS - t1)) s"
# the lab kernel's modules (kvm-hv, vfio-pci, e1000e, virtio-blk, ext4 ...)
mkdir -p "$R/lib/modules"
cp -a "$LAB_KERNEL_DIR/lib/modules/$LAB_KERNEL_RELEASE" "$R/lib/modules/"
# libvirt: root's QEMU is not needed; keep Debian's defaults (libvirt-qemu)
du -sh "$R" | sed 's/^/libvirt rootfs: size /'
mkdir -p "$OUT"
rm -f "$OUT/rootfs.ext4"
t1=$SECONDS
mkfs.ext4 -q -L l1root -d "$R" "$OUT/rootfs.ext4" 2G
log "mkfs.ext4 -d took $((SECONDS - t1)) s"
dpkg-query --admindir="$R/var/lib/dpkg" -W -f='${Package} ${Version}\n' >"$OUT/packages.txt"
touch "$OUT/.done"
log "made in $((SECONDS - t0)) s ($(wc -l <"$OUT/packages.txt") packages)"
echo "libvirt rootfs: $OUT/rootfs.ext4"
