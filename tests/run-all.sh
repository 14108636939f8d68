#!/usr/bin/env bash
# Runs every test of tce-sidecar: formatting, clippy, the cargo test suite, the powerpc64le type
# check, the demo, the real-kernel lab (ppc64le under QEMU), the QEMU patch series (checkpatch,
# builds, qtests, unit test, smoke test, hostile back-end), the libvirt hook with Debian's libvirtd
# and the patched QEMU, the end-to-end nested lab, and the fuzz targets for a while. It first
# installs what the tests need; anything it cannot install is reported on a line starting with
# "SKIP:" that names what was skipped and why.
#
# Each step prints its duration when it ends, and the run ends with a table of them and the total
# (also when a step fails). The real-kernel lab and the fuzz targets' build run beside the QEMU
# series check: its builds leave CPU time idle (downloads, configure, qtests, smoke) that they fill.
#
# Environment: FUZZ_SECONDS (default 30) is the run time of each fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."

STEP_TIMES=()
CURRENT_STEP=""
RUN_START=$SECONDS
STEP_OUT=$(mktemp -d)

skip() { printf 'SKIP: %s\n' "$*"; }
duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# The table of step times, printed however the run ends.
report_times() {
    local rc=$?
    echo
    echo "step times:"
    printf '  %s\n' "${STEP_TIMES[@]}"
    [ -n "$CURRENT_STEP" ] && echo "  (failed in: $CURRENT_STEP)"
    echo "  total: $(duration $((SECONDS - RUN_START)))"
    rm -rf "$STEP_OUT"
    exit "$rc"
}
trap report_times EXIT

# step TITLE COMMAND...: one timed step of the run; its failure ends the run.
step() {
    local title=$1 t0=$SECONDS
    shift
    CURRENT_STEP=$title
    printf '\n==> %s\n' "$title"
    "$@"
    STEP_TIMES+=("$(printf '%8s  %s' "$(duration $((SECONDS - t0)))" "$title")")
    printf '<== %s (%s)\n' "$title" "$(duration $((SECONDS - t0)))"
    CURRENT_STEP=""
}

# beside TITLE COMMAND...: a timed step that runs in the background beside the steps that follow,
# its output kept until join_beside prints it; join_beside ends the run if one of them failed.
BESIDE_TITLES=()
BESIDE_PIDS=()
beside() {
    local title=$1 n=${#BESIDE_PIDS[@]}
    shift
    printf '\n==> %s (in the background; its output follows when it is joined)\n' "$title"
    (
        t0=$SECONDS
        rc=0
        "$@" >"$STEP_OUT/beside-$n.log" 2>&1 || rc=$?
        echo "$((SECONDS - t0))" >"$STEP_OUT/beside-$n.seconds"
        exit "$rc"
    ) &
    BESIDE_TITLES+=("$title")
    BESIDE_PIDS+=($!)
}
join_beside() {
    local n rc failed="" took
    for n in "${!BESIDE_PIDS[@]}"; do
        rc=0
        wait "${BESIDE_PIDS[$n]}" || rc=$?
        took=$(cat "$STEP_OUT/beside-$n.seconds" 2>/dev/null || echo 0)
        printf '\n==> %s (output)\n' "${BESIDE_TITLES[$n]}"
        cat "$STEP_OUT/beside-$n.log"
        STEP_TIMES+=("$(printf '%8s  %s (in the background)' "$(duration "$took")" "${BESIDE_TITLES[$n]}")")
        printf '<== %s (%s)\n' "${BESIDE_TITLES[$n]}" "$(duration "$took")"
        [ "$rc" = 0 ] || failed="${failed:+$failed, }${BESIDE_TITLES[$n]}"
    done
    BESIDE_TITLES=()
    BESIDE_PIDS=()
    if [ -n "$failed" ]; then
        CURRENT_STEP=$failed
        return 1
    fi
}

demo() {
    local out
    out=$(cargo run --quiet --example demo)
    grep -E "^(== |    completed|    exits|hypercalls completed)" <<<"$out"
}

# The fuzz targets' tools and build; FUZZ_READY says whether the targets can run.
FUZZ_READY=$STEP_OUT/fuzz-ready
fuzz_build() {
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
            skip "fuzz targets: no nightly Rust toolchain, and 'rustup toolchain install nightly' failed"
            return 0
        fi
    fi
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        if ! cargo install cargo-fuzz --locked >/dev/null 2>&1; then
            skip "fuzz targets: 'cargo install cargo-fuzz' failed"
            return 0
        fi
    fi
    (cd fuzz && cargo +nightly fuzz build -O)
    touch "$FUZZ_READY"
}

fuzz_run() {
    local corpus=$STEP_OUT/corpus target pids=() pid failed=0
    if [ ! -e "$FUZZ_READY" ]; then
        skip "fuzz targets: their tools could not be installed (the fuzz build step says why)"
        return 0
    fi
    cargo run --quiet --example wire_dump -- --seeds "$corpus" >/dev/null
    # libFuzzer runs on one CPU: the two targets run at once
    for target in decode stream; do
        (cd fuzz && cargo +nightly fuzz run -O "$target" "$corpus/$target" -- \
            -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 >"$STEP_OUT/fuzz-$target.log" 2>&1) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    for target in decode stream; do
        if [ "$failed" = 1 ]; then
            sed "s/^/fuzz $target: /" "$STEP_OUT/fuzz-$target.log"
        else
            grep -E '^(stat::number_of_executed_units|Done)' "$STEP_OUT/fuzz-$target.log" | sed "s/^/fuzz $target: /"
        fi
    done
    return "$failed"
}
FUZZ_SECONDS=${FUZZ_SECONDS:-30}

step "setup: C compilers and uapi headers for the kernel ABI test" bash tests/setup/kernel-abi.sh
step "setup: gdb for the seccomp test" bash tests/setup/test-tools.sh
step "formatting (cargo fmt --check)" cargo fmt --all -- --check
step "lints (cargo clippy --all-targets -D warnings)" cargo clippy --all-targets -- -D warnings
step "test suite (cargo test)" cargo test --all-targets
step "powerpc64le type check (cargo check --target powerpc64le-unknown-linux-gnu)" \
    bash tests/setup/ppc64le-target.sh
step "demo (cargo run --example demo)" demo
step "setup: lab packages, the ppc64el kernels (6.12, newest Debian), busybox, libseccomp.a (tests/lab/setup.sh)" bash tests/lab/setup.sh
# The QEMU series check is mostly a parallel build; beside it run the single-threaded emulators of
# the real-kernel lab and the fuzz targets' tool installs (downloads, then a build).
beside "real-kernel lab (two Linux ppc64le kernels under QEMU TCG: powernv9, powernv10, pseries nested HV and PAPR)" \
    bash tests/lab/run.sh
beside "fuzz targets' tools and build (nightly Rust, cargo-fuzz, cargo fuzz build)" fuzz_build
step "QEMU series (qemu-patches/check: checkpatch, x86_64 + ppc64le build per patch, ppc64 qtests, unit test, smoke, hostile back-end)" \
    bash qemu-patches/check
# It needs the x86_64 build of the patched QEMU that the check leaves in its cache.
step "libvirt on x86_64 (tests/libvirt/x86.sh: Debian's libvirtd, the hook, pseries TCG domains with the patched QEMU)" \
    bash tests/libvirt/x86.sh
step "join the background steps" join_beside
# Both boot emulated POWER9 hosts; they share the CPU slots (tests/lab/boots.sh).
beside "libvirt in a ppc64el host (tests/lab/libvirt-host.sh: libvirtd starts KVM guests with a passed-through NIC through the hook, both modes)" \
    bash tests/lab/libvirt-host.sh
step "end to end (patched QEMU + tce-sidecar + KVM guest with a passed-through NIC, nested in powernv9)" \
    bash tests/lab/nested.sh
step "join the libvirt run on ppc64le" join_beside
step "fuzz targets (cargo fuzz, $FUZZ_SECONDS s each, both at once)" fuzz_run

echo
echo "all tests passed"
