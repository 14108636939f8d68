# shellcheck shell=bash
# Sourced by tests/lab/libvirt-l1.sh in L1 (LIBVIRT_HOST_STAGE=domain): tce-sidecar
# libvirt-install, then for each mode a KVM pseries domain made by `tce-sidecar libvirt-xml`, the
# emulated e1000e as a managed <hostdev>: start, L2's download through it, destroy, start, destroy.
# After each destroy: no sidecar process, no socket or pid file, no VFIO container open, the NIC
# back on e1000e, VmLck of every remaining process. Then the systemd units, and the kernel log.
PORT=$(sed -n 's/.*NESTED_PORT=\([^ ]*\).*/\1/p' /proc/cmdline)
BYTES=$(sed -n 's/.*NESTED_BYTES=\([^ ]*\).*/\1/p' /proc/cmdline)
MODES=$(cat /opt/lab/modes)
V="virsh -q -c qemu:///system"
CONSOLE_DIR=/var/lib/libvirt/qemu/lab
mkdir -p $CONSOLE_DIR
chown libvirt-qemu:libvirt-qemu $CONSOLE_DIR

step() { echo "STEP case=$1 step=$2 seconds=$3"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

step host modules 300
t=$(now)
modprobe kvm-hv && modprobe vfio-pci && modprobe vfio_iommu_spapr_tce || echo "L1: modprobe failed"
ls -l /dev/kvm /dev/vfio/ | sed 's/^/L1: /'
echo "L1: modules took $(since "$t") s"

# the e1000e (8086:10d3), as libvirt names PCI addresses
NIC=""
for dev in /sys/bus/pci/devices/*; do
    [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = 0x8086:0x10d3 ] && NIC=$(basename "$dev") && break
done
echo "L1: NIC $NIC on driver $(basename "$(readlink /sys/bus/pci/devices/$NIC/driver)" 2>/dev/null), group $(basename "$(readlink /sys/bus/pci/devices/$NIC/iommu_group)")"
IFS=':.' read -r pdom pbus pslot pfn <<<"$NIC"

step host libvirt-install 300
t=$(now)
/opt/lab/tce-sidecar libvirt-install 2>&1 | sed 's/^/L1: install: /'
systemctl restart libvirtd 2>&1 | sed 's/^/L1: /'
$V list >/dev/null 2>&1 || sleep 2
echo "L1: libvirt-install and restart took $(since "$t") s"
step host capabilities 600
t=$(now)
$V domcapabilities --emulatorbin /opt/tce-qemu/bin/qemu-system-ppc64 --arch ppc64le --machine pseries --virttype kvm >/tmp/domcaps.xml 2>&1 ||
    sed 's/^/L1: domcapabilities: /' /tmp/domcaps.xml
echo "L1: domcapabilities (libvirt probes QEMU) took $(since "$t") s"

vmlck_all() { # every process with VmLck > 0: "name(pid)=kB ..."
    for s in /proc/[0-9]*/status; do
        awk '/^Name:/ { n = $2 } /^Pid:/ { p = $2 } /^VmLck:/ { if ($2 > 0) printf "%s(%s)=%s ", n, p, $2 }' "$s" 2>/dev/null
    done
}
vfio_open() { # processes holding /dev/vfio/* open
    for d in /proc/[0-9]*/fd; do
        ls -l "$d" 2>/dev/null | grep -q '/dev/vfio/' && echo -n "$(basename "$(dirname "$d")") "
    done
}
vmlck_of() { awk '/^VmLck:/ { print $2 }' /proc/"$1"/status 2>/dev/null; }

# check_gone CASE: what a destroy must leave
check_gone() {
    local c=$1 left
    sleep 1
    left=$(pgrep -u tce-sidecar -l | tr '\n' ' ')
    [ -z "$left" ] || fail "$c: sidecar processes left: $left"
    left=$(ls /run/tce-sidecar 2>/dev/null | tr '\n' ' ')
    [ -z "$left" ] || fail "$c: left in /run/tce-sidecar: $left"
    left=$(vfio_open)
    [ -z "$left" ] || fail "$c: /dev/vfio still open by pids $left"
    left=$(pgrep -f qemu-system-ppc64.real | tr '\n' ' ')
    [ -z "$left" ] || fail "$c: QEMU still running: $left"
    lck=$(vmlck_all)
    [ -z "$lck" ] || fail "$c: VmLck left: $lck"
    drv=$(basename "$(readlink /sys/bus/pci/devices/$NIC/driver)" 2>/dev/null)
    echo "L1: $c: after destroy: VmLck>0: ${lck:-none}; NIC on ${drv:-no driver}; sidecars: none${left:+?}"
}
fail() { why="${why:+$why; }$*"; }

# wait_console CASE STEP SECONDS PATTERN
wait_console() {
    local t0 i=0
    step "$1" "$2" "$3"
    t0=$(now)
    while ! grep -q "$4" "$CONSOLE_DIR/$dom.log" 2>/dev/null; do
        if ! $V domstate "$dom" 2>/dev/null | grep -q running; then
            fail "$1: domain not running in step $2 ($($V domstate "$dom" --reason 2>&1))"
            return 1
        fi
        i=$((i + 1))
        if [ $i -ge "$3" ]; then
            fail "$1: step $2 ran out of time after $3 s"
            return 1
        fi
        sleep 1
    done
    echo "L1: $1: $2 took $(since "$t0") s"
}

write_domain() { # write_domain NAME UUID
    cat >/tmp/$1.base.xml <<EOF
<domain type='kvm'>
  <name>$1</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>256</currentMemory>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='ppc64le' machine='pseries'>hvm</type>
    <kernel>/opt/lab/l2/vmlinux</kernel>
    <initrd>/opt/lab/l2/initrd.gz</initrd>
    <cmdline>console=hvc0 loglevel=4 disable_ddw NESTED_PORT=$PORT</cmdline>
  </os>
  <features>
    <cfpc value='broken'/>
    <sbbc value='broken'/>
    <ibs value='broken'/>
    <ccf-assist state='off'/>
    <hpt resizing='disabled'>
      <maxpagesize unit='KiB'>4</maxpagesize>
    </hpt>
  </features>
  <cpu mode='host-passthrough'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/opt/tce-qemu/bin/qemu-system-ppc64</emulator>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x$pdom' bus='0x$pbus' slot='0x$pslot' function='0x$pfn'/>
      </source>
    </hostdev>
    <serial type='file'>
      <source path='$CONSOLE_DIR/$1.log'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-machine'/>
    <qemu:arg value='x-vof=on'/>
    <qemu:arg value='-global'/>
    <qemu:arg value='spapr-pci-host-bridge.dma_win_size=0x8000000'/>
  </qemu:commandline>
</domain>
EOF
}

# one_start CASE MODE: virsh start, L2's download, the counts, virsh destroy, the checks
one_start() {
    local c=$1 mode=$2 t0 qp sc lq ls got secs st
    t0=$(now)
    step "$c" virsh-start 600
    : >"$CONSOLE_DIR/$dom.log"
    if ! out=$($V start "$dom" 2>&1); then
        fail "$c: virsh start failed: $(echo "$out" | tr '\n' ' ')"
        echo "L1: $c: virsh start: $out"
        return 1
    fi
    echo "L1: $c: virsh start returned after $(since "$t0") s"
    qp=$(pgrep -f "qemu-system-ppc64.real.*guest=$dom" | head -n1)
    sc=$(cat /run/tce-sidecar/$uuid.pid 2>/dev/null)
    st=$(/opt/lab/tce-sidecar status --socket-path /run/tce-sidecar/$uuid.sock 2>&1 | tr -d '\n ' | cut -c1-400)
    echo "L1: $c: qemu pid ${qp:-none} user $(ps -o user= -p "${qp:-1}"), sidecar pid ${sc:-none} user $(ps -o user= -p "${sc:-1}"); status: $st"
    boot=900
    [ "$mode" = accelerated ] && boot=300
    if wait_console "$c" boot-l2 $boot '^L2-BOOTED' && wait_console "$c" network 120 '^L2-NETWORK' &&
        wait_console "$c" download $((60 + BYTES / 16384)) '^L2-DONE'; then
        got=$(sed -n 's/^L2-TRANSFER .*bytes=\([0-9]*\).*/\1/p' "$CONSOLE_DIR/$dom.log" | tr -d '\r')
        secs=$(sed -n 's/^L2-TRANSFER .*seconds=\([0-9.]*\).*/\1/p' "$CONSOLE_DIR/$dom.log" | tr -d '\r')
        [ "$got" = "$BYTES" ] || fail "$c: L2 received ${got:-nothing} of $BYTES bytes"
        lq=$(vmlck_of "$qp")
        ls=0
        for p in $(pgrep -u tce-sidecar); do ls=$((ls + $(vmlck_of "$p"))); done
        st=$(/opt/lab/tce-sidecar status --socket-path /run/tce-sidecar/$uuid.sock 2>&1 |
            sed -n 's/.*"\(updates_forwarded\|maps\)": *\([0-9]*\).*/\1=\2/p' | tr '\n' ' ')
        echo "L1: $c: bytes=$got seconds=$secs vmlck_qemu_kb=$lq vmlck_sidecar_kb=$ls $st"
        # the sidecar's workers (its children) serve sandboxed; isolated: the hook's memlock limit
        sandboxed=0
        for w in $(pgrep -P "${sc:-1}"); do
            if grep -q '^Seccomp:[[:space:]]*2$' /proc/$w/status && grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/$w/status; then
                sandboxed=$((sandboxed + 1))
            else
                fail "$c: worker $w serves without its sandbox"
            fi
        done
        [ "$sandboxed" -ge 1 ] || fail "$c: no sandboxed worker"
        echo "L1: $c: sandboxed_workers=$sandboxed sidecar $(grep 'Max locked memory' /proc/"${sc:-1}"/limits | tr -s ' ')"
        qmp=$($V qemu-monitor-command "$dom" '{"execute":"query-spapr-tce-sidecars"}' 2>&1)
        echo "L1: $c: query-spapr-tce-sidecars: $(echo "$qmp" | cut -c1-300)"
        echo "$qmp" | grep -q -E "\"mode\": *\"$mode\"" || fail "$c: QMP does not show mode $mode"
        if [ "$mode" = accelerated ]; then
            [ "${lq:-0}" -ge 262144 ] || fail "$c: QEMU VmLck ${lq} kB < guest RAM"
        else
            [ "${ls:-0}" -ge 262144 ] || fail "$c: sidecar VmLck ${ls} kB < guest RAM"
        fi
        result_detail="$result_detail $c:bytes=$got,s=$secs,lck_q=$lq,lck_s=$ls"
    else
        echo "L1: $c: console:"
        tail -n 30 "$CONSOLE_DIR/$dom.log" | sed 's/^/L1:   L2: /'
    fi
    step "$c" virsh-destroy 120
    t0=$(now)
    $V destroy "$dom" 2>&1 | sed 's/^/L1: /'
    echo "L1: $c: virsh destroy took $(since "$t0") s"
    check_gone "$c"
}

n=0
for mode in $MODES; do
    n=$((n + 1))
    dom=l2-$mode
    uuid=$(printf '6f1e0a44-58f6-4a45-9b5e-3a0b3c1d2e%02x' $n)
    why=""
    result_detail=""
    write_domain "$dom" "$uuid"
    /opt/lab/tce-sidecar libvirt-xml --mode "$mode" /tmp/$dom.base.xml >/tmp/$dom.xml
    /opt/lab/tce-sidecar libvirt-xml --mode "$mode" /tmp/$dom.xml | cmp -s - /tmp/$dom.xml ||
        fail "libvirt-xml is not idempotent"
    $V define /tmp/$dom.xml 2>&1 | sed 's/^/L1: /'
    t_mode=$(now)
    one_start "$mode/first" "$mode" && one_start "$mode/again" "$mode"
    echo "L1: journal of libvirtd (last lines):"
    journalctl -b -u libvirtd --no-pager -n 15 2>&1 | sed 's/^/L1:   /'
    ls /var/log/tce-sidecar/ >/dev/null 2>&1 && tail -n 10 /var/log/tce-sidecar/$dom.log 2>/dev/null | sed 's/^/L1:   sidecar: /'
    tail -n 20 /var/log/libvirt/qemu/$dom.log 2>/dev/null | grep -v '^spapr_iommu' | sed 's/^/L1:   qemu: /'
    $V undefine "$dom" >/dev/null 2>&1
    result=PASS
    [ -n "$why" ] && result=FAIL
    echo "LIBVIRT-PPC64 mode=$mode result=$result seconds=$(since "$t_mode")$result_detail${why:+ why=\"$why\"}"
done

# The systemd units libvirt-install put in place, for a sidecar without libvirt: systemd makes the
# socket for QEMU's user and starts the sidecar as its own user, sandboxed, on the first connection.
step host units 120
why=""
unit=tce-sidecar@unit-check
sock=/run/tce-sidecar/unit-check.sock
systemctl daemon-reload
systemctl start $unit.socket 2>&1 | sed 's/^/L1: /' || true
socket_owner=$(stat -c '%U:%a' $sock 2>/dev/null)
[ "$socket_owner" = libvirt-qemu:600 ] || fail "the socket is ${socket_owner:-missing}, not libvirt-qemu:600"
runuser -u libvirt-qemu -- /opt/lab/tce-sidecar status --socket-path $sock >/tmp/unit-status.json \
    2>/tmp/unit-status.err || fail "status as libvirt-qemu: $(tail -n 1 /tmp/unit-status.err)"
main=$(systemctl show -p MainPID --value $unit.service)
service_user=$(ps -o user= -p "$main" 2>/dev/null | tr -d ' ')
[ "$service_user" = tce-sidecar ] || fail "the service runs as ${service_user:-nothing}, not tce-sidecar"
no_new_privs=$(awk '/^NoNewPrivs:/ { print $2 }' /proc/"$main"/status 2>/dev/null)
[ "$no_new_privs" = 1 ] || fail "the service has NoNewPrivs ${no_new_privs:-unknown}"
root_refused=no
/opt/lab/tce-sidecar status --socket-path $sock >/dev/null 2>&1 || root_refused=yes
[ $root_refused = yes ] || fail "the service answered root, whose uid --allow-uid does not name"
systemctl stop $unit.service $unit.socket 2>&1 | sed 's/^/L1: /'
[ -e $sock ] && fail "the socket outlived its unit"
systemctl is-active --quiet $unit.service && fail "the service still runs"
[ -n "$why" ] && journalctl -b -u $unit.service --no-pager -n 10 2>&1 | sed 's/^/L1:   unit: /'
echo "LIBVIRT-PPC64 units result=$([ -z "$why" ] && echo PASS || echo FAIL) socket=$socket_owner service_user=${service_user:-none} no_new_privs=${no_new_privs:-none} root_refused=$root_refused${why:+ why=\"$why\"}"

# the emulated host's kernel: no WARN, no seccomp kill
kills=$(dmesg | grep -c 'audit: type=1326')
warns=$(dmesg | grep -c 'WARNING: CPU:')
echo "LIBVIRT-PPC64 kernel result=$([ "$kills$warns" = 00 ] && echo PASS || echo FAIL) seccomp_kills=$kills warns=$warns"
