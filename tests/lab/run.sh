#!/usr/bin/env bash
# The real-kernel lab: the product and its lab front-end, cross-built static for powerpc64le,
# run inside each Debian ppc64el kernel of tests/lab/setup.sh (6.12, and the newest of sid) under
# QEMU TCG on each machine below, against a real KVM and a real VFIO group (an emulated
# e1000e/e1000 bound to vfio-pci).
#
# In the guest, examples/lab_frontend/ plays QEMU (the VM's creator) as root and runs the real
# `tce-sidecar --kernel linux` as a separate process as an unprivileged user (uid 65534 in group
# kvm, with a locked-memory limit for isolated mode and `--allow-uid 0`), in accelerated then
# isolated mode (tests/lab/scenario.rs). Each session's worker must be confined (Seccomp 2,
# NoNewPrivs 1) and gone once the session is over; the guest's kernel log must record no seccomp
# kill (and must record the one a probe provokes, so that the check can see one). Output: per
# kernel and machine
#   LAB kernel=<version> machine=<m> mode=<accelerated|isolated> result=<PASS|FAIL> in_kernel=N ...
#   LAB kernel=<version> machine=<m> check=seccomp-log result=<PASS|FAIL> kills=N probe=...
# plus the full console log of a boot with a failing line. Exits non-zero if any line FAILs;
# exits 0 after one "SKIP: ..." line if the setup cannot install something the lab needs (a
# kernel other than 6.12 that cannot be fetched is skipped alone).
#
# Each boot (a kernel on a machine) runs in a CPU slot of its own (tests/lab/boots.sh): as many run
# at once as there are CPUs. Every step in the guest has its own deadline, and a step that runs out
# is named.
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
if ! grep -q '^lab setup: ok$' <<<"$setup_out"; then
    exit 0
fi
# shellcheck disable=SC1091
. "$CACHE/lab.env"

echo "lab: cross-building tce-sidecar and lab_frontend for $TARGET (static, libseccomp static)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
bash tests/lab/ppc64-env.sh cargo build --quiet --release --target "$TARGET" --bin tce-sidecar --example lab_frontend
BIN=$CARGO_TARGET_DIR/$TARGET/release

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tce-lab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- initramfs -------------------------------------------------------------------------------
# shellcheck source=tests/lab/initramfs.sh
. tests/lab/initramfs.sh
# shellcheck source=tests/lab/boots.sh
. tests/lab/boots.sh
cat >"$WORK/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
M=$(arg LAB_MACHINE)
SESSION_SECONDS=$(arg LAB_SESSION_SECONDS)
K=$(sed 's/[+-].*//' /proc/sys/kernel/osrelease)
step() { echo "STEP case=$1 step=$2 seconds=$3"; }
uptime_s() { cut -d. -f1 /proc/uptime; }
# seccomp kills in the kernel log: audit records of type 1326 (AUDIT_SECCOMP)
seccomp_records() { dmesg | grep -E 'audit: type=1326|seccomp.*(sig=31|code=0x80000000)'; }
echo "lab-guest: kernel $(cat /proc/sys/kernel/osrelease) machine $M"
# A seccomp kill the kernel must log: otherwise the check of the log at the end sees nothing.
step $M seccomp-probe 30
ulimit -c 0
timeout -s KILL 20 /lab_frontend seccomp-probe &
probe=$!
wait $probe
probe_rc=$?
probe_record=""
for i in 1 2 3 4 5; do
    probe_record=$(seccomp_records | grep " pid=$probe " | head -n 1)
    [ -n "$probe_record" ] && break
    sleep 1
done
echo "lab-guest: seccomp probe pid $probe exit $probe_rc; its record: ${probe_record:-none}"
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
    echo "LAB kernel=$K machine=$M mode=accelerated result=FAIL why=\"no e1000/e1000e device\""
else
    b=$(basename $dev)
    [ -e $dev/driver ] && echo $b >$dev/driver/unbind
    echo vfio-pci >$dev/driver_override
    echo $b >/sys/bus/pci/drivers_probe
    g=$(basename $(readlink $dev/iommu_group))
    # The sidecar runs as nobody (65534) in group kvm. /dev/kvm as a Debian host's udev leaves
    # it: root:kvm 0660 (gid 36 here); the sidecar opens it to see what KVM supports. It opens
    # /dev/vfio/vfio (0666) for its own containers in isolated mode.
    chgrp 36 /dev/kvm && chmod 0660 /dev/kvm
    echo "lab-guest: $b bound to $(basename $(readlink $dev/driver)), group /dev/vfio/$g; /dev/vfio/vfio $(stat -c '%A %u:%g' /dev/vfio/vfio); /dev/kvm $(stat -c '%A %u:%g' /dev/kvm)"
    # Isolated mode pins the guest's 64 MiB of RAM and its table in the sidecar's worker, so its
    # locked-memory limit is 128 MiB (KiB here).
    ulimit -l 131072
    for mode in accelerated isolated; do
        # one mode's whole session: the VM, a sidecar, the scenario and the teardown
        step $M/$mode session $SESSION_SECONDS
        t0=$(uptime_s)
        timeout -s KILL $SESSION_SECONDS /lab_frontend run --machine "$M" --mode $mode \
            --group /dev/vfio/$g --sidecar /tce-sidecar --sidecar-user 65534:36 >/tmp/session.log 2>&1
        echo "lab-guest: lab_frontend exit $?" >>/tmp/session.log
        # a session cut short leaves its sidecar behind, holding the group
        killall -KILL tce-sidecar 2>/dev/null
        cat /tmp/session.log
        if ! grep -q "^LAB kernel=$K machine=$M mode=$mode " /tmp/session.log; then
            took=$(($(uptime_s) - t0))
            why="no summary line from lab_frontend after $took s"
            [ $took -ge $SESSION_SECONDS ] && why="step session ran out of time after $took s (deadline $SESSION_SECONDS s)"
            echo "LAB kernel=$K machine=$M mode=$mode result=FAIL why=\"$why\""
        fi
    done
fi
if [ "$M" = powernv9 ]; then
    # The conformance kit against the daemon on the model kernel, both as built for ppc64le and
    # run on its kernel (its page size is printed: the kit sizes its regions from it).
    step $M conformance 150
    mkdir -p /tmp/kit
    /tce-sidecar --kernel model --socket-path /tmp/kit/sock --log-level error 2>/tmp/kit/daemon.log &
    kit_daemon=$!
    for i in $(seq 1 50); do [ -e /tmp/kit/sock.model ] && break; sleep 0.2; done
    timeout -s KILL 120 /tce-sidecar conformance backend --socket /tmp/kit/sock >/tmp/kit/out.log 2>&1
    kit_rc=$?
    kill $kit_daemon
    grep -v '^ok ' /tmp/kit/out.log | sed 's/^/lab-guest: kit: /'
    summary=$(grep '^backend: ' /tmp/kit/out.log)
    result=FAIL
    [ $kit_rc = 0 ] && echo "$summary" | grep -q ' 0 failed, 0 skipped$' && result=PASS
    echo "LAB kernel=$K machine=$M check=conformance result=$result page_kib=$(sed -n "s/^KernelPageSize: *\([0-9]*\) kB/\1/p" /proc/self/smaps | head -n 1) summary=\"$summary\" exit=$kit_rc"
fi
step $M seccomp-log 30
kills=$(seccomp_records | grep -v " pid=$probe ")
if [ -n "$kills" ]; then
    echo "$kills" | sed 's/^/lab-guest: seccomp kill: /'
    echo "LAB kernel=$K machine=$M check=seccomp-log result=FAIL kills=$(echo "$kills" | wc -l) why=\"seccomp kills in the kernel log\""
elif [ -z "$probe_record" ]; then
    echo "LAB kernel=$K machine=$M check=seccomp-log result=FAIL kills=0 probe=missing why=\"the kernel log has no record of the probe's seccomp kill (pid $probe, exit $probe_rc): a kill would go unseen\""
else
    echo "LAB kernel=$K machine=$M check=seccomp-log result=PASS kills=0 probe=recorded"
fi
step $M power-off 60
dmesg | grep -iE 'vfio|kvm|iommu|warn|bug' | tail -n 30
echo o >/proc/sysrq-trigger
poweroff -f
EOF
# make_initrd N: the initramfs for kernel N of lab.env (its modules), $WORK/initrd-N.gz
make_initrd() {
    local n=$1 r=$WORK/root-$1 dir=LAB_KERNEL_$1_DIR rel=LAB_KERNEL_$1_RELEASE
    # initramfs.sh reads the kernel's modules from these two
    # shellcheck disable=SC2034
    LAB_KERNEL_DIR=${!dir} LAB_KERNEL_RELEASE=${!rel}
    busybox_root "$r" sh mount insmod cat echo grep readlink basename ls sleep poweroff dmesg tail \
        sed cut timeout killall stat wc head chgrp chmod mkdir seq kill
    cp "$BIN/tce-sidecar" "$r/tce-sidecar"
    cp "$BIN/examples/lab_frontend" "$r/lab_frontend"
    lab_modules "$r"
    cp "$WORK/init" "$r/init"
    chmod +x "$r/init"
    (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1 >"$WORK/initrd-$n.gz")
}
KERNELS=$(seq 1 "${LAB_KERNELS:-1}")
for k in $KERNELS; do make_initrd "$k"; done

# --- boots ----------------------------------------------------------------------------------
# One boot per kernel and machine, each in a CPU slot of its own (tests/lab/boots.sh), so that two
# run at once on two CPUs. Deadlines: booting to init takes 9-19 s here (13-23 s with two CPU-bound
# busy loops beside), loading the modules 2-5 s, a session 2-5 s, the seccomp probe and the check
# of the log under 1 s; each gets at least five times that.
BOOT_SECONDS=${LAB_BOOT_SECONDS:-120}
SESSION_SECONDS=${LAB_SESSION_SECONDS:-120}
boot_machine() { # boot_machine N K:MACHINE: kernel K of lab.env on one emulated machine, both modes
    local k=${2%%:*} machine=${2#*:} qemu_machine dev log t0 machine_failed=0 mode acc iso
    local vmlinux=LAB_KERNEL_${2%%:*}_VMLINUX version=LAB_KERNEL_${2%%:*}_VERSION kv
    kv=${!version}
    log=$WORK/$kv-$machine.log
    case $machine in
    powernv9) qemu_machine=(-M powernv9) dev=(-device e1000e,bus=pcie.0,addr=0x0,romfile=) ;;
    powernv10) qemu_machine=(-M powernv10) dev=(-device e1000e,bus=pcie.0,addr=0x0,romfile=) ;;
    pseries-nested-hv) qemu_machine=(-M pseries,cap-nested-hv=on,x-vof=on -cpu power9 -vga none) dev=(-device e1000,addr=0x5,romfile=) ;;
    pseries-nested-papr) qemu_machine=(-M pseries,cap-nested-papr=on,x-vof=on -cpu power10 -vga none) dev=(-device e1000,addr=0x5,romfile=) ;;
    *)
        echo "LAB kernel=$kv machine=$machine mode=accelerated result=FAIL why=\"unknown machine\""
        return 1
        ;;
    esac
    t0=$SECONDS
    boot_with_deadlines "$log" "$BOOT_SECONDS" qemu-system-ppc64 "${qemu_machine[@]}" -m 2G -smp 1 \
        -nographic -no-reboot -kernel "${!vmlinux}" -initrd "$WORK/initrd-$k.gz" \
        -append "console=hvc0 rdinit=/init loglevel=4 LAB_MACHINE=$machine LAB_SESSION_SECONDS=$SESSION_SECONDS" \
        "${dev[@]}"
    echo "lab: kernel $kv, $machine: qemu exit $RC after $((SECONDS - t0)) s; steps (s): $TOOK"
    for mode in accelerated isolated; do
        summary_line "$log" "LAB kernel=$kv machine=$machine mode=$mode" || machine_failed=1
    done
    summary_line "$log" "LAB kernel=$kv machine=$machine check=seccomp-log" || machine_failed=1
    if [ "$machine" = powernv9 ]; then
        summary_line "$log" "LAB kernel=$kv machine=$machine check=conformance" || machine_failed=1
    fi
    # P5, the seed's effect: the same hypercalls per second, accelerated against isolated. TCG
    # makes absolute times meaningless; the ratio is the figure.
    us() { grep -a -m1 "^LAB kernel=$kv machine=$machine mode=$1 " "$log" | tr -d '\r' | sed -n 's/.* workload_us=\([0-9]*\).*/\1/p'; }
    acc=$(us accelerated)
    iso=$(us isolated)
    if [ -n "$acc" ] && [ -n "$iso" ] && [ "$acc" -gt 0 ]; then
        echo "P5 kernel=$kv machine=$machine hypercalls/s accelerated/isolated: $(awk -v a="$acc" -v i="$iso" 'BEGIN { printf "%.1f", i / a }') (seed: 3.4-4.6x throughput)"
    fi
    end_boot "$log" "kernel $kv on $machine" "$machine_failed" "LAB kernel=$kv machine=$machine kernel WARNING in the guest's log:"
}

# Every kernel on every machine, kernel by kernel; two boots at once on two CPUs.
boots=()
for k in $KERNELS; do
    for m in $MACHINES; do boots+=("$k:$m"); done
done
failed=0
boot_all "$WORK" boot_machine "${boots[@]}" || failed=1
echo "lab: done in $(($(date +%s) - start)) s"
exit "$failed"
