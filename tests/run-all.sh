#!/usr/bin/env bash
# Runs every test of tce-sidecar: formatting, clippy, the cargo test suite, the powerpc64le type
# check, the demo, the real-kernel lab (ppc64le under QEMU), the QEMU patch series (checkpatch,
# builds, smoke test), and the fuzz targets for a while. It first installs what the tests need; anything it cannot install is
# reported on a line starting with "SKIP:" that names what was skipped and why.
#
# Environment: FUZZ_SECONDS (default 30) is the run time of each fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
skip() { printf 'SKIP: %s\n' "$*"; }

step "setup: C compilers and uapi headers for the kernel ABI test"
bash tests/setup/kernel-abi.sh

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy --all-targets -D warnings)"
cargo clippy --all-targets -- -D warnings

step "test suite (cargo test)"
cargo test --all-targets

step "powerpc64le type check (cargo check --target powerpc64le-unknown-linux-gnu)"
bash tests/setup/ppc64le-target.sh

step "demo (cargo run --example demo)"
demo_out=$(mktemp)
cargo run --quiet --example demo > "$demo_out"
grep -E "^(== |    completed|    exits|hypercalls completed)" "$demo_out"
rm -f "$demo_out"

step "real-kernel lab (Linux ppc64le under QEMU TCG: powernv9, powernv10, pseries nested HV and PAPR)"
bash tests/lab/run.sh

step "QEMU series (qemu-patches/check: checkpatch, x86_64 + ppc64le build per patch, ppc64 qtests, smoke)"
bash qemu-patches/check

step "end to end (patched QEMU + tce-sidecar + KVM guest with a passed-through NIC, nested in powernv9)"
bash tests/lab/nested.sh

step "fuzz targets (cargo fuzz, ${FUZZ_SECONDS:=30} s each)"
fuzz_ready=true
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    skip "fuzz targets: no nightly Rust toolchain, and 'rustup toolchain install nightly' failed"
    fuzz_ready=false
  fi
fi
if $fuzz_ready && ! command -v cargo-fuzz >/dev/null 2>&1; then
  if ! cargo install cargo-fuzz --locked >/dev/null 2>&1; then
    skip "fuzz targets: 'cargo install cargo-fuzz' failed"
    fuzz_ready=false
  fi
fi
if $fuzz_ready; then
  corpus=$(mktemp -d)
  trap 'rm -rf "$corpus"' EXIT
  cargo run --quiet --example wire_dump -- --seeds "$corpus" >/dev/null
  (cd fuzz && cargo +nightly fuzz build -O)
  for target in decode stream; do
    (cd fuzz && cargo +nightly fuzz run -O "$target" "$corpus/$target" -- \
      -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 2>&1) | grep -E '^(stat::number_of_executed_units|Done)' \
      | sed "s/^/fuzz $target: /"
  done
fi

echo
echo "all tests passed"
