#!/bin/sh
# init of L1 in tests/lab/nested.sh: the emulated POWER9 host. Binds the e1000e to vfio-pci, then
# for each mode runs the real tce-sidecar and the patched QEMU, whose KVM guest (L2) downloads a
# file through the passed-through NIC, and prints one `NESTED mode=… result=…` line.
export PATH=/bin LD_LIBRARY_PATH=/qemu/lib
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
PORT=$(arg NESTED_PORT)
BYTES=$(arg NESTED_BYTES)
echo "L1: kernel $(cat /proc/sys/kernel/osrelease)"
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "L1: insmod $m failed"; done
dev=""
for d in /sys/bus/pci/devices/*; do
    case "$(cat $d/vendor):$(cat $d/device)" in 0x8086:0x10d3) dev=$d ;; esac
done
B=$(basename "$dev")
[ -e $dev/driver ] && echo $B >$dev/driver/unbind
echo vfio-pci >$dev/driver_override
echo $B >/sys/bus/pci/drivers_probe
echo "L1: $B bound to $(basename $(readlink $dev/driver)), group $(basename $(readlink $dev/iommu_group))"
CAPS=cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off,cap-hpt-max-page-size=4096

# wait_for PATTERN FILE SECONDS
wait_for() {
    i=0
    while ! grep -q "$1" "$2" 2>/dev/null; do
        [ $i -ge $3 ] && return 1
        sleep 1
        i=$((i + 1))
    done
}
vmlck() { awk '/^VmLck:/ { print $2 }' /proc/$1/status; }
count() { grep -c -E "^($1)" /tmp/q.log; }
status_field() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" /tmp/status.json | head -n1; }

start_sidecar() {
    rm -f /tmp/sc.sock
    /tce-sidecar --socket-path /tmp/sc.sock >>/tmp/sc.log 2>&1 &
    sc=$!
    i=0
    while [ ! -S /tmp/sc.sock ] && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
}

# start_qemu MODE GUEST_ARGS: the L2 guest with the NIC on a sidecar-backed container; sets qp
start_qemu() {
    /qemu/bin/qemu-system-ppc64 -L /qemu/share \
        -M pseries,accel=kvm,x-vof=on,$CAPS,memory-backend=ram0 -cpu host -m 256M -smp 1 \
        -object memory-backend-memfd,id=ram0,size=256M,share=on \
        -object spapr-tce-sidecar,id=sc0,path=/tmp/sc.sock,mode=$1 \
        -nographic -nodefaults -monitor none -serial file:/tmp/l2.log \
        -kernel /l2/vmlinux -initrd /l2/initrd.gz \
        -append "console=hvc0 loglevel=4 NESTED_PORT=$PORT $2" \
        -device vfio-pci,host=$B,spapr-tce-sidecar=sc0 \
        -trace 'spapr_iommu_put' -trace 'spapr_iommu_indirect' -trace 'spapr_iommu_stuff' \
        -trace 'spapr_iommu_pci_put' -trace 'spapr_iommu_pci_indirect' \
        -trace 'spapr_iommu_pci_stuff' -trace 'vfio_sidecar_*' -trace 'vfio_spapr_*' \
        >/tmp/q.log 2>&1 &
    qp=$!
}

transfer_bytes() {
    grep -m1 "^L2-TRANSFER name=$1 " /tmp/l2.log | tr -d '\r' | sed -n 's/.* bytes=\([0-9]*\).*/\1/p'
}

report_failure() {
    echo "--- L1 QEMU log ($1)"
    grep -v -E '^spapr_iommu_' /tmp/q.log | tail -n 60
    echo "--- L2 console ($1)"
    tail -n 60 /tmp/l2.log
    echo "--- sidecar ($1)"
    cat /tmp/sc.log /tmp/status.json
}

# begin_run MODE GUEST_ARGS: fresh logs, a sidecar and the guest
begin_run() {
    : >/tmp/l2.log
    : >/tmp/sc.log
    : >/tmp/status.json
    start_sidecar
    start_qemu "$1" "$2"
    why=""
}

# run_mode NAME MODE GUEST_ARGS: NAME names the summary line, MODE is the sidecar's mode.
run_mode() {
    name=$1
    mode=$2
    guest_args=$3
    begin_run $mode "$guest_args"
    wait_for L2-DONE /tmp/l2.log 600 || why="L2 did not finish"
    /tce-sidecar status --socket-path /tmp/sc.sock >/tmp/status.json 2>&1
    lck_qemu=$(vmlck $qp)
    lck_sidecar=$(vmlck $sc)
    kill $qp
    wait $qp
    kill $sc
    wait $sc
    transfer=$(grep -m1 '^L2-TRANSFER name=first ' /tmp/l2.log | tr -d '\r')
    got=$(echo "$transfer" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p')
    secs=$(echo "$transfer" | sed -n 's/.* seconds=\([0-9.]*\).*/\1/p')
    rate=$(awk -v b="${got:-0}" -v s="${secs:-0}" 'BEGIN { if (s > 0) printf "%d", b / 1024 / s; else print 0 }')
    fallbacks=$(count 'spapr_iommu_(pci_)?(put|indirect|stuff) ')
    qemu_updates=$(count 'vfio_sidecar_tce_update ')
    windows=$(count 'vfio_sidecar_window_create ')
    sc_updates=$(status_field updates_forwarded)
    sc_maps=$(status_field maps)
    [ "$got" = "$BYTES" ] || why="${why:+$why; }L2 received ${got:-nothing} of $BYTES bytes"
    [ "$qemu_updates" = "${sc_updates:-x}" ] ||
        why="${why:+$why; }QEMU forwarded $qemu_updates updates, the sidecar counted ${sc_updates:-none}"
    case $guest_args in
    *disable_ddw*) want_windows=1 ;;
    *) want_windows=2 ;;
    esac
    [ "$windows" -ge $want_windows ] ||
        why="${why:+$why; }$windows windows created through the sidecar, expected $want_windows"
    if [ $mode = accelerated ]; then
        # the guest's TCE hypercalls complete in L1's KVM; only H_TOO_HARD ones reach QEMU
        [ "$fallbacks" -le 16 ] || why="${why:+$why; }$fallbacks hypercalls reached QEMU"
        [ "${lck_qemu:-0}" -ge 262144 ] || why="${why:+$why; }QEMU VmLck ${lck_qemu} kB < guest RAM"
    else
        # every TCE hypercall exits to QEMU and is forwarded; the sidecar pins guest RAM
        [ "$fallbacks" -ge 1 ] || why="${why:+$why; }no hypercall reached QEMU"
        [ "${lck_sidecar:-0}" -ge 262144 ] || why="${why:+$why; }sidecar VmLck ${lck_sidecar} kB < guest RAM"
        [ "${lck_qemu:-0}" -lt 262144 ] || why="${why:+$why; }QEMU VmLck ${lck_qemu} kB holds guest RAM"
    fi
    result=PASS
    [ -n "$why" ] && result=FAIL
    echo "NESTED mode=$name result=$result bytes=${got:-0} seconds=${secs:-0} kib_per_s=$rate hypercalls_in_qemu=$fallbacks forwarded_qemu=$qemu_updates forwarded_sidecar=${sc_updates:-none} maps_sidecar=${sc_maps:-none} windows=$windows vmlck_qemu_kb=${lck_qemu:-none} vmlck_sidecar_kb=${lck_sidecar:-none}${why:+ why=\"$why\"}"
    [ $result = FAIL ] && report_failure $name
}

# run_fault MODE: the sidecar is killed (SIGKILL) while the guest downloads.
run_fault() {
    mode=$1
    begin_run $mode "disable_ddw NESTED_FAULT=kill"
    wait_for L2-FAULT-START /tmp/l2.log 600 || why="L2 did not reach the fault"
    sleep 1
    kill -9 $sc
    wait $sc
    if [ $mode = accelerated ]; then
        # KVM keeps the association: the download goes on; QEMU reconnects to a new sidecar and
        # describes its devices to it (GROUP_ADOPT, WINDOW_ADOPT).
        sleep 2
        start_sidecar
        wait_for L2-DONE /tmp/l2.log 600 || why="${why:+$why; }L2 did not finish"
        wait_for 'reconnected to the tce-sidecar' /tmp/q.log 30 ||
            why="${why:+$why; }QEMU did not reconnect"
        /tce-sidecar status --socket-path /tmp/sc.sock >/tmp/status.json 2>&1
        kill $qp
        wait $qp
        kill $sc
        wait $sc
        got=$(transfer_bytes during-fault)
        [ "$got" = "$BYTES" ] ||
            why="${why:+$why; }L2 received ${got:-nothing} of $BYTES bytes across the fault"
        grep -q 'lost the connection to the tce-sidecar' /tmp/q.log ||
            why="${why:+$why; }QEMU did not report the disconnect"
        grep -q '"mode": "accelerated"' /tmp/status.json ||
            why="${why:+$why; }no accelerated session in the new sidecar"
        groups=$(grep -c '"iommu_group"' /tmp/status.json)
        windows=$(grep -c '"has_window": true' /tmp/status.json)
        [ "$groups" -ge 1 ] && [ "$windows" -ge 1 ] ||
            why="${why:+$why; }the new session knows $groups groups and $windows windows"
        grep -q 'the new session knows the' /tmp/q.log ||
            why="${why:+$why; }QEMU did not rebuild the session"
        detail="bytes_during_fault=${got:-0} reconnected=$(grep -q 'reconnected to the tce-sidecar' /tmp/q.log && echo yes || echo no) groups_in_new_session=$groups windows_in_new_session=$windows"
    else
        # The container died with its owner: QEMU must stop the guest by itself.
        i=0
        while kill -0 $qp 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
        if kill -0 $qp 2>/dev/null; then
            why="${why:+$why; }QEMU still runs ${i}s after its containers' owner died"
            kill $qp
        fi
        wait $qp
        grep -q 'owned the VFIO containers of this VM in isolated mode and is gone' /tmp/q.log ||
            why="${why:+$why; }QEMU did not say why it stopped"
        got=$(transfer_bytes during-fault)
        detail="qemu_stopped_after_s=$i bytes_during_fault=${got:-0}"
    fi
    result=PASS
    [ -n "$why" ] && result=FAIL
    echo "NESTED mode=$mode-kill result=$result $detail${why:+ why=\"$why\"}"
    [ $result = FAIL ] && report_failure $mode-kill
}

# The guest maps every DMA buffer with H_PUT_TCE in its default 4K window (disable_ddw): the
# hypercalls the seed moved into the kernel. Then once with the guest's 64-bit DDW (created
# through ibm,create-pe-dma-window and the sidecar), which Linux maps all at once.
run_mode accelerated accelerated disable_ddw
run_mode isolated isolated disable_ddw
run_mode accelerated-ddw accelerated ""
run_fault accelerated
run_fault isolated
dmesg | grep -iE 'vfio|kvm|iommu|warn|bug' | tail -n 20
echo o >/proc/sysrq-trigger
poweroff -f
