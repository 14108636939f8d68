#!/bin/sh
# init of L1 in tests/lab/nested.sh: the emulated POWER9 host. Binds the e1000e (and a second one,
# which L0 adds for hostile-cross) to vfio-pci, then
# for each case named in NESTED_CASES runs the real tce-sidecar and the patched QEMU (or, in the
# stock cases, the unpatched QEMU alone, with its own in-process VFIO), whose KVM guest (L2)
# downloads a file through the passed-through NIC, and prints one `NESTED mode=… result=…` line.
#
# Every step of a case has its own deadline (tests/lab/boots.sh says how they are announced):
# sized from what the step does, several times what it takes on the machines the README's figures
# come from. A step that runs out ends its case with a FAIL line naming the step, and the next
# case begins.
export PATH=/bin LD_LIBRARY_PATH=/qemu/lib
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# The sidecar runs as nobody: it creates its socket here.
chmod 1777 /tmp
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
PORT=$(arg NESTED_PORT)
UPLOAD_PORT=$(arg NESTED_UPLOAD_PORT)
BYTES=$(arg NESTED_BYTES)
CASES=$(arg NESTED_CASES | tr , ' ')
echo "L1: kernel $(cat /proc/sys/kernel/osrelease)"
echo "STEP case=host step=load-modules seconds=120"
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "L1: insmod $m failed"; done
# The sidecar (nobody, group kvm) asks /dev/kvm what KVM supports: root:kvm 0660, as a Debian
# host's udev leaves it (kvm is gid 36 here).
chgrp 36 /dev/kvm && chmod 0660 /dev/kvm
echo "STEP case=host step=bind-vfio-pci seconds=60"
# Every e1000e, in address order: B on the first PHB serves every case; B2, on a PHB (and so in an
# IOMMU group) of its own, only hostile-cross.
B=""
B2=""
for dev in /sys/bus/pci/devices/*; do
    [ "$(cat $dev/vendor):$(cat $dev/device)" = 0x8086:0x10d3 ] || continue
    b=$(basename $dev)
    [ -e $dev/driver ] && echo $b >$dev/driver/unbind
    echo vfio-pci >$dev/driver_override
    echo $b >/sys/bus/pci/drivers_probe
    echo "L1: $b bound to $(basename $(readlink $dev/driver)), group $(basename $(readlink $dev/iommu_group))"
    if [ -z "$B" ]; then B=$b; elif [ -z "$B2" ]; then B2=$b; fi
done
CAPS=cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off,cap-hpt-max-page-size=4096

# Deadlines (seconds), sized from what each step takes under TCG on a 2-CPU x86_64 host running
# both boots of the nested lab at once, and (in brackets) with two CPU-bound busy loops beside
# them: the sidecar's start 1 s; QEMU's start to L2's init 19-31 s [51-74] in accelerated mode,
# and 61-132 s [167-313] in isolated mode, where every TCE entry L2's kernel clears at boot is a
# round trip to the sidecar; L2's network 2-5 s [4-11]; stopping QEMU or the sidecar 0-10 s; the
# reconnection 0-5 s. An 8 MiB download takes 4-11 s in accelerated mode and 44-54 s [134] in
# isolated mode (61-186 KiB/s); its deadline allows 16 KiB/s, plus a minute to set up.
SIDECAR_SECONDS=30
L2_BOOT_SECONDS=300
L2_BOOT_SECONDS_ISOLATED=900
NETWORK_SECONDS=120
STOP_SECONDS=60
RECONNECT_SECONDS=120
STOPPED_SECONDS=60
DOWNLOAD_SECONDS=$((60 + BYTES / (16 * 1024)))

uptime_s() { cut -d. -f1 /proc/uptime; }
# proc_kb PID FIELD: FIELD (VmRSS, VmLck) of PID's /proc status, in kB
proc_kb() { awk -v f="$2:" '$1 == f { print $2 }' /proc/$1/status; }
# sidecar_kb FIELD: the sum of FIELD (VmRSS, VmLck) over the sidecar and its workers (its
# children, one per session), in kB
sidecar_kb() {
    cat /proc/[0-9]*/status 2>/dev/null | awk -v p="$sc" -v f="$1:" '
        /^Name:/ { pid = "" } /^Pid:/ { pid = $2 } /^PPid:/ { pp[pid] = $2 } $1 == f { l[pid] = $2 }
        END { t = 0; for (i in l) if (i == p || pp[i] == p) t += l[i]; print t }'
}
# the pids of the sidecar's workers (its children, one per session)
sidecar_workers() {
    cat /proc/[0-9]*/status 2>/dev/null |
        awk -v p="$sc" '/^Pid:/ { pid = $2 } /^PPid:/ { if ($2 == p) print pid }'
}
count() { grep -c -E "^($1)" /tmp/q.log; }
status_field() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" /tmp/status.json | head -n1; }
fail() { why="${why:+$why; }$*"; }

# await CASE STEP SECONDS PATTERN FILE: announces STEP of CASE, then waits at most SECONDS for
# PATTERN in FILE while QEMU runs. On a time-out or QEMU's exit: fail naming the step (and, in a
# download, the bytes so far), return 1. Relays L2's download progress to the console.
await() {
    echo "STEP case=$1 step=$2 seconds=$3"
    t0=$(uptime_s)
    last=""
    while ! grep -q "$4" "$5" 2>/dev/null; do
        p=$(grep '^L2-PROGRESS ' /tmp/l2.log | tail -n1 | tr -d '\r' | sed 's/.* bytes=//')
        if [ -n "$p" ] && [ "$p" != "$last" ]; then
            last=$p
            echo "PROGRESS case=$1 download at $p bytes"
        fi
        if ! kill -0 $qp 2>/dev/null; then
            fail "QEMU exited in step $2${last:+ (download at $last bytes)}"
            return 1
        fi
        if [ $(($(uptime_s) - t0)) -ge $3 ]; then
            fail "step $2 ran out of time after $3 s${last:+ (download at $last bytes)}"
            return 1
        fi
        sleep 1
    done
    echo "L1: $1: $2 took $(($(uptime_s) - t0)) s"
}

# await_exit CASE STEP PID WHAT: announces STEP of CASE, then waits at most STOP_SECONDS for PID
# to exit; after that fails with "step STEP: WHAT" and kills it. Sets waited to the seconds waited.
await_exit() {
    echo "STEP case=$1 step=$2 seconds=$STOP_SECONDS"
    t0=$(uptime_s)
    while kill -0 $3 2>/dev/null; do
        if [ $(($(uptime_s) - t0)) -ge $STOP_SECONDS ]; then
            fail "step $2: $4 $STOP_SECONDS s later"
            kill -9 $3
            break
        fi
        sleep 1
    done
    waited=$(($(uptime_s) - t0))
    wait $3
}

# stop CASE WHAT PID: SIGTERM, then await_exit (SIGKILL after STOP_SECONDS)
stop() {
    kill $3 2>/dev/null
    await_exit $1 stop-$2 $3 "still running after SIGTERM"
}

# start_sidecar CASE: a fresh sidecar on /tmp/sc.sock; sets sc
# It runs as nobody in group kvm, allowing root's QEMU. Its worker has no capability, so in
# isolated mode the guest RAM and TCE tables it pins count against its locked-memory limit:
# 512 MiB for L2's 256 MiB and the tables, SIDECAR_MEMLOCK_KB when a case sets it (hot-plug).
start_sidecar() {
    echo "STEP case=$1 step=start-sidecar seconds=$SIDECAR_SECONDS"
    rm -f /tmp/sc.sock
    # shellcheck disable=SC3045 # busybox sh has ulimit -l
    (ulimit -l ${SIDECAR_MEMLOCK_KB:-524288} && exec /lab_frontend run-as 65534:36 \
        /tce-sidecar --socket-path /tmp/sc.sock --allow-uid 0) >>/tmp/sc.log 2>&1 &
    sc=$!
    i=0
    while [ ! -S /tmp/sc.sock ]; do
        [ $i -ge $SIDECAR_SECONDS ] && {
            fail "step start-sidecar: no socket after $SIDECAR_SECONDS s"
            return 1
        }
        sleep 1
        i=$((i + 1))
    done
}

# serial_reader: L2's console, from the FIFO QEMU writes it to (/tmp/l2.out), appended to
# /tmp/l2.log line by line; every L2-* line is also appended to /tmp/l2.at after L1's uptime (in
# centiseconds, as /proc/uptime has it) at its arrival. Only shell builtins run per line, and the
# reader blocks on the FIFO rather than polling it, so a moment of L2's (network_ms) is measured
# to the centisecond, not to the await loop's second.
serial_reader() {
    while IFS= read -r line || [ -n "$line" ]; do
        read -r up _ </proc/uptime
        printf '%s\n' "$line" >>/tmp/l2.log
        case $line in L2-*) printf '%s %s\n' "$up" "$line" >>/tmp/l2.at ;; esac
    done </tmp/l2.out
}

# start_qemu MODE GUEST_ARGS [SOCKET [QEMU_ARGS]]: the L2 guest with the NIC on a sidecar-backed
# container, the sidecar reached at SOCKET (default /tmp/sc.sock), QEMU_ARGS added; sets qp, rp
# (serial_reader) and qemu_started (L1's uptime when QEMU was started). MODE stock: the unpatched
# QEMU (/qemu/bin/qemu-system-ppc64-stock) with the NIC on its own VFIO container, no sidecar.
# A restarted sidecar is back within seconds; reconnect-attempts=$RECONNECT_SECONDS (1 s apart)
# keeps the reconnection case within its deadline rather than within the default 10 s. The
# default DMA window is 128 MiB (32768 entries), not 1 GiB: ample for the NIC's buffers, and L2's
# kernel clears the whole window at boot, which in isolated mode is a round trip to the sidecar
# per entry.
start_qemu() {
    q_mode=$1
    q_guest=$2
    q_socket=${3:-/tmp/sc.sock}
    q_extra=$4
    if [ "$q_mode" = stock ]; then
        q_bin=/qemu/bin/qemu-system-ppc64-stock
        set -- -device vfio-pci,host=$B -trace 'vfio_spapr_*' -trace 'vfio_prereg_*'
    else
        q_bin=/qemu/bin/qemu-system-ppc64
        # shellcheck disable=SC2086 # QEMU_ARGS are words
        set -- -object spapr-tce-sidecar,id=sc0,path=$q_socket,mode=$q_mode,reconnect-attempts=$RECONNECT_SECONDS \
            -device vfio-pci,host=$B,spapr-tce-sidecar=sc0 $q_extra \
            -trace 'vfio_sidecar_*' -trace 'vfio_spapr_*'
    fi
    rm -f /tmp/l2.in /tmp/l2.out
    mkfifo /tmp/l2.in /tmp/l2.out
    serial_reader &
    rp=$!
    read -r qemu_started _ </proc/uptime
    $q_bin -L /qemu/share \
        -M pseries,accel=kvm,x-vof=on,$CAPS,memory-backend=ram0 -cpu host -m ${Q_MEM:-256M} -smp 1 \
        -object memory-backend-memfd,id=ram0,size=256M,share=on \
        -global spapr-pci-host-bridge.dma_win_size=0x8000000 \
        -nographic -nodefaults -monitor none -serial pipe:/tmp/l2 \
        -qmp unix:/tmp/qmp.sock,server=on,wait=off \
        -kernel /l2/vmlinux -initrd /l2/initrd.gz \
        -append "console=hvc0 loglevel=4 NESTED_PORT=$PORT NESTED_UPLOAD_PORT=$UPLOAD_PORT $q_guest" \
        "$@" \
        -trace 'spapr_iommu_put' -trace 'spapr_iommu_indirect' -trace 'spapr_iommu_stuff' \
        -trace 'spapr_iommu_pci_put' -trace 'spapr_iommu_pci_indirect' \
        -trace 'spapr_iommu_pci_stuff' \
        >/tmp/q.log 2>&1 &
    qp=$!
}

# network_ms: the milliseconds from QEMU's start to L2's L2-NETWORK line (serial_reader's
# stamps, both from L1's /proc/uptime), or nothing if it never came
network_ms() {
    awk -v s="$qemu_started" '$2 == "L2-NETWORK" { printf "%d", ($1 - s) * 1000 + 0.5; exit }' /tmp/l2.at
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
    if [ -s /tmp/proxy.log ]; then
        echo "--- proxy ($1)"
        cat /tmp/proxy.log
    fi
}

# start_proxy CASE: the hostile proxy (lab_frontend cross-proxy) on /tmp/proxy.sock, in front of
# the sidecar's /tmp/sc.sock; sets pp
start_proxy() {
    echo "STEP case=$1 step=start-proxy seconds=$SIDECAR_SECONDS"
    rm -f /tmp/proxy.sock
    /lab_frontend cross-proxy /tmp/proxy.sock /tmp/sc.sock >/tmp/proxy.log 2>&1 &
    pp=$!
    i=0
    while [ ! -S /tmp/proxy.sock ]; do
        [ $i -ge $SIDECAR_SECONDS ] && {
            fail "step start-proxy: no socket after $SIDECAR_SECONDS s"
            return 1
        }
        sleep 1
        i=$((i + 1))
    done
}

# begin CASE MODE GUEST_ARGS [QEMU_ARGS]: fresh logs, a sidecar (for hostile-cross with the proxy in
# front of it; none for MODE stock), the guest booted with its network up. Returns 1 (with why
# set) if a step failed.
begin() {
    : >/tmp/l2.log
    : >/tmp/l2.at
    : >/tmp/sc.log
    : >/tmp/status.json
    : >/tmp/proxy.log
    why=""
    qp=""
    rp=""
    pp=""
    sc=""
    lck_qemu=""
    lck_sidecar=""
    rss_qemu=""
    rss_sidecar=""
    if [ $2 = stock ]; then
        start_qemu stock "$3"
        await $1 boot-l2 $L2_BOOT_SECONDS '^L2-BOOTED' /tmp/l2.log &&
            await $1 guest-network $NETWORK_SECONDS '^L2-NETWORK' /tmp/l2.log
        return
    fi
    start_sidecar $1 || return 1
    socket=/tmp/sc.sock
    if [ $1 = hostile-cross ]; then
        start_proxy $1 || return 1
        socket=/tmp/proxy.sock
    fi
    start_qemu $2 "$3" $socket "$4"
    boot_seconds=$L2_BOOT_SECONDS
    [ $2 = isolated ] && boot_seconds=$L2_BOOT_SECONDS_ISOLATED
    await $1 boot-l2 $boot_seconds '^L2-BOOTED' /tmp/l2.log &&
        await $1 guest-network $NETWORK_SECONDS '^L2-NETWORK' /tmp/l2.log
}

# end CASE: stops what still runs of QEMU, the proxy and the sidecar; once QEMU is gone, its
# serial_reader reads the rest of the FIFO and ends (it is killed if it has not 10 s later: a QEMU
# that never opened the FIFO)
end() {
    [ -n "$qp" ] && kill -0 $qp 2>/dev/null && stop $1 qemu $qp
    [ -n "$pp" ] && kill -0 $pp 2>/dev/null && stop $1 proxy $pp
    [ -n "$sc" ] && kill -0 $sc 2>/dev/null && stop $1 sidecar $sc
    if [ -n "$rp" ]; then
        i=0
        while kill -0 $rp 2>/dev/null && [ $i -lt 10 ]; do
            sleep 1
            i=$((i + 1))
        done
        kill $rp 2>/dev/null
        wait $rp 2>/dev/null
        rp=""
    fi
    return 0
}

# verdict CASE DETAIL: the case's summary line
verdict() {
    # A worker killed by its seccomp filter leaves an audit record (the kernel logs it even
    # without auditd); none may appear.
    kills=$(dmesg | grep -c 'audit: type=1326')
    [ "$kills" = 0 ] || fail "$kills seccomp kills in the kernel log"
    result=PASS
    [ -n "$why" ] && result=FAIL
    echo "NESTED mode=$1 result=$result $2${why:+ why=\"$why\"}"
    [ $result = FAIL ] && report_failure $1
}

# run_transfer NAME MODE GUEST_ARGS: NAME names the summary line, MODE is the sidecar's mode, or
# stock for the unpatched QEMU without a sidecar. Measured in every one: the download's
# throughput, the time from QEMU's start to L2's network (network_ms), and, while the VM runs
# after the download, the RSS and VmLck of QEMU and of the sidecar (listener and workers).
run_transfer() {
    name=$1
    mode=$2
    guest_args=$3
    sandboxed=0
    [ $mode = stock ] && sandboxed=none
    if begin $name $mode "$guest_args" && await $name download $DOWNLOAD_SECONDS '^L2-DONE' /tmp/l2.log; then
        rss_qemu=$(proc_kb $qp VmRSS)
        lck_qemu=$(proc_kb $qp VmLck)
        if [ $mode != stock ]; then
            /tce-sidecar status --socket-path /tmp/sc.sock >/tmp/status.json 2>&1
            rss_sidecar=$(sidecar_kb VmRSS)
            lck_sidecar=$(sidecar_kb VmLck)
            for w in $(sidecar_workers); do
                if grep -q '^Seccomp:[[:space:]]*2$' /proc/$w/status &&
                    grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/$w/status; then
                    sandboxed=$((sandboxed + 1))
                else
                    fail "worker $w serves without its sandbox"
                fi
            done
            [ "$sandboxed" -ge 1 ] || fail "no worker serves QEMU's session"
        fi
    fi
    end $name
    net_ms=$(network_ms)
    transfer=$(grep -m1 '^L2-TRANSFER name=first ' /tmp/l2.log | tr -d '\r')
    got=$(echo "$transfer" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p')
    secs=$(echo "$transfer" | sed -n 's/.* seconds=\([0-9.]*\).*/\1/p')
    rate=$(awk -v b="${got:-0}" -v s="${secs:-0}" 'BEGIN { if (s > 0) printf "%d", b / 1024 / s; else print 0 }')
    fallbacks=$(count 'spapr_iommu_(pci_)?(put|indirect|stuff) ')
    qemu_updates=$(count 'vfio_sidecar_tce_update ')
    if [ $mode = stock ]; then
        windows=$(count 'vfio_spapr_create_window ')
    else
        windows=$(count 'vfio_sidecar_window_create ')
    fi
    sc_updates=$(status_field updates_forwarded)
    sc_maps=$(status_field maps)
    [ "$got" = "$BYTES" ] || fail "L2 received ${got:-nothing} of $BYTES bytes"
    [ -n "$net_ms" ] || fail "no L2-NETWORK line"
    if [ $mode != stock ]; then
        [ "$qemu_updates" = "${sc_updates:-x}" ] ||
            fail "QEMU forwarded $qemu_updates updates, the sidecar counted ${sc_updates:-none}"
    fi
    case $guest_args in
    *disable_ddw*) want_windows=1 ;;
    *) want_windows=2 ;;
    esac
    via="through the sidecar"
    [ $mode = stock ] && via="by QEMU's VFIO"
    [ "$windows" -ge $want_windows ] ||
        fail "$windows windows created $via, expected $want_windows"
    if [ $mode = accelerated ]; then
        # the guest's TCE hypercalls complete in L1's KVM; only H_TOO_HARD ones reach QEMU
        [ "$fallbacks" -le 16 ] || fail "$fallbacks hypercalls reached QEMU"
        [ "${lck_qemu:-0}" -ge 262144 ] || fail "QEMU VmLck ${lck_qemu} kB < guest RAM"
    elif [ $mode = stock ]; then
        # QEMU's own VFIO container. L1's KVM has KVM_CAP_SPAPR_TCE_VFIO, so QEMU leaves each
        # window's TCE table in KVM and attaches it to the group (KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
        # traced as vfio_spapr_group_attach): the guest's TCE hypercalls complete in L1's KVM, in
        # the 4K window as with the DDW, and only H_TOO_HARD ones reach QEMU. QEMU preregisters
        # guest RAM (VFIO_IOMMU_SPAPR_REGISTER_MEMORY), which counts in its VmLck.
        attached=$(count 'vfio_spapr_group_attach ')
        [ "$attached" -ge 1 ] || fail "QEMU attached no TCE table to the group in KVM"
        [ "$fallbacks" -le 16 ] || fail "$fallbacks hypercalls reached QEMU"
        [ "${lck_qemu:-0}" -ge 262144 ] || fail "QEMU VmLck ${lck_qemu} kB < guest RAM"
    else
        # every TCE hypercall exits to QEMU and is forwarded; the sidecar pins guest RAM
        [ "$fallbacks" -ge 1 ] || fail "no hypercall reached QEMU"
        [ "${lck_sidecar:-0}" -ge 262144 ] || fail "sidecar VmLck ${lck_sidecar} kB < guest RAM"
        [ "${lck_qemu:-0}" -lt 262144 ] || fail "QEMU VmLck ${lck_qemu} kB holds guest RAM"
    fi
    check_eeh $mode
    if [ $name = isolated ]; then
        # in the 4K window each H_PUT_TCE is one TCE_UPDATE: QEMU sends no more than 10% more
        # requests than it handled hypercalls
        [ $((qemu_updates * 10)) -le $((fallbacks * 11)) ] ||
            fail "QEMU sent $qemu_updates TCE_UPDATE requests for $fallbacks hypercalls (more than 1.1 x)"
    fi
    verdict $name "bytes=${got:-0} seconds=${secs:-0} kib_per_s=$rate network_ms=${net_ms:-none} hypercalls_in_qemu=$fallbacks forwarded_qemu=$qemu_updates forwarded_sidecar=${sc_updates:-none} maps_sidecar=${sc_maps:-none} windows=$windows rss_qemu_kb=${rss_qemu:-none} vmlck_qemu_kb=${lck_qemu:-none} rss_sidecar_kb=${rss_sidecar:-none} vmlck_sidecar_kb=${lck_sidecar:-none} sandboxed_workers=$sandboxed $eeh"
}

# check_eeh MODE: EEH as L2 saw it (L2-EEH: the kernel found the PHB capable, the NIC's PE
# state read through RTAS) and, with the sidecar, the EEH_OP requests QEMU sent for the guest's
# RTAS calls (vfio_sidecar_eeh_op: ENABLE (1) for ibm,set-eeh-option, GET_STATE (4) for
# ibm,read-slot-reset-state2), each answered. Sets eeh to the words for the case's line.
check_eeh() {
    l2eeh=$(grep -m1 '^L2-EEH ' /tmp/l2.log | tr -d '\r')
    capable=$(echo "$l2eeh" | sed -n 's/.* capable=\([0-9]*\).*/\1/p')
    pe_state=$(echo "$l2eeh" | sed -n 's/.* pe_state="0x\([0-9a-f]*\) .*/\1/p')
    [ "${capable:-0}" -ge 1 ] || fail "L2 found no EEH-capable adapter: ${l2eeh:-no L2-EEH line}"
    # 0x78: MMIO and DMA active and enabled, the state of a PE that works
    [ "$pe_state" = 00000078 ] || fail "L2 read the PE state ${pe_state:-nothing}, not 0x78"
    eeh="eeh_capable=${capable:-0} eeh_pe_state=0x${pe_state:-none}"
    [ $1 = stock ] && return
    eeh_enable=$(count 'vfio_sidecar_eeh_op container [0-9]* op 1: 0$')
    eeh_state=$(count 'vfio_sidecar_eeh_op container [0-9]* op 4: 0$')
    eeh_failed=$(count 'vfio_sidecar_eeh_op container [0-9]* op [0-9]*: -')
    [ "$eeh_enable" -ge 1 ] || fail "no EEH_OP ENABLE answered through the sidecar"
    [ "$eeh_state" -ge 1 ] || fail "no EEH_OP GET_STATE answered through the sidecar"
    [ "$eeh_failed" = 0 ] || fail "$eeh_failed EEH_OP requests failed"
    eeh="$eeh eeh_op_enable=$eeh_enable eeh_op_get_state=$eeh_state"
}

# qmp COMMAND [ARGUMENTS]: one QMP command on L1's QEMU; prints its reply
qmp() { /lab_frontend qmp /tmp/qmp.sock "$@" 2>&1; }

# refuse_dimm ID BACKEND REASON WHAT: hot-plugs a 256 MiB DIMM on backend ID (BACKEND: its
# object-add properties but size), which QEMU must refuse before plugging it, saying REASON;
# counts it in refused and keeps QEMU's message in refusal, else fails naming WHAT
refuse_dimm() {
    qmp object-add "{\"id\": \"$1\", \"size\": 268435456, $2}" >/dev/null
    r=$(qmp device_add "{\"driver\": \"pc-dimm\", \"id\": \"dimm-$1\", \"memdev\": \"$1\"}")
    if echo "$r" | grep -q "$3"; then
        refused=$((refused + 1))
        refusal=$(echo "$r" | sed -n 's/.*"desc": "\([^"]*\)".*/\1/p')
    else
        fail "$4 was not refused before plugging: $r"
    fi
}

# run_hotplug MODE: RAM hot-plug with the sidecar in MODE, the guest using its DDW (whose
# mapping of all of guest RAM Linux extends to RAM it onlines). QEMU has room for one DIMM
# (-m 256M,slots=2,maxmem=1G); the guest onlines hot-plugged RAM as movable. Once L2's network is
# up, L1 hot-plugs DIMMs whose backend the sidecar cannot use (private RAM; in isolated mode
# also a memfd without seals), which QEMU must refuse before plugging them, then a 256 MiB DIMM
# on a sealed shared memfd, which QEMU must register with the sidecar (MEM_ADD). L2 downloads
# the blob into that RAM and sends it back from there, so the NIC's DMA reads the DIMM (see
# hotplug in l2-init.sh); L0 must have received it intact. Then L1 unplugs the DIMM, which the
# guest releases and QEMU removes from the sidecar (MEM_REMOVE).
run_hotplug() {
    mode=$1
    name=hotplug-$mode
    refused=0
    refusal=""
    # the DIMM, pinned by the sidecar in isolated mode, on top of its usual limit
    SIDECAR_MEMLOCK_KB=$((524288 + 262144))
    Q_MEM=256M,slots=2,maxmem=1G
    if begin $name $mode "NESTED_HOTPLUG=$name memhp_default_state=online_movable" &&
        await $name hotplug-ready $NETWORK_SECONDS '^L2-HOTPLUG-READY' /tmp/l2.log; then
        refuse_dimm private '"qom-type": "memory-backend-ram"' \
            'is not shared memory with a file descriptor' "a DIMM on private RAM"
        [ $mode = isolated ] &&
            refuse_dimm unsealed '"qom-type": "memory-backend-memfd", "share": true, "seal": false' \
                'is not a memfd sealed against shrinking' "a DIMM on an unsealed memfd"
        qmp object-add '{"qom-type": "memory-backend-memfd", "id": "mem1", "size": 268435456, "share": true}' >/dev/null
        r=$(qmp device_add '{"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"}')
        echo "$r" | grep -q '"return"' || fail "device_add of the memfd DIMM: $r"
        if await $name hotplug-added $STOP_SECONDS '^L2-HOTPLUG-ADDED' /tmp/l2.log &&
            await $name hotplug-upload $DOWNLOAD_SECONDS '^L2-HOTPLUG-RELEASED' /tmp/l2.log; then
            r=$(qmp device_del '{"id": "dimm1"}')
            echo "$r" | grep -q '"return"' || fail "device_del of the DIMM: $r"
            await $name hotplug-removed $STOP_SECONDS '^L2-HOTPLUG-REMOVED' /tmp/l2.log
            memory_devices=$(qmp query-memory-devices)
            echo "$memory_devices" | grep -q '"return": \[\]' ||
                fail "QEMU still lists memory devices after the unplug: $memory_devices"
        fi
    fi
    end $name
    unset SIDECAR_MEMLOCK_KB Q_MEM
    added=$(grep -m1 '^L2-HOTPLUG-ADDED ' /tmp/l2.log | tr -d '\r')
    upload=$(grep -m1 '^L2-HOTPLUG-UPLOAD ' /tmp/l2.log | tr -d '\r')
    removed=$(grep -m1 '^L2-HOTPLUG-REMOVED ' /tmp/l2.log | tr -d '\r')
    bytes=$(echo "$upload" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p')
    movable_kb=$(echo "$upload" | sed -n 's/.* movable_kb=\([0-9]*\).*/\1/p')
    sent=$(echo "$upload" | sed -n 's/.* sent_sha256=\([0-9a-f]*\).*/\1/p')
    received=$(echo "$upload" | sed -n 's/.* received="bytes=\([0-9]*\) sha256=\([0-9a-f]*\)".*/\1 \2/p')
    # the DIMM's RAM is registered and removed: not the boot RAM at guest address 0
    mem_add=$(count 'vfio_sidecar_mem_add region [0-9]* guest 0x[1-9a-f][0-9a-f]* size 0x10000000: 0$')
    mem_remove=$(count 'vfio_sidecar_mem_remove region [0-9]* guest 0x[1-9a-f][0-9a-f]* size 0x10000000: 0$')
    [ "$bytes" = "$BYTES" ] || fail "L2 downloaded ${bytes:-nothing} of $BYTES bytes into the DIMM"
    # the blob's pages came from the DIMM: the Movable zone, which only it fills, grew by them
    [ "${movable_kb:-0}" -ge $((BYTES / 1024 * 9 / 10)) ] ||
        fail "the blob took ${movable_kb:-no} kB of the DIMM's RAM, not ${BYTES} bytes"
    [ -n "$sent" ] && [ "$received" = "$BYTES $sent" ] ||
        fail "L0 received ${received:-nothing} for ${BYTES} bytes of sha256 ${sent:-unknown}"
    [ "$mem_add" = 1 ] || fail "$mem_add MEM_ADD of the DIMM answered, not 1"
    [ "$mem_remove" = 1 ] || fail "$mem_remove MEM_REMOVE of the DIMM answered, not 1"
    echo "$removed" | grep -q ' movable_pages=0 ' || fail "L2 did not release the DIMM: ${removed:-no line}"
    verdict $name "refused_before_plug=$refused mem_add=$mem_add mem_remove=$mem_remove bytes_from_dimm=${bytes:-0} dimm_kb_used=${movable_kb:-0} upload_intact=$([ "$received" = "$BYTES $sent" ] && echo yes || echo no) ${added#L2-HOTPLUG-ADDED } refusal=\"$refusal\""
}

# qmp_status: query-status on L1's QEMU; sets qmp_ms (the round trip) and vm_status
qmp_status() {
    reply=$(/lab_frontend qmp /tmp/qmp.sock query-status 2>&1)
    qmp_ms=$(echo "$reply" | sed -n 's/^QMP ms=\([0-9]*\) .*/\1/p')
    vm_status=$(echo "$reply" | sed -n 's/.*"status": "\([a-z-]*\)".*/\1/p')
    [ -n "$qmp_ms" ] || { fail "query-status: $reply"; qmp_ms=99999; }
}

# run_fault MODE FAULT: while the guest downloads, the sidecar is killed (SIGKILL, FAULT kill;
# a new one is started) or stopped (SIGSTOP, FAULT stop; then SIGCONT). QEMU stops the VM
# (the session ended, or a TCE update missed its deadline) and keeps answering QMP. Accelerated,
# killed: a new session adopts what the kernel kept, the VM runs again, the download completes.
# Isolated, stopped: the session stalls until the late reply comes, then goes on, and the
# download completes. Isolated, killed: the kernel keeps the group in the dead worker's container
# while QEMU holds the device, so QEMU holds the VM stopped and says why.
run_fault() {
    mode=$1
    fault=$2
    name=$mode-$fault
    slowest=0
    if ! begin $name $mode "disable_ddw NESTED_FAULT=$fault" ||
        ! await $name start-download $NETWORK_SECONDS '^L2-FAULT-START' /tmp/l2.log; then
        end $name
        verdict $name "bytes_during_fault=0"
        return
    fi
    sleep 1
    workers=$(sidecar_workers)
    if [ $fault = kill ]; then
        # The whole sidecar crashes: the session's worker as well as the listener.
        kill -9 $workers $sc
        wait $sc
    else
        kill -STOP $sc $workers
    fi
    # Until QEMU stops the VM (at once for a crash; for a stopped sidecar when a vCPU's TCE
    # update misses its 5 s deadline, which it waits for without the BQL) and after, QMP answers.
    echo "STEP case=$name step=vm-stopped seconds=$STOPPED_SECONDS"
    t0=$(uptime_s)
    while :; do
        qmp_status
        [ "$qmp_ms" -gt "$slowest" ] && slowest=$qmp_ms
        [ "$vm_status" = io-error ] && break
        if [ $(($(uptime_s) - t0)) -ge $STOPPED_SECONDS ]; then
            fail "step vm-stopped: the VM is $vm_status $STOPPED_SECONDS s after the fault"
            break
        fi
        sleep 1
    done
    echo "L1: $name: VM $vm_status after $(($(uptime_s) - t0)) s; slowest query-status ${slowest} ms"
    [ "$slowest" -lt 1000 ] || fail "query-status took $slowest ms while the sidecar was gone"
    grep -q "spapr-tce-sidecar 'sc0': stopping the VM: " /tmp/q.log || fail "QEMU did not say why it stopped the VM"
    if [ $fault = kill ]; then
        sleep 2
        start_sidecar $name || true
    else
        kill -CONT $sc $workers
    fi
    if [ $fault = kill ] && [ $mode = isolated ]; then
        # The dead worker's container keeps the group while QEMU holds the device open, so no
        # new session can attach it: QEMU says so at its first attempt and holds the VM stopped.
        if await $name rebuild-refused $RECONNECT_SECONDS 'cannot describe the VFIO devices to the session' /tmp/q.log; then
            qmp_status
            [ "$vm_status" = io-error ] || fail "the VM is $vm_status, not held stopped"
        fi
        refused=$(grep -m1 'cannot describe the VFIO devices to the session' /tmp/q.log | sed 's/.*to the session: //' | tr -d '"')
        end $name
        grep -q 'lost the session with the tce-sidecar' /tmp/q.log || fail "QEMU did not report the loss"
        verdict $name "vm_held_stopped=${vm_status:-unknown} slowest_query_status_ms=$slowest rebuild_refused=\"$refused\""
        return
    fi
    if await $name vm-runs-again $RECONNECT_SECONDS 'the VM runs again' /tmp/q.log &&
        await $name download-across-fault $DOWNLOAD_SECONDS '^L2-DONE' /tmp/l2.log; then
        /tce-sidecar status --socket-path /tmp/sc.sock >/tmp/status.json 2>&1
        qmp_status
        [ "$vm_status" = running ] || fail "the VM is $vm_status after the download"
    fi
    end $name
    got=$(transfer_bytes during-fault)
    [ "$got" = "$BYTES" ] || fail "L2 received ${got:-nothing} of $BYTES bytes across the fault"
    if [ $fault = kill ]; then
        # a new session adopted what the kernel kept (REBUILD)
        grep -q 'lost the session with the tce-sidecar' /tmp/q.log || fail "QEMU did not report the loss"
        grep -q 'reconnected to the tce-sidecar' /tmp/q.log || fail "QEMU did not reconnect"
    else
        # the session stalled, then went on when the late reply came
        grep -q 'waiting for it' /tmp/q.log || fail "QEMU did not say it waits for the late reply"
        grep -q 'the late reply to TCE_UPDATE came' /tmp/q.log || fail "QEMU did not read the late reply"
        grep -q 'lost the session' /tmp/q.log && fail "QEMU ended the stalled session"
    fi
    grep -q "\"mode\": \"$mode\"" /tmp/status.json || fail "no $mode session in the sidecar"
    groups=$(grep -c '"iommu_group"' /tmp/status.json)
    windows=$(grep -c '"has_window": true' /tmp/status.json)
    [ "$groups" -ge 1 ] && [ "$windows" -ge 1 ] ||
        fail "the session knows $groups groups and $windows windows"
    verdict $name "bytes_during_fault=${got:-0} slowest_query_status_ms=$slowest groups_in_session=$groups windows_in_session=$windows"
}

# hostile-cross: a hostile back-end names another container's group, and QEMU refuses it. L2 has a
# second PHB (spapr-pci-host-bridge) with the second NIC, so the session has two containers. The
# proxy between QEMU and the sidecar (lab_frontend cross-proxy) rewrites the KVM_SET_SPAPR_TCE of
# the second container's first window (made at machine reset) to name the group of the first
# container. QEMU must answer it -EPERM without making the call and say so; the sidecar rolls that
# window back, QEMU says the second PHB's devices cannot DMA and runs on, and the guest's download
# through the first NIC completes. The rollback deletes the second group's file from the kvm-vfio
# device, which never had an association: Linux warns about that once
# (kvm_spapr_tce_release_vfio_group), and nested.sh expects that warning in this case's boot.
run_hostile_cross() {
    name=hostile-cross
    vm_status=""
    if [ -z "$B2" ]; then
        why="L1 has no second e1000e (nested.sh adds it to a boot of hostile-cross alone)"
        verdict $name "proxy_answer=none"
        return
    fi
    begin $name accelerated disable_ddw \
        "-device spapr-pci-host-bridge,index=1,id=phb1 -device vfio-pci,host=$B2,bus=phb1.0,spapr-tce-sidecar=sc0" &&
        await $name proxy-answer $NETWORK_SECONDS '^CROSS-PROXY answer' /tmp/proxy.log &&
        await $name download $DOWNLOAD_SECONDS '^L2-DONE' /tmp/l2.log
    if [ -n "$qp" ] && kill -0 $qp 2>/dev/null; then
        qmp_status
        /tce-sidecar status --socket-path /tmp/sc.sock >/tmp/status.json 2>&1
    fi
    end $name
    grep '^CROSS-PROXY' /tmp/proxy.log | sed 's/^/L1: proxy: /'
    grep -E 'refused KVM_SET_SPAPR_TCE|cannot DMA through this window' /tmp/q.log | sed 's/^/L1: /'
    answer=$(sed -n 's/^CROSS-PROXY answer status=\([-0-9a-z]*\).*/\1/p' /tmp/proxy.log | head -n1)
    [ "$answer" = -1 ] || fail "QEMU answered the rewritten operation with status ${answer:-nothing}, not -1 (EPERM)"
    refusals=$(grep -c "refused KVM_SET_SPAPR_TCE (container [0-9]*, object [0-9]*, aux 0x[0-9a-f]*) in the reply to WINDOW_CREATE: it names something the request does not concern" /tmp/q.log)
    [ "$refusals" = 1 ] || fail "QEMU warned of $refusals refused operations, not 1"
    grep -q 'cannot DMA through this window' /tmp/q.log || fail "QEMU did not say which window it went on without"
    [ "$vm_status" = running ] || fail "the VM is ${vm_status:-unknown} after the refusal"
    got=$(transfer_bytes first)
    [ "$got" = "$BYTES" ] || fail "L2 received ${got:-nothing} of $BYTES bytes"
    groups=$(grep -c '"iommu_group"' /tmp/status.json)
    windows=$(grep -c '"has_window": true' /tmp/status.json)
    [ "$groups" = 2 ] && [ "$windows" = 1 ] ||
        fail "the session knows $groups groups and $windows windows, not 2 and 1 (the refused one rolled back)"
    warnings=$(dmesg | grep -c 'WARNING: CPU: .* kvm_spapr_tce_release_vfio_group')
    verdict $name "proxy_answer=${answer:-none} qemu_refusals=$refusals vm=${vm_status:-unknown} bytes=${got:-0} groups_in_session=$groups windows_in_session=$windows kvm_vfio_release_warnings=$warnings"
}

# accelerated and isolated: the guest maps every DMA buffer with H_PUT_TCE in its default 4K
# window (disable_ddw), the hypercalls the seed moved into the kernel; accelerated-ddw and
# isolated-ddw: the guest's 64-bit DDW (created through ibm,create-pe-dma-window and the sidecar),
# which Linux maps all at once; stock and stock-ddw: the same guest, NIC and download under the
# unpatched QEMU (its own VFIO container, in-process; no sidecar), in the 4K window and with the
# DDW, the baselines of the comparison nested.sh prints; *-kill: the sidecar dies during a
# download; isolated-stop: the sidecar is stopped (SIGSTOP) during a download, then continued.
for c in $CASES; do
    case $c in
    accelerated | isolated) run_transfer $c $c disable_ddw ;;
    accelerated-ddw) run_transfer $c accelerated "" ;;
    isolated-ddw) run_transfer $c isolated "" ;;
    stock | stock-ddw)
        if [ ! -x /qemu/bin/qemu-system-ppc64-stock ]; then
            echo "NESTED mode=$c result=FAIL why=\"no stock QEMU in L1 (nested.sh leaves the case out then)\""
        elif [ $c = stock ]; then
            run_transfer $c stock disable_ddw
        else
            run_transfer $c stock ""
        fi
        ;;
    accelerated-kill) run_fault accelerated kill ;;
    isolated-kill) run_fault isolated kill ;;
    isolated-stop) run_fault isolated stop ;;
    hostile-cross) run_hostile_cross ;;
    hotplug-accelerated) run_hotplug accelerated ;;
    hotplug-isolated) run_hotplug isolated ;;
    *) echo "NESTED mode=$c result=FAIL why=\"unknown case\"" ;;
    esac
done
echo "STEP case=host step=power-off seconds=60"
dmesg | grep -iE 'vfio|kvm|iommu|warn|bug' | tail -n 20
echo o >/proc/sysrq-trigger
poweroff -f
