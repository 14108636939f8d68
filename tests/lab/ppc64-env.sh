#!/usr/bin/env bash
# The environment of a static powerpc64le-unknown-linux-gnu build of the crate, as the labs build
# it: the cross linker, +crt-static, and libseccomp linked statically from the ppc64el
# libseccomp.a that tests/lab/setup.sh extracts (LAB_LIBSECCOMP_DIR in its lab.env).
#
#   tests/lab/ppc64-env.sh                 prints the variables as `export NAME=VALUE` lines
#                                          (shell-quoted), for eval "$(tests/lab/ppc64-env.sh)"
#   tests/lab/ppc64-env.sh COMMAND [ARG]...  runs COMMAND with them, e.g.
#                                          tests/lab/ppc64-env.sh cargo build --target powerpc64le-unknown-linux-gnu
#
# The variables: CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_LINKER,
# CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_RUSTFLAGS, LIBSECCOMP_LINK_TYPE=static and
# LIBSECCOMP_LIB_PATH. The last two are read by libseccomp-sys whatever the target: use them for
# powerpc64le builds only (a host build in the same command would look for the ppc64el library).
#
# Needs tests/lab/setup.sh to have run (TCE_LAB_CACHE as there); without its lab.env or
# libseccomp.a, says so on stderr and exits 1.
set -euo pipefail
CACHE=${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}
LAB_LIBSECCOMP_DIR=""
if [ -f "$CACHE/lab.env" ]; then
    # shellcheck disable=SC1091
    . "$CACHE/lab.env"
fi
if [ -z "$LAB_LIBSECCOMP_DIR" ] || [ ! -f "$LAB_LIBSECCOMP_DIR/libseccomp.a" ]; then
    echo "ppc64-env: no ppc64el libseccomp.a (LAB_LIBSECCOMP_DIR in $CACHE/lab.env): run tests/lab/setup.sh first" >&2
    exit 1
fi
vars=(
    CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_LINKER=powerpc64le-linux-gnu-gcc
    "CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_RUSTFLAGS=-C target-feature=+crt-static"
    LIBSECCOMP_LINK_TYPE=static
    "LIBSECCOMP_LIB_PATH=$LAB_LIBSECCOMP_DIR"
)
if [ $# = 0 ]; then
    for v in "${vars[@]}"; do
        printf 'export %s=%q\n' "${v%%=*}" "${v#*=}"
    done
else
    exec env "${vars[@]}" "$@"
fi
