#!/usr/bin/env bash
# Installs the tools the cargo test suite uses besides the compilers: gdb, with which
# tests/containment.rs makes a sandboxed worker call a system call outside its allowlist.
#
# Idempotent. When it cannot install (no apt-get, not root, the install fails) it prints one
# `SKIP:` line and exits 0; the test then prints its own `SKIP:` line, so nothing passes silently.
set -u

if command -v gdb >/dev/null 2>&1; then
    echo "test tools setup: gdb already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "SKIP: gdb for the seccomp test (cannot apt-get install it: no apt-get or not root)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends gdb >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    if ! apt-get install -y -qq --no-install-recommends gdb >/dev/null 2>&1; then
        echo "SKIP: gdb for the seccomp test (apt-get install gdb failed)"
        exit 0
    fi
fi
echo "test tools setup: installed gdb"
