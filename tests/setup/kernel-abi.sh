#!/usr/bin/env bash
# Installs what tests/kernel_abi.rs needs: the native C compiler with the kernel's uapi headers
# (linux-libc-dev), the powerpc64le cross compiler and the ppc64el uapi headers. The headers are
# only a Recommends of gcc-powerpc64le-linux-gnu, so they are named explicitly.
#
# Idempotent: when everything is present it changes nothing. When it cannot install (no apt-get,
# not root, the install fails) it prints one `SKIP:` line and exits 0; the test then prints its
# own `SKIP:` line for what is missing, so nothing passes silently.
set -u

have_all() {
    command -v gcc >/dev/null 2>&1 &&
        command -v powerpc64le-linux-gnu-gcc >/dev/null 2>&1 &&
        [ -f /usr/include/linux/vfio.h ] &&
        [ -f /usr/include/linux/kvm.h ] &&
        [ -f /usr/powerpc64le-linux-gnu/include/linux/vfio.h ]
}

if have_all; then
    echo "kernel-abi setup: compilers and uapi headers already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "SKIP: kernel ABI tools (apt-get not available to install gcc-powerpc64le-linux-gnu and linux-libc-dev)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "SKIP: kernel ABI tools (not root, cannot apt-get install gcc-powerpc64le-linux-gnu and linux-libc-dev)"
    exit 0
fi

packages="gcc linux-libc-dev gcc-powerpc64le-linux-gnu linux-libc-dev-ppc64el-cross"
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when apt does not know the cross compiler yet.
if ! apt-cache show gcc-powerpc64le-linux-gnu >/dev/null 2>&1; then
    if ! apt-get update -qq >/dev/null; then
        echo "SKIP: kernel ABI tools (apt-get update failed)"
        exit 0
    fi
fi
if ! apt-get install -y -qq --no-install-recommends $packages >/dev/null; then
    echo "SKIP: kernel ABI tools (apt-get install $packages failed)"
    exit 0
fi
if have_all; then
    echo "kernel-abi setup: installed $packages"
else
    echo "SKIP: kernel ABI tools (installed $packages but a compiler or header is still missing)"
fi
exit 0
