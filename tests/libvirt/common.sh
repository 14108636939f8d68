# The helpers of tests/libvirt/x86.sh, sourced by it after its settings: waits and process
# checks, the case runner, the daemons (libvirtd, virtlogd), the staged binaries, the domains.
# shellcheck shell=bash

skip() {
    echo "SKIP: libvirt test ($*)"
    exit 0
}

V() { timeout 60 virsh -q -c qemu:///system "$@"; }

# wait_for SECONDS COMMAND...: true as soon as COMMAND succeeds, false once SECONDS have passed.
wait_for() {
    local end=$((SECONDS + $1))
    shift
    while :; do
        "$@" && return 0
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}
# alive PID: PID runs (a zombie does not: this machine's PID 1 may take seconds to reap one)
alive() {
    local state
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d ' ' -f 1)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
dead() { ! alive "$1"; }
all_dead() {
    local p
    for p in "$@"; do alive "$p" && return 1; done
    return 0
}
# starttime PID: when the process started, in clock ticks since boot
starttime() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $20}'; }
# exe_pids PATH: the processes running the executable PATH
exe_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
    done
    return 0
}
# sidecar_pids: every process (not a zombie) of the sidecar's copy or of its user
sidecar_pids() {
    {
        exe_pids "$SIDECAR"
        [ -n "${SIDECAR_UID:-}" ] && ps -eo pid=,uid=,stat= | awk -v u="$SIDECAR_UID" '$2 == u && $3 !~ /^[ZX]/ {print $1}'
    } | sort -un
}
no_sidecar_process() { [ -z "$(sidecar_pids)" ]; }
qemu_pids() { exe_pids "$QEMU"; }
# descendants PID: PID's children, theirs, and so on
descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1"); do
        echo "$c"
        descendants "$c"
    done
}
socket_dir_empty() { [ ! -d "$SOCKET_DIR" ] || [ -z "$(ls -A "$SOCKET_DIR")" ]; }
qemu_pid_of() { cat "/run/libvirt/qemu/$1.pid" 2>/dev/null; }
domstate() { V domstate "$1" 2>&1 | head -n 1; }
running() { [ "$(domstate "$1")" = running ]; }
new_uuid() { cat /proc/sys/kernel/random/uuid; }

# qmp DOMAIN COMMAND: QEMU's answer through libvirt's monitor, {"return": ...}
qmp() { V qemu-monitor-command "$1" "{\"execute\":\"$2\"}"; }
# sidecars DOMAIN: QMP query-spapr-tce-sidecars, its object `tce-sidecar` as JSON
sidecars() {
    local out
    out=$(qmp "$1" query-spapr-tce-sidecars) || return 1
    python3 -c '
import json, sys
r = [o for o in json.loads(sys.argv[1])["return"] if o["id"] == "tce-sidecar"]
assert len(r) == 1, sys.argv[1]
print(json.dumps(r[0], sort_keys=True))' "$out"
}
# field JSON KEY: one value of a JSON object, as text
field() {
    python3 -c '
import json, sys
v = json.loads(sys.argv[1]).get(sys.argv[2])
print(json.dumps(v) if isinstance(v, (list, dict)) else v)' "$1" "$2"
}
qmp_disconnected() { [ "$(field "$(sidecars "$1")" connected)" = False ]; }
qmp_state_is() { [ "$(field "$(sidecars "$1")" state)" = "$2" ]; }

fail() {
    CASE_ERR=$(tr '\n' ' ' <<<"$*" | cut -c1-1000)
    return 1
}
info() { CASE_INFO="${CASE_INFO:+$CASE_INFO }$*"; }

# show_logs: what a failed case prints: libvirtd's log of this run, and the QEMU and sidecar logs
# of the domains in CASE_LOGS, and the hook calls
show_logs() {
    local name f
    echo "  --- libvirtd log (this run, last 25 lines) ---"
    tail -c +$((LIBVIRTD_LOG_START + 1)) "$LIBVIRTD_LOG" 2>/dev/null | tail -n 25 | sed 's/^/  libvirtd: /'
    for name in "${CASE_LOGS[@]}"; do
        f=/var/log/libvirt/qemu/$name.log
        [ -f "$f" ] && tail -n 20 "$f" | sed "s|^|  qemu $name: |"
        f=$LOG_DIR/$name.log
        [ -f "$f" ] && tail -n 30 "$f" | sed "s|^|  sidecar $name: |"
    done
    tail -n 20 "$RECORD" | sed 's/^/  hook calls: /'
}

# run_case NAME FUNCTION: runs the case, prints its line
run_case() {
    local name=$1
    CASE_INFO="" CASE_ERR="" CASE_LOGS=()
    if "$2"; then
        echo "LIBVIRT case=$name result=PASS $CASE_INFO"
    else
        echo "LIBVIRT case=$name result=FAIL why=\"$CASE_ERR\"${CASE_INFO:+ $CASE_INFO}"
        show_logs
        FAILED+=("$name")
    fi
}

# --- the daemons ------------------------------------------------------------------------------

# spawn_daemon COMMAND...: starts a self-daemonizing COMMAND with only stdin, stdout and stderr
# open (on /dev/null), so that it holds none of this script's fds (a CPU slot's lock, a pipe of
# the caller's output).
spawn_daemon() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] && eval "exec $fd>&-"
        done 2>/dev/null
        exec "$@" </dev/null >/dev/null 2>&1
    )
}
libvirtd_pid() {
    if [ "$SYSTEMD" = 1 ]; then
        systemctl show -p MainPID --value libvirtd
    else
        cat /run/libvirtd.pid 2>/dev/null
    fi
}
pid_running() { [ -f "$1" ] && alive "$(cat "$1" 2>/dev/null)"; }
libvirtd_answers() { timeout 10 virsh -q -c qemu:///system list --all >/dev/null 2>&1; }

start_daemons() {
    if [ "$SYSTEMD" = 1 ]; then
        systemctl is-active -q libvirtd || STARTED_LIBVIRTD=1
        systemctl start virtlogd libvirtd || return 1
    else
        if ! pid_running /run/virtlogd.pid; then
            spawn_daemon virtlogd -d
            wait_for 20 pid_running /run/virtlogd.pid || return 1
            STARTED_VIRTLOGD=1
        fi
        if ! pid_running /run/libvirtd.pid; then
            spawn_daemon libvirtd -d
            STARTED_LIBVIRTD=1
        fi
    fi
    wait_for 60 libvirtd_answers
}

stop_pidfile_daemon() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    alive "$pid" || return 0
    kill -TERM "$pid"
    wait_for 30 dead "$pid" || {
        echo "libvirt: $1 ($pid) still running 30 s after SIGTERM" >&2
        return 1
    }
}

restart_libvirtd() {
    if [ "$SYSTEMD" = 1 ]; then
        systemctl restart libvirtd || return 1
    else
        stop_pidfile_daemon /run/libvirtd.pid || return 1
        spawn_daemon libvirtd -d
    fi
    wait_for 60 libvirtd_answers
}

# --- the binaries, where libvirt's QEMU user and the sidecar's user can run them ----------------

# stage_dir KIND FILE: the directory $STAGE/KIND-<hash of FILE>/ for a world-readable copy of
# FILE; removes the copies of other hashes. Prints the directory.
stage_dir() {
    local kind=$1 file=$2 hash dir old
    hash=$(sha256sum "$file" | cut -c1-16)
    dir=$STAGE/$kind-$hash
    mkdir -p "$STAGE"
    chmod 0755 "$STAGE"
    for old in "$STAGE/$kind"-*; do
        [ -e "$old" ] && [ "$old" != "$dir" ] && rm -rf "$old"
    done
    echo "$dir"
}

stage_binaries() {
    local d
    d=$(stage_dir qemu "$QEMU_BUILD") || return 1
    if [ ! -x "$d/bin/qemu-system-ppc64" ]; then
        rm -rf "$d/bin" "$d/bin.tmp"
        mkdir -p "$d/bin.tmp" &&
            cp "$QEMU_BUILD" "$d/bin.tmp/qemu-system-ppc64" &&
            mv "$d/bin.tmp" "$d/bin" || return 1
    fi
    # a relocatable QEMU (the build's default) finds its data in ../share/qemu
    mkdir -p "$d/share/qemu" &&
        cp /usr/share/qemu/slof.bin /usr/share/qemu/vof.bin "$d/share/qemu/" &&
        chmod -R a+rX "$d" || return 1
    QEMU=$d/bin/qemu-system-ppc64

    d=$(stage_dir sidecar "$TCE_SIDECAR") || return 1
    if [ ! -x "$d/tce-sidecar" ]; then
        mkdir -p "$d" &&
            cp "$TCE_SIDECAR" "$d/tce-sidecar.tmp" &&
            mv "$d/tce-sidecar.tmp" "$d/tce-sidecar" || return 1
    fi
    chmod -R a+rX "$d" || return 1
    SIDECAR=$d/tce-sidecar
}

# --- domains ----------------------------------------------------------------------------------

# domain_xml NAME UUID [HOSTDEV]: a pseries TCG domain without disks (SLOF waits at its prompt)
domain_xml() {
    cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>$MEMORY_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='ppc64' machine='pseries'>hvm</type>
  </os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$QEMU</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
EOF
    if [ -n "${3:-}" ]; then
        cat <<EOF
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x0001' bus='0x01' slot='0x00' function='0x0'/>
      </source>
    </hostdev>
EOF
    fi
    cat <<EOF
  </devices>
</domain>
EOF
}

# forget DOMAIN: destroys and undefines DOMAIN if it exists (the test's names only)
forget() {
    V domstate "$1" >/dev/null 2>&1 || return 0
    V destroy "$1" >/dev/null 2>&1
    V undefine "$1" >/dev/null 2>&1
    return 0
}

# check_xml FILE MODE UUID HOSTDEVS: what libvirt-xml must have written
check_xml() {
    python3 - "$@" "$SOCKET_DIR" <<'PY'
import sys
import xml.etree.ElementTree as ET
path, mode, uuid, hostdevs, sockets = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
TCE = "urn:x-tce-sidecar:libvirt:1"
Q = "http://libvirt.org/schemas/domain/qemu/1.0"
raw = open(path).read()
assert 'xmlns:qemu="%s"' % Q in raw.split(">", 1)[0], "no xmlns:qemu on <domain>"
d = ET.fromstring(raw)
meta = d.findall("metadata/{%s}sidecar" % TCE)
assert len(meta) == 1, "metadata: %d tce:sidecar elements" % len(meta)
assert meta[0].get("mode") == mode, "metadata mode %r" % meta[0].get("mode")
args = [a.get("value") for a in d.findall("{%s}commandline/{%s}arg" % (Q, Q))]
want = "spapr-tce-sidecar,id=tce-sidecar,path=%s/%s.sock,mode=%s" % (sockets, uuid, mode)
assert args == ["-object", want], "qemu:commandline %r, want %r" % (args, ["-object", want])
devs = d.findall("devices/hostdev")
assert len(devs) == hostdevs, "%d hostdevs" % len(devs)
overrides = d.findall("{%s}override/{%s}device" % (Q, Q))
assert len(overrides) == hostdevs, "%d qemu:override devices for %d hostdevs" % (len(overrides), hostdevs)
for n, dev in enumerate(devs):
    alias = "ua-tce-hostdev%d" % n
    a = dev.find("alias")
    assert a is not None and a.get("name") == alias, "hostdev %d: alias %r" % (n, a.attrib if a is not None else None)
    o = [o for o in overrides if o.get("alias") == alias]
    assert len(o) == 1, "no qemu:override for %s" % alias
    props = o[0].findall("{%s}frontend/{%s}property" % (Q, Q))
    assert [(p.get("name"), p.get("type"), p.get("value")) for p in props] == \
        [("spapr-tce-sidecar", "string", "tce-sidecar")], "override of %s: %r" % (alias, [p.attrib for p in props])
PY
}

# sidecar_xml NAME MODE [HOSTDEV]: writes $T/NAME.xml made by libvirt-xml from a new domain and
# checks it; sets UUID
sidecar_xml() {
    local name=$1 mode=$2 hostdev=${3:-} n=0 err
    UUID=$(new_uuid)
    [ -n "$hostdev" ] && n=1
    domain_xml "$name" "$UUID" "$hostdev" >"$T/$name.in.xml"
    "$SIDECAR" libvirt-xml --mode "$mode" "$T/$name.in.xml" >"$T/$name.xml" 2>"$T/err" ||
        fail "libvirt-xml --mode $mode failed: $(head -c 300 "$T/err")" || return 1
    "$SIDECAR" libvirt-xml --mode "$mode" "$T/$name.in.xml" >"$T/$name.again.xml" 2>/dev/null &&
        cmp -s "$T/$name.xml" "$T/$name.again.xml" ||
        fail "libvirt-xml gives another output the second time" || return 1
    "$SIDECAR" libvirt-xml --mode "$mode" <"$T/$name.xml" >"$T/$name.twice.xml" 2>"$T/err" ||
        fail "libvirt-xml of its own output (stdin) failed: $(head -c 300 "$T/err")" || return 1
    cmp -s "$T/$name.xml" "$T/$name.twice.xml" || {
        diff "$T/$name.xml" "$T/$name.twice.xml" | head -n 20 | sed 's/^/  diff: /'
        fail "libvirt-xml is not idempotent (its output changed when given again)"
        return 1
    }
    err=$(check_xml "$T/$name.xml" "$mode" "$UUID" "$n" 2>&1) ||
        fail "libvirt-xml output: $(tail -n 1 <<<"$err")" || return 1
}

# hook_calls DOMAIN OP SUBOP: the recorder's lines for that call
hook_calls() { grep "^CALL $1 $2 $3\( \|$\)" "$RECORD"; }
