#!/usr/bin/env bash
# The libvirt run on ppc64le, which tests/run-all.sh runs beside the nested lab: a Debian ppc64el
# host with systemd and libvirt booted as L1 in the emulated POWER9 (powernv9, TCG, as
# tests/lab/nested.sh), its root the cached image of tests/lab/libvirt-rootfs.sh on a
# virtio-blk-pci disk (snapshot=on: the cache is never written).
#
#   L0  qemu-system-ppc64 -M powernv9: the e1000e on pcie.0 (-netdev user), the disk on pcie.1
#   L1  a busybox initramfs loads virtio-blk and ext4, copies the run's payload (/opt/lab, a
#       systemd unit) into the root, and switch_roots to systemd; lab.service (after
#       multi-user.target) runs /opt/lab/l1.sh, whose output goes to the console, then powers off
#
# LIBVIRT_HOST_STAGE=domain (default): the patched QEMU (qemu-patches/check's ppc64le build, behind a
# wrapper that sets LD_LIBRARY_PATH to the libraries of its sysroot), the static ppc64le
# tce-sidecar, `tce-sidecar libvirt-install`, and a KVM pseries domain with the e1000e as a
# managed <hostdev> made by `tce-sidecar libvirt-xml`, in the modes of LIBVIRT_HOST_MODES
# (default "accelerated isolated"): start, download, destroy, start, destroy; VmLck and sidecar
# processes checked after each destroy.
# LIBVIRT_HOST_STAGE=boot: only until `virsh list` answers, with the boot's timings
# (systemd-analyze), then power off.
#
# Output: `LIBVIRT-PPC64 ...` lines; the console log in $LIBVIRT_HOST_LOG (default
# /tmp/tce-libvirt-host.log).
#
# Measured (2-core x86_64, lab and QEMU caches warm): the root filesystem 148-152 s cold, 0 s
# cached; stage boot 31-32 s (virsh list answers at 22-24 s of L1's uptime); stage domain 296-308 s
# of L0 (both modes, two starts each), 4m58s-5m03s in all with the rootfs cached, 7m58s without.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STAGE=${LIBVIRT_HOST_STAGE:-domain}
MODES=${LIBVIRT_HOST_MODES:-accelerated isolated}
CACHE=${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}
BOOT_SECONDS=${LIBVIRT_HOST_BOOT_SECONDS:-900}
LOG=${LIBVIRT_HOST_LOG:-/tmp/tce-libvirt-host.log}
MIB=${NESTED_MIB:-8}
TARGET=powerpc64le-unknown-linux-gnu
QEMU_VERSION=$(sed -n 's/^QEMU_VERSION=//p' qemu-patches/check)
QCACHE=${TCE_SIDECAR_QEMU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-qemu}/$QEMU_VERSION
QEMU_L1=$QCACHE/qemu/build-ppc64le/qemu-system-ppc64
SYSROOT=$QCACHE/ppc64el/sysroot
start=$SECONDS

setup_out=$(bash tests/lab/setup.sh) || {
    echo "$setup_out"
    exit 1
}
grep -q '^lab setup: ok$' <<<"$setup_out" || {
    echo "$setup_out"
    exit 0
}
# shellcheck disable=SC1091
. "$CACHE/lab.env"
rootfs_out=$(bash tests/lab/libvirt-rootfs.sh) || {
    echo "$rootfs_out"
    exit 1
}
echo "$rootfs_out"
IMAGE=$(sed -n 's/^libvirt rootfs: \(\/.*\.ext4\)$/\1/p' <<<"$rootfs_out" | tail -n1)
[ -n "$IMAGE" ] || exit 0
echo "libvirt-host: setup and rootfs took $((SECONDS - start)) s"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tce-libvirt-host.XXXXXX")
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=tests/lab/initramfs.sh
. tests/lab/initramfs.sh
# shellcheck source=tests/lab/boots.sh
. tests/lab/boots.sh

# --- the payload copied into L1's root at boot -------------------------------------------------
P=$WORK/payload
mkdir -p "$P/opt/lab" "$P/etc/systemd/system/multi-user.target.wants"
cat >"$P/etc/systemd/system/lab.service" <<'EOF'
[Unit]
Description=tce-sidecar lab
After=multi-user.target libvirtd.socket
Wants=libvirtd.socket

[Service]
Type=oneshot
ExecStart=/opt/lab/l1.sh
ExecStopPost=/bin/systemctl --no-block poweroff --force
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
EOF
ln -s ../lab.service "$P/etc/systemd/system/multi-user.target.wants/lab.service"
# the console is the lab's: no getty on it
ln -s /dev/null "$P/etc/systemd/system/serial-getty@hvc0.service"
cp tests/lab/libvirt-l1.sh "$P/opt/lab/l1.sh"
chmod +x "$P/opt/lab/l1.sh"
echo "$STAGE" >"$P/opt/lab/stage"
echo "$MODES" >"$P/opt/lab/modes"

if [ "$STAGE" = domain ]; then
    [ -x "$QEMU_L1" ] && [ -d "$SYSROOT" ] || {
        echo "SKIP: libvirt ppc64le domain (no ppc64le build of the patched QEMU in $QCACHE)"
        exit 0
    }
    echo "libvirt-host: cross-building tce-sidecar for $TARGET (static)"
    t1=$SECONDS
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
    bash tests/lab/ppc64-env.sh cargo build --quiet --release --target "$TARGET" --bin tce-sidecar
    echo "libvirt-host: cross build took $((SECONDS - t1)) s"
    cp "$CARGO_TARGET_DIR/$TARGET/release/tce-sidecar" "$P/opt/lab/tce-sidecar"
    cp tests/lab/libvirt-domain.sh "$P/opt/lab/domain.sh"
    Q=$P/opt/tce-qemu
    mkdir -p "$Q/bin" "$Q/lib" "$Q/share/qemu"
    powerpc64le-linux-gnu-strip -o "$Q/bin/qemu-system-ppc64.real" "$QEMU_L1"
    # libvirt runs the emulator with a cleared environment: the wrapper finds the libraries
    cat >"$Q/bin/qemu-system-ppc64" <<'EOF'
#!/bin/sh
LD_LIBRARY_PATH=/opt/tce-qemu/lib exec /opt/tce-qemu/bin/qemu-system-ppc64.real "$@"
EOF
    chmod +x "$Q/bin/qemu-system-ppc64"
    # firmware: a relocatable QEMU looks in ../share/qemu
    cp /usr/share/qemu/vof.bin /usr/share/qemu/slof.bin "$Q/share/qemu/"
    # glibc itself is the root's (same suite as the sysroot)
    copy_libraries "$Q/lib" "$SYSROOT" '^(libc|libm|ld64|libpthread|libdl|librt)\.so\.' "$QEMU_L1"
    # L2: the lab kernel and a busybox initramfs that brings up eth0 and downloads
    mkdir -p "$P/opt/lab/l2"
    cp "$LAB_VMLINUX" "$P/opt/lab/l2/vmlinux"
    R2=$WORK/l2
    busybox_root "$R2" sh mount insmod cat echo grep sed awk cut tr ls sleep kill poweroff dmesg \
        tail head ip wget stat rm
    copy_module "$R2" e1000e
    cp tests/lab/l2-init.sh "$R2/init"
    chmod +x "$R2/init"
    (cd "$R2" && find . | cpio -o -H newc --quiet | gzip -1 >"$P/opt/lab/l2/initrd.gz")
fi

# --- the initramfs: virtio-blk, ext4, payload, switch_root -------------------------------------
R1=$WORK/initramfs
busybox_root "$R1" sh mount umount insmod cat echo cp mkdir ln sleep switch_root sed
copy_module "$R1" virtio_blk
# ext4 asks the crypto API for crc32c (a soft dependency modules.dep does not list)
copy_module "$R1" crc32c_generic
copy_module "$R1" ext4
cp -a "$P" "$R1/payload"
cat >"$R1/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "STEP case=host step=initramfs seconds=120"
for m in $(cat /modules.order); do insmod /lib/modules/$m 2>/dev/null || echo "initramfs: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || { echo "initramfs: cannot mount /dev/vda"; sleep 5; echo o >/proc/sysrq-trigger; }
cp -a /payload/. /newroot/
echo "initramfs: root mounted at $(cut -d' ' -f1 /proc/uptime) s; switching to systemd"
echo "STEP case=host step=systemd-to-libvirtd seconds=1200"
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
EOF
chmod +x "$R1/init"
(cd "$R1" && find . | cpio -o -H newc --quiet | gzip -1 >"$WORK/initrd.gz")
echo "libvirt-host: initramfs $(du -h "$WORK/initrd.gz" | cut -f1)"

# --- L0: an HTTP server, reached from L2 through -netdev user ----------------------------------
mkdir -p "$WORK/www"
head -c $((MIB * 1024 * 1024)) /dev/urandom >"$WORK/www/blob"
start_l0_server "$WORK"

boot() {
    boot_with_deadlines "$LOG" "$BOOT_SECONDS" qemu-system-ppc64 -M powernv9 -m 3G -smp 1 \
        -nographic -no-reboot -kernel "$LAB_VMLINUX" -initrd "$WORK/initrd.gz" \
        -append "console=hvc0 rdinit=/init loglevel=4 NESTED_PORT=$port NESTED_BYTES=$((MIB * 1024 * 1024))" \
        -netdev user,id=n0 -device e1000e,netdev=n0,bus=pcie.0,addr=0x0,romfile= \
        -drive if=none,id=d0,file="$IMAGE",format=raw,snapshot=on \
        -device virtio-blk-pci,drive=d0,bus=pcie.1,addr=0x0
}
t1=$SECONDS
in_cpu_slot boot
echo "libvirt-host: L0 qemu exit $RC after $((SECONDS - t1)) s; steps (s): $TOOK${STUCK:+; $STUCK}"
grep -a -E '^(LIBVIRT-PPC64|L1:)' "$LOG" | tr -d '\r' || true
echo "libvirt-host: done in $((SECONDS - start)) s (console log: $LOG)"
failed=0
summary_line "$LOG" "LIBVIRT-PPC64 stage=boot" >/dev/null || failed=1
if [ "$STAGE" = domain ]; then
    for m in $MODES; do summary_line "$LOG" "LIBVIRT-PPC64 mode=$m" >/dev/null || failed=1; done
    summary_line "$LOG" "LIBVIRT-PPC64 units" >/dev/null || failed=1
    summary_line "$LOG" "LIBVIRT-PPC64 kernel" >/dev/null || failed=1
fi
end_boot "$LOG" "the libvirt host" "$failed" "LIBVIRT-PPC64 kernel WARN in L1's log:" || exit 1
