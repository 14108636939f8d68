# shellcheck shell=bash
# How the labs run their emulated machines (sourced by run.sh and nested.sh): in CPU slots, with a
# deadline for every step.
#
# TCG runs a one-CPU guest on one host thread, so a boot uses one CPU. `in_cpu_slot` lets as many
# boots run at once as the host has CPUs, across every lab process of the machine (the slots are
# lock files), so the labs fill the CPUs without crowding them.
#
# A lab boots an emulated machine whose init runs one or more cases, each a sequence of steps.
# Every step has its own deadline, sized from what it does; no limit covers several cases. The
# guest announces each step on its console:
#
#     STEP case=<case> step=<step> seconds=<deadline>
#
# and may say how far a long step has come with `PROGRESS case=<case> <text>`. A step is over when
# the next STEP line appears or QEMU exits. The guest enforces its own deadlines where it can and
# prints its case's FAIL line naming the step; the host enforces each one too, STEP_GRACE seconds
# later, for a guest that has stopped altogether: it then stops QEMU and says where the run was.
# Before the first STEP line the run is in step "boot" of case "host", whose deadline the caller
# gives.

STEP_GRACE=${STEP_GRACE:-60}
CPU_SLOTS_DIR=${CPU_SLOTS_DIR:-${TMPDIR:-/tmp}/tce-sidecar-cpu-slots}

# in_cpu_slot COMMAND...: runs COMMAND once one of the host's CPU slots is free, holding the slot
# (a lock on $CPU_SLOTS_DIR/N) until it ends. Returns COMMAND's status.
in_cpu_slot() {
    local slot fd rc
    mkdir -p "$CPU_SLOTS_DIR"
    while :; do
        for slot in $(seq 0 $(($(nproc) - 1))); do
            exec {fd}>"$CPU_SLOTS_DIR/$slot"
            if flock -n "$fd"; then
                rc=0
                "$@" || rc=$?
                exec {fd}>&-
                return "$rc"
            fi
            exec {fd}>&-
        done
        sleep 2
    done
}

# step_lines LOG: the STEP lines of the console so far. Only whole lines count: the console is
# written in pieces, and a line without its newline may still lack the end of its deadline.
step_lines() {
    perl -ne 'print "$1\n" if /^(STEP case=\S+ step=\S+ seconds=\d+)\r*\n\z/' "$1"
}

# boot_with_deadlines LOG BOOT_SECONDS COMMAND...: runs COMMAND (an emulated machine) with its
# console in LOG, enforcing the deadline of each step the guest announces. Sets RC to COMMAND's exit
# status, STUCK to "" or to a sentence saying which step ran out of time, and TOOK to the time each
# step took ("case/step=seconds ...", to the second as the host saw it).
boot_with_deadlines() {
    local log=$1 seconds=$2 pid began seen=0 steps latest in_case=host step=boot progress
    shift 2
    STUCK=""
    RC=0
    TOOK=""
    "$@" </dev/null >"$log" 2>&1 &
    pid=$!
    began=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        mapfile -t steps < <(step_lines "$log")
        # every step announced since the last look; all but the newest ended within it
        for latest in "${steps[@]:seen}"; do
            TOOK="${TOOK:+$TOOK }$in_case/$step=$((SECONDS - began))"
            began=$SECONDS
            read -r _ in_case step seconds <<<"$latest"
            in_case=${in_case#case=} step=${step#step=} seconds=${seconds#seconds=}
        done
        seen=${#steps[@]}
        if [ $((SECONDS - began)) -gt $((seconds + STEP_GRACE)) ]; then
            progress=$(grep -a "^PROGRESS case=$in_case " "$log" | tail -n 1 | tr -d '\r' |
                sed "s/^PROGRESS case=$in_case //")
            STUCK="case $in_case was stopped in step $step after $((SECONDS - began)) s (deadline $seconds s)${progress:+, at $progress}"
            echo "lab: $STUCK: stopping QEMU"
            kill "$pid" 2>/dev/null || true
            sleep 5
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
    done
    wait "$pid" || RC=$?
    [ -n "$STUCK" ] || TOOK="${TOOK:+$TOOK }$in_case/$step=$((SECONDS - began))"
}

# summary_line LOG PREFIX: the run's summary line starting with PREFIX (e.g. "LAB machine=m
# mode=x"), or a FAIL line saying why there is none. Returns 0 when the line says PASS.
summary_line() {
    local line why
    line=$(grep -a -m1 "^$2 " "$1" | tr -d '\r' || true)
    if [ -z "$line" ]; then
        why="no summary line"
        [ -n "$STUCK" ] && why="no summary line: $STUCK"
        line="$2 result=FAIL why=\"$why\""
    fi
    echo "$line"
    grep -q ' result=PASS' <<<"$line"
}

# boot_all OUTDIR FUNCTION ARG...: runs `FUNCTION N ARG` (N counting from 1) for every ARG, each in
# a CPU slot in the background, then prints their outputs in order. Returns 1 if any failed.
boot_all() {
    local out=$1 fn=$2 arg n=0 pid pids=() failed=0
    shift 2
    for arg in "$@"; do
        n=$((n + 1))
        in_cpu_slot "$fn" "$n" "$arg" >"$out/boot-$n.out" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    for n in $(seq 1 "$n"); do
        cat "$out/boot-$n.out"
    done
    return "$failed"
}

# end_boot LOG NAME FAILED WARN_LABEL: a kernel WARN in LOG fails the boot too (printed under
# WARN_LABEL), and a failed boot's whole console log is printed. Returns 1 if the boot failed.
end_boot() {
    local log=$1 name=$2 failed=$3
    if kernel_warned "$log" "$4"; then
        failed=1
    fi
    if [ "$failed" = 1 ]; then
        echo "----- console log of $name -----"
        tr -d '\r' <"$log"
        echo "----- end of console log of $name -----"
    fi
    return "$failed"
}
