#!/usr/bin/env bash
# The real-kernel lab: the product and its lab front-end, cross-built static for powerpc64le,
# run inside a Debian ppc64el 6.12 kernel under QEMU TCG on each machine below, against a real
# KVM and a real VFIO group (an emulated e1000e/e1000 bound to vfio-pci).
#
# In the guest, examples/lab_frontend.rs plays QEMU (the VM's creator) and runs the real
# `tce-sidecar --kernel linux` as a separate process, in accelerated then isolated mode
# (tests/lab/scenario.rs). Output: one line per machine and mode,
#   LAB machine=<m> mode=<accelerated|isolated> result=<PASS|FAIL> in_kernel=N exits=M maps=K ...
# plus the full console log of a machine with a failing line. Exits non-zero if any line FAILs;
# exits 0 after one "SKIP: ..." line if the setup cannot install something.
#
# Each machine boots in a CPU slot of its own (tests/lab/boots.sh): as many run at once as there are
# CPUs. Every step in the guest has its own deadline, and a step that runs out is named.
#
# Environment: LAB_MACHINES (default: powernv9 powernv10 pseries-nested-hv pseries-nested-papr),
# LAB_BOOT_SECONDS (deadline from QEMU's start to the guest's init, default 120),
# LAB_SESSION_SECONDS (deadline of one mode's session, default 120), TCE_LAB_CACHE (setup.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MACHINES=${LAB_MACHINES:-powernv9 powernv10 pseries-nested-hv pseries-nested-papr}
TARGET=powerpc64le-unknown-linux-gnu
CACHE=${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}
start=$(date +%s)

setup_out=$(bash tests/lab/setup.sh) || {
    echo "$setup_out"
    echo "lab: setup failed" >&2
    exit 1
}
echo "$setup_out"
if grep -q '^SKIP:' <<<"$setup_out"; then
    exit 0
fi
# shellcheck disable=SC1091
. "$CACHE/lab.env"

echo "lab: cross-building tce-sidecar and lab_frontend for $TARGET (static)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_LINKER=powerpc64le-linux-gnu-gcc
export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
cargo build --quiet --release --target "$TARGET" --bin tce-sidecar --example lab_frontend
BIN=$CARGO_TARGET_DIR/$TARGET/release

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tce-lab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- initramfs -------------------------------------------------------------------------------
R=$WORK/root
# shellcheck source=tests/lab/initramfs.sh
. tests/lab/initramfs.sh
# shellcheck source=tests/lab/boots.sh
. tests/lab/boots.sh
busybox_root "$R" sh mount insmod cat echo grep readlink basename ls sleep poweroff dmesg tail \
    sed cut timeout pkill
cp "$BIN/tce-sidecar" "$R/tce-sidecar"
cp "$BIN/examples/lab_frontend" "$R/lab_frontend"
for want in kvm-hv vfio_iommu_spapr_tce vfio-pci; do copy_module "$R" $want; done
cat >"$R/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
M=$(arg LAB_MACHINE)
SESSION_SECONDS=$(arg LAB_SESSION_SECONDS)
step() { echo "STEP case=$1 step=$2 seconds=$3"; }
uptime_s() { cut -d. -f1 /proc/uptime; }
echo "lab-guest: kernel $(cat /proc/sys/kernel/osrelease) machine $M"
step $M load-modules 120
for m in $(cat /modules.order); do
    insmod /lib/modules/$m || echo "lab-guest: insmod $m failed"
done
step $M bind-vfio-pci 60
dev=""
for d in /sys/bus/pci/devices/*; do
    case "$(cat $d/vendor):$(cat $d/device)" in
    0x8086:0x100e | 0x8086:0x10d3) dev=$d ;;
    esac
done
if [ -z "$dev" ]; then
    echo "LAB machine=$M mode=accelerated result=FAIL why=\"no e1000/e1000e device\""
else
    b=$(basename $dev)
    [ -e $dev/driver ] && echo $b >$dev/driver/unbind
    echo vfio-pci >$dev/driver_override
    echo $b >/sys/bus/pci/drivers_probe
    g=$(basename $(readlink $dev/iommu_group))
    echo "lab-guest: $b bound to $(basename $(readlink $dev/driver)), group /dev/vfio/$g"
    for mode in accelerated isolated; do
        # one mode's whole session: the VM, a sidecar, the scenario and the teardown
        step $M/$mode session $SESSION_SECONDS
        t0=$(uptime_s)
        timeout -s KILL $SESSION_SECONDS /lab_frontend run --machine "$M" --mode $mode \
            --group /dev/vfio/$g --sidecar /tce-sidecar >/tmp/session.log 2>&1
        echo "lab-guest: lab_frontend exit $?" >>/tmp/session.log
        # a session cut short leaves its sidecar behind, holding the group
        pkill -KILL tce-sidecar
        cat /tmp/session.log
        if ! grep -q "^LAB machine=$M mode=$mode " /tmp/session.log; then
            took=$(($(uptime_s) - t0))
            why="no summary line from lab_frontend after $took s"
            [ $took -ge $SESSION_SECONDS ] && why="step session ran out of time after $took s (deadline $SESSION_SECONDS s)"
            echo "LAB machine=$M mode=$mode result=FAIL why=\"$why\""
        fi
    done
fi
step $M power-off 60
dmesg | grep -iE 'vfio|kvm|iommu|warn|bug' | tail -n 30
echo o >/proc/sysrq-trigger
poweroff -f
EOF
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 >"$WORK/initrd.gz")

# --- boots ----------------------------------------------------------------------------------
# One boot per machine, each in a CPU slot of its own (tests/lab/boots.sh), so that two run at
# once on two CPUs. Deadlines: booting to init takes 9-19 s here (13-23 s with two CPU-bound busy
# loops beside), loading the modules 2-5 s, a session 2-5 s; each gets at least five times that.
BOOT_SECONDS=${LAB_BOOT_SECONDS:-120}
SESSION_SECONDS=${LAB_SESSION_SECONDS:-120}
boot_machine() { # boot_machine N MACHINE: one emulated machine, both modes
    local machine=$2 qemu_machine dev log=$WORK/$2.log t0 machine_failed=0 mode acc iso
    case $machine in
    powernv9) qemu_machine=(-M powernv9) dev=(-device e1000e,bus=pcie.0,addr=0x0,romfile=) ;;
    powernv10) qemu_machine=(-M powernv10) dev=(-device e1000e,bus=pcie.0,addr=0x0,romfile=) ;;
    pseries-nested-hv) qemu_machine=(-M pseries,cap-nested-hv=on,x-vof=on -cpu power9 -vga none) dev=(-device e1000,addr=0x5,romfile=) ;;
    pseries-nested-papr) qemu_machine=(-M pseries,cap-nested-papr=on,x-vof=on -cpu power10 -vga none) dev=(-device e1000,addr=0x5,romfile=) ;;
    *)
        echo "LAB machine=$machine mode=accelerated result=FAIL why=\"unknown machine\""
        return 1
        ;;
    esac
    t0=$SECONDS
    boot_with_deadlines "$log" "$BOOT_SECONDS" qemu-system-ppc64 "${qemu_machine[@]}" -m 2G -smp 1 \
        -nographic -no-reboot -kernel "$LAB_VMLINUX" -initrd "$WORK/initrd.gz" \
        -append "console=hvc0 rdinit=/init loglevel=4 LAB_MACHINE=$machine LAB_SESSION_SECONDS=$SESSION_SECONDS" \
        "${dev[@]}"
    echo "lab: $machine: qemu exit $RC after $((SECONDS - t0)) s; steps (s): $TOOK"
    for mode in accelerated isolated; do
        summary_line "$log" "LAB machine=$machine mode=$mode" || machine_failed=1
    done
    # P5, the seed's effect: the same hypercalls per second, accelerated against isolated. TCG
    # makes absolute times meaningless; the ratio is the figure.
    us() { grep -a -m1 "^LAB machine=$machine mode=$1 " "$log" | tr -d '\r' | sed -n 's/.* workload_us=\([0-9]*\).*/\1/p'; }
    acc=$(us accelerated)
    iso=$(us isolated)
    if [ -n "$acc" ] && [ -n "$iso" ] && [ "$acc" -gt 0 ]; then
        echo "P5 machine=$machine hypercalls/s accelerated/isolated: $(awk -v a="$acc" -v i="$iso" 'BEGIN { printf "%.1f", i / a }') (seed: 3.4-4.6x throughput)"
    fi
    end_boot "$log" "$machine" "$machine_failed" "LAB machine=$machine kernel WARNING in the guest's log:"
}

failed=0
# shellcheck disable=SC2086
boot_all "$WORK" boot_machine $MACHINES || failed=1
echo "lab: done in $(($(date +%s) - start)) s"
exit "$failed"
