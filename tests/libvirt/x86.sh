#!/usr/bin/env bash
# The libvirt integration on x86_64, with Debian's real libvirtd: pseries TCG domains run by the
# patched QEMU of qemu-patches/ (its x86_64 build, as qemu-patches/check leaves it), each given a
# tce-sidecar instance by the project's libvirt hook, on the model kernel (x86_64 has no sPAPR
# VFIO). Run as root.
#
#   install           `tce-sidecar libvirt-install --bin COPY` puts the hook, the unit and the user
#                     in place; /etc/tce-sidecar/libvirt.conf says `kernel = model`; libvirtd is
#                     restarted so that it sees the hook
#   no-sidecar        a domain without the sidecar's metadata starts and is destroyed; the hook
#                     (it did run: a recording hook after it says so) started nothing
#   start             a domain made by `tce-sidecar libvirt-xml` (idempotent; with a hostdev, the
#                     alias and the override libvirt keeps) starts: the instance was running, its
#                     socket bound, when the hook's `prepare begin` returned, before QEMU existed;
#                     the socket belongs to libvirt-qemu, mode 0600; `tce-sidecar status` lists a
#                     session whose peer is QEMU; QMP query-spapr-tce-sidecars shows it connected
#   libvirtd-restart  libvirtd restarted: the domain, QEMU, the sidecar and its session are the
#                     same after the hook's `reconnect begin`
#   sidecar-killed    the sidecar (listener and workers) killed with SIGKILL: QEMU runs on, QMP says
#                     it lost the session, and after the bounded reconnection attempts that it
#                     gave up; `virsh destroy` then leaves no socket, pid file or process
#   destroy           an isolated-mode domain (the sidecar's RLIMIT_MEMLOCK covers its RAM):
#                     `virsh destroy` stops the instance and removes its socket and pid file.
#                     Where libvirtd (so the hook) has no CAP_SYS_RESOURCE and a hard
#                     RLIMIT_MEMLOCK below the RAM (some containers), the hook must refuse the
#                     isolated domain cleanly; a `SKIP:` line says so and an accelerated-mode
#                     domain is destroyed instead
#   cannot-start      with `socket_dir` under a regular file, `virsh start` fails with the hook's
#                     `tce-sidecar:` message in its error
#   end               no domain of the test, no tce-sidecar process, no QEMU left;
#                     `libvirt-uninstall` removed the hook and the unit
#
# QEMU runs as libvirt's QEMU user (libvirt-qemu on Debian), as configured: the test does not
# change qemu.conf. /root is 0700, so the QEMU binary (with the SLOF and VOF it needs, in
# ../share/qemu where a relocatable QEMU looks for them) and the tce-sidecar binary are copied to
# $TCE_SIDECAR_LIBVIRT_STAGE (default /var/cache/tce-sidecar-libvirt), keyed by a hash of each.
#
# Without systemd as PID 1 the test starts virtlogd and libvirtd itself if they are not running,
# restarts libvirtd with a signal and a new `libvirtd -d`, and stops at the end what it started.
#
# Output: one line per case, `LIBVIRT case=<name> result=PASS|FAIL <details>`, and after a FAIL
# the relevant lines of libvirtd's log, the domain's QEMU log, the sidecar's log and the hook
# calls. Exits non-zero if any case FAILs; exits 0 after one "SKIP: ..." line if it cannot run
# here (no patched QEMU build, libvirt not installable, not root).
#
# Environment: TCE_SIDECAR (the binary to install; default: target/debug/tce-sidecar, built),
# TCE_SIDECAR_QEMU_CACHE (qemu-patches/check), TCE_SIDECAR_LIBVIRT_STAGE (above).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

QEMU_VERSION=$(sed -n 's/^QEMU_VERSION=//p' qemu-patches/check)
QCACHE=${TCE_SIDECAR_QEMU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-qemu}/$QEMU_VERSION
QEMU_BUILD=$QCACHE/qemu/build-x86/qemu-system-ppc64
STAGE=${TCE_SIDECAR_LIBVIRT_STAGE:-/var/cache/tce-sidecar-libvirt}

# what the contract of the hook says, with the defaults of /etc/tce-sidecar/libvirt.conf
CONF=/etc/tce-sidecar/libvirt.conf
HOOK_DIR=/etc/libvirt/hooks/qemu.d
HOOK=$HOOK_DIR/tce-sidecar
UNIT=/etc/systemd/system/tce-sidecar@.service
SOCKET_DIR=/run/tce-sidecar
LOG_DIR=/var/log/tce-sidecar
SIDECAR_USER=tce-sidecar
# libvirt runs the scripts of qemu.d in alphabetical order: this one runs after the project's hook
RECORDER=$HOOK_DIR/zz-tce-sidecar-test-recorder
LIBVIRTD_LOG=/var/log/libvirt/libvirtd.log

PLAIN=tce-sidecar-test-plain
ACCEL=tce-sidecar-test-accelerated
ISOL=tce-sidecar-test-isolated
DESTROYED=tce-sidecar-test-destroyed
CANNOT=tce-sidecar-test-cannot-start
DOMAINS=("$PLAIN" "$ACCEL" "$ISOL" "$DESTROYED" "$CANNOT" tce-sidecar-test-hostdev)
MEMORY_MIB=512

# shellcheck source=tests/libvirt/common.sh
source "$ROOT/tests/libvirt/common.sh"

[ "$(uname -m)" = x86_64 ] || skip "this is the x86_64 test; the host is $(uname -m)"
[ "$(id -u)" = 0 ] || skip "it must run as root: it installs a libvirt hook and runs libvirtd"
[ -x "$QEMU_BUILD" ] ||
    skip "no x86_64 build of the patched QEMU at $QEMU_BUILD: qemu-patches/check builds it, or said why it could not"

setup_out=$(bash tests/libvirt/setup.sh)
echo "$setup_out"
grep -q '^libvirt setup: ok$' <<<"$setup_out" || exit 0

# shellcheck source=tests/lab/boots.sh
. tests/lab/boots.sh

if [ -z "${TCE_SIDECAR:-}" ]; then
    cargo build -q --bin tce-sidecar || {
        echo "libvirt: cargo build failed" >&2
        exit 1
    }
    TCE_SIDECAR=$ROOT/target/debug/tce-sidecar
fi

T=$(mktemp -d /run/tce-sidecar-libvirt-test.XXXXXX)
chmod 0755 "$T"
RECORD=$T/hook-calls
: >"$RECORD"
LIBVIRTD_LOG_START=$(stat -c %s "$LIBVIRTD_LOG" 2>/dev/null || echo 0)
FAILED=()
STATUS_ROOT_REFUSED=""
CASE_INFO=""
CASE_ERR=""
CASE_LOGS=()
STARTED_VIRTLOGD=0
STARTED_LIBVIRTD=0
CONF_SAVED=""
CONF_DIR_EXISTED=0
HOOK_DIR_EXISTED=0
INSTALLED=0
SYSTEMD=0
[ -d /run/systemd/system ] && SYSTEMD=1



# --- install ----------------------------------------------------------------------------------

case_install() {
    local out
    [ -d /etc/tce-sidecar ] && CONF_DIR_EXISTED=1
    [ -d "$HOOK_DIR" ] && HOOK_DIR_EXISTED=1
    if [ -e "$CONF" ]; then
        CONF_SAVED=$T/libvirt.conf.saved
        cp -p "$CONF" "$CONF_SAVED"
    fi
    out=$("$SIDECAR" libvirt-install --bin "$SIDECAR" 2>&1) || fail "libvirt-install: $out" || return 1
    INSTALLED=1
    [ -x "$HOOK" ] || fail "no executable $HOOK" || return 1
    grep -qF "$SIDECAR" "$HOOK" || fail "$HOOK does not run $SIDECAR: $(tr '\n' ' ' <"$HOOK")" || return 1
    [ -f "$UNIT" ] || fail "no $UNIT" || return 1
    SIDECAR_UID=$(id -u "$SIDECAR_USER" 2>/dev/null) || fail "no user $SIDECAR_USER" || return 1
    [ -f "$CONF" ] || fail "no $CONF" || return 1
    QEMU_UID=$(id -u libvirt-qemu)
    cat >"$CONF" <<'EOF'
# written by tests/libvirt/x86.sh: x86_64 has no sPAPR VFIO, the sidecar simulates the kernel
kernel = model
EOF
    info "hook=$HOOK unit=$UNIT user=$SIDECAR_USER($SIDECAR_UID) qemu_user=libvirt-qemu($QEMU_UID)"
    # a recording hook, run after the project's: what each call found when that hook returned
    cat >"$RECORDER" <<EOF
#!/bin/sh
# Written by $ROOT/tests/libvirt/x86.sh for the length of its run (it removes it): records each
# call of libvirt's QEMU hooks, with the sidecar instances and sockets the tce-sidecar hook, which
# libvirt runs before this one, had left when it returned.
cat >/dev/null
{
    printf 'CALL %s %s %s' "\$1" "\$2" "\$3"
    for f in $SOCKET_DIR/*.pid; do
        [ -f "\$f" ] || continue
        p=\$(cat "\$f")
        if kill -0 "\$p" 2>/dev/null; then s=alive; else s=dead; fi
        printf ' pidfile=%s:%s:%s' "\$f" "\$p" "\$s"
    done
    for s in $SOCKET_DIR/*.sock; do
        [ -S "\$s" ] && printf ' socket=%s' "\$(stat -c '%n:%u:%a' "\$s")"
    done
    printf '\n'
} >>$RECORD 2>&1
exit 0
EOF
    chmod 0755 "$RECORDER"
    restart_libvirtd || fail "libvirtd did not come back after the restart" || return 1
    info "libvirtd_restarted=$(cat /run/libvirtd.pid 2>/dev/null || echo systemd)"
}

uninstall() {
    [ "$INSTALLED" = 1 ] || return 0
    INSTALLED=0
    rm -f "$RECORDER"
    "$SIDECAR" libvirt-uninstall || echo "libvirt: libvirt-uninstall failed" >&2
    if [ -n "$CONF_SAVED" ]; then
        cp -p "$CONF_SAVED" "$CONF"
    else
        rm -f "$CONF"
        [ "$CONF_DIR_EXISTED" = 1 ] || rmdir /etc/tce-sidecar 2>/dev/null
    fi
    [ "$HOOK_DIR_EXISTED" = 1 ] || rmdir "$HOOK_DIR" 2>/dev/null
    return 0
}

cleanup() {
    local rc=$? p
    trap - EXIT
    for d in "${DOMAINS[@]}"; do forget "$d"; done
    # instances the hook started and no release stopped (the pids it recorded)
    for p in $(cat "$SOCKET_DIR"/*.pid 2>/dev/null); do
        [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "${SIDECAR:-}" ] && kill -9 "$p" $(descendants "$p") 2>/dev/null
    done
    uninstall
    if [ "$SYSTEMD" = 1 ]; then
        [ "$STARTED_LIBVIRTD" = 1 ] && systemctl stop libvirtd
    else
        [ "$STARTED_LIBVIRTD" = 1 ] && stop_pidfile_daemon /run/libvirtd.pid
        [ "$STARTED_VIRTLOGD" = 1 ] && stop_pidfile_daemon /run/virtlogd.pid
    fi
    rm -rf "$T"
    exit "$rc"
}
trap cleanup EXIT

# --- the cases ----------------------------------------------------------------------------------

case_no_sidecar() {
    local qpid calls
    CASE_LOGS=("$PLAIN")
    domain_xml "$PLAIN" "$(new_uuid)" >"$T/$PLAIN.xml"
    V define --validate "$T/$PLAIN.xml" >/dev/null 2>"$T/err" || fail "define: $(cat "$T/err")" || return 1
    V start "$PLAIN" >/dev/null 2>"$T/err" || fail "start: $(cat "$T/err")" || return 1
    qpid=$(qemu_pid_of "$PLAIN")
    alive "$qpid" || fail "no QEMU process after virsh start" || return 1
    [ "$(readlink "/proc/$qpid/exe")" = "$QEMU" ] || fail "QEMU $qpid runs $(readlink "/proc/$qpid/exe")" || return 1
    [ "$(stat -c %u "/proc/$qpid")" = "$QEMU_UID" ] || fail "QEMU runs as uid $(stat -c %u "/proc/$qpid")" || return 1
    running "$PLAIN" || fail "domain state: $(domstate "$PLAIN")" || return 1
    hook_calls "$PLAIN" prepare begin >/dev/null || fail "the hooks of qemu.d were not called at prepare" || return 1
    calls=$(grep -c "^CALL $PLAIN " "$RECORD")
    no_sidecar_process || fail "sidecar processes: $(sidecar_pids | tr '\n' ' ')" || return 1
    socket_dir_empty || fail "$SOCKET_DIR: $(ls -A "$SOCKET_DIR" | tr '\n' ' ')" || return 1
    V destroy "$PLAIN" >/dev/null 2>"$T/err" || fail "destroy: $(cat "$T/err")" || return 1
    wait_for 20 dead "$qpid" || fail "QEMU $qpid still running after destroy" || return 1
    hook_calls "$PLAIN" release end >/dev/null || fail "no release hook call after destroy" || return 1
    no_sidecar_process || fail "sidecar processes after destroy: $(sidecar_pids | tr '\n' ' ')" || return 1
    socket_dir_empty || fail "$SOCKET_DIR after destroy: $(ls -A "$SOCKET_DIR" | tr '\n' ' ')" || return 1
    V undefine "$PLAIN" >/dev/null || fail "undefine" || return 1
    info "qemu_pid=$qpid qemu_uid=$QEMU_UID hook_calls=$(grep "^CALL $PLAIN " "$RECORD" | awk '{printf "%s%s/%s", (n++ ? "," : ""), $3, $4}')"
    info "hook_calls_while_running=$calls sidecar_processes=0 socket_dir=empty"
}

# status_of SOCKET: `tce-sidecar status` as root; if the daemon refuses root (it answers only the
# uids of --allow-uid), as libvirt-qemu, the uid the hook allows. Sets STATUS and STATUS_AS.
status_of() {
    local err
    if STATUS=$("$SIDECAR" status --socket-path "$1" 2>"$T/err"); then
        STATUS_AS=root
        return 0
    fi
    err=$(tr '\n' ' ' <"$T/err")
    STATUS_ROOT_REFUSED=$err
    STATUS=$(setpriv --reuid="$QEMU_UID" --regid="$(id -g libvirt-qemu)" --init-groups \
        "$SIDECAR" status --socket-path "$1" 2>"$T/err") ||
        fail "tce-sidecar status, as root: $err; as libvirt-qemu: $(tr '\n' ' ' <"$T/err")" || return 1
    STATUS_AS=libvirt-qemu
}

# session_of JSON PID: the session of the status whose peer is PID, as "id:worker_pid:mode"
session_of() {
    python3 -c '
import json, sys
st = json.loads(sys.argv[1]); pid = int(sys.argv[2])
ss = [s for s in st.get("sessions", []) if s.get("peer_pid") == pid]
assert len(ss) == 1, "sessions whose peer is %d: %r" % (pid, [(s.get("id"), s.get("peer_pid")) for s in st.get("sessions", [])])
print("%s:%s:%s" % (ss[0].get("id"), ss[0].get("worker_pid"), str(ss[0].get("mode")).lower()))' "$1" "$2"
}

# check_running NAME UUID MODE: the domain runs with its sidecar instance; sets SC_PID, Q_PID,
# SESSION, QMP_OBJ
check_running() {
    local name=$1 uuid=$2 mode=$3 sock pidfile args st out expect
    sock=$SOCKET_DIR/$uuid.sock
    pidfile=$SOCKET_DIR/$uuid.pid
    running "$name" || fail "domain state: $(domstate "$name")" || return 1
    Q_PID=$(qemu_pid_of "$name")
    alive "$Q_PID" || fail "no QEMU process" || return 1
    [ "$(stat -c %u "/proc/$Q_PID")" = "$QEMU_UID" ] || fail "QEMU runs as uid $(stat -c %u "/proc/$Q_PID")" || return 1
    [ -f "$pidfile" ] || fail "no pid file $pidfile" || return 1
    SC_PID=$(cat "$pidfile")
    alive "$SC_PID" || fail "the pid file's $SC_PID is not running" || return 1
    [ "$(readlink "/proc/$SC_PID/exe")" = "$SIDECAR" ] ||
        fail "pid $SC_PID runs $(readlink "/proc/$SC_PID/exe"), not $SIDECAR" || return 1
    [ "$(stat -c %u "/proc/$SC_PID")" = "$SIDECAR_UID" ] ||
        fail "the sidecar runs as uid $(stat -c %u "/proc/$SC_PID"), not $SIDECAR_USER" || return 1
    args=$(tr '\0' ' ' <"/proc/$SC_PID/cmdline")
    # the model kernel's socket: the instance's, in the socket directory (the hook puts it in a
    # directory of the sidecar's user, $uuid.model.d/, which that user can bind in)
    for expect in "--fd " "--allow-uid $QEMU_UID" "--kernel model" "--model-socket $SOCKET_DIR/$uuid\."; do
        grep -qe "$expect" <<<"$args" || fail "sidecar command line without '$expect': $args" || return 1
    done
    [ -S "$sock" ] || fail "no socket $sock" || return 1
    [ "$(stat -c '%u:%a' "$sock")" = "$QEMU_UID:600" ] ||
        fail "socket $sock is $(stat -c '%U:%a' "$sock"), want libvirt-qemu:600" || return 1
    [ -f "$LOG_DIR/$name.log" ] || fail "no sidecar log $LOG_DIR/$name.log" || return 1
    status_of "$sock" || return 1
    SESSION=$(session_of "$STATUS" "$Q_PID" 2>&1) || fail "tce-sidecar status ($STATUS_AS): $(tail -n 1 <<<"$SESSION")" || return 1
    QMP_OBJ=$(sidecars "$name" 2>&1) || fail "query-spapr-tce-sidecars: $QMP_OBJ" || return 1
    out=$(python3 -c '
import json, sys
o = json.loads(sys.argv[1]); sock, mode = sys.argv[2], sys.argv[3]
assert o["connected"] is True and o["state"] == "connected", o
assert o["mode"] == mode and "mode-" + mode in o["features"], o
assert o["path"] == sock and o["vm-stopped"] is False, o
' "$QMP_OBJ" "$sock" "$mode" 2>&1) || fail "query-spapr-tce-sidecars: $(tail -n 1 <<<"$out")" || return 1
}

case_start() {
    local sock prepared
    CASE_LOGS=("$ACCEL")
    # libvirt-xml with a hostdev: the alias, the override, and libvirt keeps both
    sidecar_xml tce-sidecar-test-hostdev isolated hostdev || return 1
    V define --validate "$T/tce-sidecar-test-hostdev.xml" >/dev/null 2>"$T/err" ||
        fail "define of libvirt-xml's output with a hostdev: $(cat "$T/err")" || return 1
    V dumpxml tce-sidecar-test-hostdev >"$T/hostdev.dump.xml" 2>&1
    V undefine tce-sidecar-test-hostdev >/dev/null 2>&1
    grep -q "<alias name='ua-tce-hostdev0'/>" "$T/hostdev.dump.xml" &&
        grep -q "<qemu:device alias='ua-tce-hostdev0'>" "$T/hostdev.dump.xml" &&
        grep -q "<qemu:property name='spapr-tce-sidecar' type='string' value='tce-sidecar'/>" "$T/hostdev.dump.xml" ||
        fail "libvirt dropped the hostdev's alias or override: $(grep -E 'alias|qemu:' "$T/hostdev.dump.xml" | tr -s ' \n' ' ')" || return 1
    # the socket is named after the domain's UUID: a domain without one is refused
    domain_xml tce-sidecar-test-no-uuid "" | grep -v '<uuid>' >"$T/no-uuid.xml"
    if "$SIDECAR" libvirt-xml "$T/no-uuid.xml" >/dev/null 2>"$T/err"; then
        fail "libvirt-xml accepted a domain without <uuid>"
        return 1
    fi
    info "xml=idempotent,hostdev-override-kept,no-uuid-refused(\"$(head -n 1 "$T/err" | cut -c1-120)\")"

    sidecar_xml "$ACCEL" accelerated || return 1
    ACCEL_UUID=$UUID
    sock=$SOCKET_DIR/$UUID.sock
    V define --validate "$T/$ACCEL.xml" >/dev/null 2>"$T/err" || fail "define: $(cat "$T/err")" || return 1
    V start "$ACCEL" >/dev/null 2>"$T/err" || fail "start: $(cat "$T/err")" || return 1
    check_running "$ACCEL" "$UUID" accelerated || return 1
    # started before QEMU: when the hook's `prepare begin` returned (QEMU is forked later) the
    # instance ran and its socket was bound; and it started no later than QEMU
    prepared=$(hook_calls "$ACCEL" prepare begin | tail -n 1)
    grep -qF " pidfile=$SOCKET_DIR/$UUID.pid:$SC_PID:alive" <<<"$prepared" &&
        grep -qF " socket=$sock:$QEMU_UID:600" <<<"$prepared" ||
        fail "at prepare begin the instance was not running with its socket: $prepared" || return 1
    [ "$(starttime "$SC_PID")" -le "$(starttime "$Q_PID")" ] ||
        fail "the sidecar ($SC_PID) started after QEMU ($Q_PID)" || return 1
    # the socket is QEMU's alone: another user cannot even connect
    if setpriv --reuid=65534 --regid=65534 --clear-groups "$SIDECAR" status --socket-path "$sock" \
        >/dev/null 2>"$T/err"; then
        fail "user nobody got the sidecar's status"
        return 1
    fi
    grep -q "Permission denied" "$T/err" || fail "user nobody: $(cat "$T/err")" || return 1
    ACCEL_SC_PID=$SC_PID ACCEL_Q_PID=$Q_PID ACCEL_SESSION=$SESSION
    info "sidecar_pid=$SC_PID qemu_pid=$Q_PID started_before_qemu=at-prepare-begin"
    info "socket=$(stat -c '%U:%a' "$sock") nobody=EACCES status_as=$STATUS_AS${STATUS_ROOT_REFUSED:+ status_root_refused=\"$STATUS_ROOT_REFUSED\"}"
    info "session=$SESSION qmp=$(field "$QMP_OBJ" state)/$(field "$QMP_OBJ" mode)"
}

case_libvirtd_restart() {
    local before after reconnect
    CASE_LOGS=("$ACCEL")
    [ -n "${ACCEL_SC_PID:-}" ] || fail "case start did not leave a running domain" || return 1
    before=$(cat /run/libvirtd.pid 2>/dev/null)
    local lines
    lines=$(wc -l <"$RECORD")
    restart_libvirtd || fail "libvirtd did not come back" || return 1
    after=$(cat /run/libvirtd.pid 2>/dev/null)
    # libvirtd reconnects to its domains in threads of their own, after it answers
    wait_for 60 eval 'tail -n +$((lines + 1)) "$RECORD" | grep -q "^CALL $ACCEL reconnect begin"' ||
        fail "no reconnect begin hook call within 60 s" || return 1
    reconnect=$(tail -n +$((lines + 1)) "$RECORD" | grep "^CALL $ACCEL reconnect begin" | tail -n 1)
    wait_for 30 running "$ACCEL" || fail "domain state: $(domstate "$ACCEL")" || return 1
    check_running "$ACCEL" "$ACCEL_UUID" accelerated || return 1
    [ "$SC_PID" = "$ACCEL_SC_PID" ] || fail "sidecar pid $ACCEL_SC_PID became $SC_PID" || return 1
    [ "$Q_PID" = "$ACCEL_Q_PID" ] || fail "QEMU pid $ACCEL_Q_PID became $Q_PID" || return 1
    [ "$SESSION" = "$ACCEL_SESSION" ] || fail "session $ACCEL_SESSION became $SESSION" || return 1
    grep -qF "pidfile=$SOCKET_DIR/$ACCEL_UUID.pid:$SC_PID:alive" <<<"$reconnect" ||
        fail "at reconnect begin: $reconnect" || return 1
    info "libvirtd=$before->$after sidecar_pid=$SC_PID qemu_pid=$Q_PID session=$SESSION reconnect_hook=called qmp=$(field "$QMP_OBJ" state)"
}

case_sidecar_killed() {
    local procs obj q log_size how lost
    CASE_LOGS=("$ACCEL")
    [ -n "${ACCEL_SC_PID:-}" ] && alive "$ACCEL_SC_PID" || fail "no running sidecar from case start" || return 1
    # the listener, the session's worker and whatever else it runs, all at once: a worker whose
    # listener dies first gets SIGTERM (its parent-death signal) and would end its session in order
    procs=$(echo "$ACCEL_SC_PID" $(descendants "$ACCEL_SC_PID"))
    log_size=$(stat -c %s "$LOG_DIR/$ACCEL.log")
    if [ "$(ps -o pgid= -p "$ACCEL_SC_PID" | tr -d ' ')" = "$ACCEL_SC_PID" ]; then
        kill -9 -- "-$ACCEL_SC_PID"
        how=process-group
    else
        kill -9 $(descendants "$ACCEL_SC_PID")
        kill -9 "$ACCEL_SC_PID"
        how=workers-first
    fi
    wait_for 10 all_dead $procs || fail "still running after SIGKILL: $procs" || return 1
    # nothing of it ran on to write a line
    [ "$(stat -c %s "$LOG_DIR/$ACCEL.log")" = "$log_size" ] ||
        fail "the sidecar logged after SIGKILL: $(tail -c +$((log_size + 1)) "$LOG_DIR/$ACCEL.log" | tr '\n' ' ')" || return 1
    wait_for 15 qmp_disconnected "$ACCEL" || fail "QMP still shows the object connected: $(sidecars "$ACCEL")" || return 1
    obj=$(sidecars "$ACCEL")
    running "$ACCEL" || fail "domain state after the kill: $(domstate "$ACCEL")" || return 1
    q=$(qmp "$ACCEL" query-status)
    grep -q '"status":"running"' <<<"$q" || fail "QEMU's run state: $q" || return 1
    [ "$(field "$obj" vm-stopped)" = False ] || fail "the object holds the VM stopped: $obj" || return 1
    lost=$(grep -o "lost the session with .*" "/var/log/libvirt/qemu/$ACCEL.log" | tail -n 1 | sed 's/.*sock: //')
    info "killed=$(echo $procs | tr ' ' ,)($how) qemu_log=\"lost the session: $lost\" qmp_after_kill=$(field "$obj" state) last_error=\"$(field "$obj" last-error)\""
    # an object that no device uses only reconnects: 10 attempts 1 s apart (the defaults), then
    # it gives up, and the VM runs on
    wait_for 40 qmp_state_is "$ACCEL" disconnected ||
        fail "QEMU did not give up reconnecting within 40 s: $(sidecars "$ACCEL")" || return 1
    obj=$(sidecars "$ACCEL")
    running "$ACCEL" || fail "domain state after QEMU gave up: $(domstate "$ACCEL")" || return 1
    alive "$ACCEL_Q_PID" || fail "QEMU $ACCEL_Q_PID died" || return 1
    info "qmp_later=$(field "$obj" state) vm=running"
    V destroy "$ACCEL" >/dev/null 2>"$T/err" || fail "destroy: $(cat "$T/err")" || return 1
    wait_for 20 dead "$ACCEL_Q_PID" || fail "QEMU still running after destroy" || return 1
    instance_files_gone "$ACCEL_UUID" || return 1
    no_sidecar_process || fail "sidecar processes after destroy: $(sidecar_pids | tr '\n' ' ')" || return 1
    V undefine "$ACCEL" >/dev/null || fail "undefine" || return 1
    info "destroy=clean"
}

# instance_files_gone UUID: the hook's files of that domain's instance are gone
instance_files_gone() {
    local f
    for f in "$SOCKET_DIR/$1.sock" "$SOCKET_DIR/$1.sock.model" "$SOCKET_DIR/$1.model.d" "$SOCKET_DIR/$1.pid"; do
        [ ! -e "$f" ] || fail "$f left after the domain stopped" || return 1
    done
}

# memlock_blocked: whether no hook can raise RLIMIT_MEMLOCK to the domain's RAM here: libvirtd
# (the hooks are its children) has no CAP_SYS_RESOURCE and a hard limit below the RAM. Sets
# HARD_MEMLOCK.
memlock_blocked() {
    local pid caps
    pid=$(libvirtd_pid) && [ -n "$pid" ] || return 1
    caps=$(awk '/^CapEff/ {print $2}' "/proc/$pid/status")
    HARD_MEMLOCK=$(awk '/^Max locked memory/ {print $5}' "/proc/$pid/limits")
    [ $((0x$caps >> 24 & 1)) = 0 ] && [ "$HARD_MEMLOCK" != unlimited ] &&
        [ "$HARD_MEMLOCK" -lt $((MEMORY_MIB << 20)) ]
}

case_destroy() {
    local name=$ISOL mode=isolated limit=none procs before refused
    CASE_LOGS=("$ISOL")
    sidecar_xml "$ISOL" isolated || return 1
    V define --validate "$T/$ISOL.xml" >/dev/null 2>"$T/err" || fail "define: $(cat "$T/err")" || return 1
    before=$(sidecar_pids)
    if ! V start "$ISOL" >/dev/null 2>"$T/err"; then
        # an isolated sidecar pins the guest's RAM: the hook must raise its RLIMIT_MEMLOCK to that,
        # which needs CAP_SYS_RESOURCE when the hard limit is lower
        memlock_blocked && grep -q "tce-sidecar: .*locked-memory limit" "$T/err" ||
            fail "start: $(cat "$T/err")" || return 1
        refused=$(grep -o 'tce-sidecar: .*' "$T/err" | head -n 1)
        [ "$(domstate "$ISOL")" = "shut off" ] || fail "domain state after the refusal: $(domstate "$ISOL")" || return 1
        instance_files_gone "$UUID" || return 1
        [ "$(sidecar_pids)" = "$before" ] || fail "sidecar processes after the refusal: $(sidecar_pids | tr '\n' ' ')" || return 1
        echo "SKIP: libvirt test: an isolated-mode domain cannot start on this machine: libvirtd" \
            "has no CAP_SYS_RESOURCE and its hard RLIMIT_MEMLOCK is $HARD_MEMLOCK bytes, less than" \
            "the domain's $MEMORY_MIB MiB; the hook refused it cleanly (\"$refused\"); case destroy" \
            "runs in accelerated mode"
        info "isolated=refused-here(no-CAP_SYS_RESOURCE,hard-memlock=$HARD_MEMLOCK)"
        V undefine "$ISOL" >/dev/null 2>&1
        name=$DESTROYED mode=accelerated
        CASE_LOGS=("$ISOL" "$name")
        sidecar_xml "$name" accelerated || return 1
        V define --validate "$T/$name.xml" >/dev/null 2>"$T/err" || fail "define: $(cat "$T/err")" || return 1
        V start "$name" >/dev/null 2>"$T/err" || fail "start: $(cat "$T/err")" || return 1
    fi
    check_running "$name" "$UUID" "$mode" || return 1
    if [ "$mode" = isolated ]; then
        # the domain's RAM is what an isolated session pins
        limit=$(awk '/^Max locked memory/ {print $4}' "/proc/$SC_PID/limits")
        [ "$limit" = unlimited ] || [ "$limit" -ge $((MEMORY_MIB << 20)) ] ||
            fail "RLIMIT_MEMLOCK of the sidecar: $limit bytes, less than the domain's $MEMORY_MIB MiB" || return 1
    fi
    procs=$(echo "$SC_PID" $(descendants "$SC_PID"))
    V destroy "$name" >/dev/null 2>"$T/err" || fail "destroy: $(cat "$T/err")" || return 1
    wait_for 20 dead "$Q_PID" || fail "QEMU still running after destroy" || return 1
    wait_for 10 all_dead $procs || fail "sidecar processes still running after destroy: $procs" || return 1
    instance_files_gone "$UUID" || return 1
    no_sidecar_process || fail "sidecar processes after destroy: $(sidecar_pids | tr '\n' ' ')" || return 1
    V undefine "$name" >/dev/null || fail "undefine" || return 1
    info "mode=$mode session=$SESSION memlock=$limit stopped=$(echo $procs | tr ' ' ,) removed=socket,model-dir,pidfile"
}

case_cannot_start() {
    local out bad=$T/not-a-directory rc=0 before
    CASE_LOGS=("$CANNOT")
    sidecar_xml "$CANNOT" accelerated || return 1
    V define --validate "$T/$CANNOT.xml" >/dev/null 2>"$T/err" || fail "define: $(cat "$T/err")" || return 1
    : >"$bad"
    cp "$CONF" "$T/conf.good"
    printf '%s\n' "kernel = model" "# root can make no directory, nor bind a socket, under a regular file" \
        "socket_dir = $bad/sockets" >"$CONF"
    before=$(sidecar_pids)
    out=$(V start "$CANNOT" 2>&1) || rc=$?
    cp "$T/conf.good" "$CONF"
    [ "$rc" != 0 ] || fail "virsh start succeeded" || { V destroy "$CANNOT" >/dev/null 2>&1; return 1; }
    grep -q "tce-sidecar:" <<<"$out" || fail "the error has no 'tce-sidecar:' message: $out" || return 1
    [ "$(domstate "$CANNOT")" = "shut off" ] || fail "domain state: $(domstate "$CANNOT")" || return 1
    [ ! -e "/run/libvirt/qemu/$CANNOT.pid" ] || fail "QEMU pid file of $CANNOT left" || return 1
    [ "$(sidecar_pids)" = "$before" ] || fail "sidecar processes: $(sidecar_pids | tr '\n' ' ')" || return 1
    [ ! -e "$bad/sockets" ] || fail "$bad/sockets exists" || return 1
    instance_files_gone "$UUID" || return 1
    V undefine "$CANNOT" >/dev/null || fail "undefine" || return 1
    info "virsh_error=\"$(grep -o 'tce-sidecar:.*' <<<"$out" | head -n 1 | cut -c1-200)\" config=restored"
}

case_end() {
    local left
    left=$(V list --all --name | grep '^tce-sidecar-test-')
    [ -z "$left" ] || fail "domains left: $left" || return 1
    [ -z "$(qemu_pids)" ] || fail "QEMU left: $(qemu_pids | tr '\n' ' ')" || return 1
    no_sidecar_process || fail "sidecar processes left: $(sidecar_pids | tr '\n' ' ')" || return 1
    socket_dir_empty || fail "left in $SOCKET_DIR: $(ls -A "$SOCKET_DIR" | tr '\n' ' ')" || return 1
    uninstall
    [ ! -e "$HOOK" ] || fail "libvirt-uninstall left $HOOK" || return 1
    [ ! -e "$UNIT" ] || fail "libvirt-uninstall left $UNIT" || return 1
    info "domains=0 qemu=0 sidecars=0 uninstalled=hook,unit"
}

run_cases() {
    run_case no-sidecar case_no_sidecar
    run_case start case_start
    run_case libvirtd-restart case_libvirtd_restart
    run_case sidecar-killed case_sidecar_killed
    run_case destroy case_destroy
    run_case cannot-start case_cannot_start
    run_case end case_end
}

# --- main -------------------------------------------------------------------------------------

echo "QEMU: $("$QEMU_BUILD" --version | head -n 1) ($QEMU_BUILD)"
echo "libvirt: $(libvirtd --version)"
"$TCE_SIDECAR" libvirt-xml --help >/dev/null 2>&1 || {
    echo "LIBVIRT case=install result=FAIL why=\"$TCE_SIDECAR has no libvirt-xml subcommand\""
    exit 1
}
stage_binaries || {
    echo "libvirt: cannot copy the binaries to $STAGE" >&2
    exit 1
}
echo "staged: $QEMU and $SIDECAR"
if ! start_daemons; then
    tail -n 20 "$LIBVIRTD_LOG" 2>/dev/null | sed 's/^/  libvirtd: /'
    skip "libvirtd does not start or answer on qemu:///system here"
fi
for d in "${DOMAINS[@]}"; do forget "$d"; done
# the sidecars' logs of earlier runs (the hook appends)
for d in "${DOMAINS[@]}"; do rm -f "$LOG_DIR/$d.log"; done
if [ -n "$(qemu_pids)" ]; then
    echo "LIBVIRT case=install result=FAIL why=\"QEMU processes of $QEMU already run: $(qemu_pids | tr '\n' ' ')\""
    exit 1
fi

run_case install case_install
if [ ${#FAILED[@]} = 0 ]; then
    in_cpu_slot run_cases
fi

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "libvirt: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "libvirt: all cases passed"
