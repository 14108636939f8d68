#!/usr/bin/env bash
# Installs what the real-kernel lab needs and caches the ppc64el downloads; safe to rerun.
#
# - host packages: qemu-system-ppc from bookworm-backports (QEMU 10.0: powernv9/10 and pseries
#   with nested HV or nested PAPR), gcc-powerpc64le-linux-gnu (the linker for the static Rust
#   binaries), cpio, xz-utils, kmod (depmod), gzip;
# - the Debian ppc64el 6.12 kernel image and busybox-static, fetched through a private apt
#   configuration under the cache (APT::Architecture ppc64el), so the host's dpkg architectures
#   are left untouched; extracted once per version;
# - the powerpc64le-unknown-linux-gnu Rust target.
#
# Cache: ${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}. On success it writes
# $CACHE/lab.env (paths of the kernel and busybox) for run.sh and prints "lab setup: ok".
# Anything that cannot be installed: one "SKIP: <what> (<why>)" line and exit 0. Any other
# failure exits non-zero.
set -euo pipefail

CACHE=${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}
# The kernel series the lab needs: 6.1 (bookworm) cannot bind vfio-pci on powerpc.
KERNEL_SUITE=bookworm-backports
KERNEL_SERIES=6.12
RUST_TARGET=powerpc64le-unknown-linux-gnu

skip() {
    echo "SKIP: $1 ($2)"
    exit 0
}
log() { echo "lab setup: $*"; }

export DEBIAN_FRONTEND=noninteractive
apt_quiet() { apt-get -q -o Dpkg::Use-Pty=0 "$@" >/dev/null 2>"$CACHE/apt.err"; }
last_err() { tail -n 1 "$CACHE/apt.err" 2>/dev/null || true; }

mkdir -p "$CACHE"

# --- host packages -------------------------------------------------------------------------
qemu_ok() {
    command -v qemu-system-ppc64 >/dev/null 2>&1 &&
        qemu-system-ppc64 -M help 2>/dev/null | grep -q '^powernv10 ' &&
        qemu-system-ppc64 -M pseries,help 2>/dev/null | grep -q 'cap-nested-papr'
}
tools_ok() {
    local t
    for t in powerpc64le-linux-gnu-gcc cpio xz depmod gzip apt-get dpkg-deb; do
        command -v "$t" >/dev/null 2>&1 || return 1
    done
}

if ! qemu_ok || ! tools_ok; then
    [ "$(id -u)" = 0 ] || skip "lab host packages" "not root, and qemu-system-ppc 10 or a tool is missing"
    command -v apt-get >/dev/null 2>&1 || skip "lab host packages" "no apt-get on this host"
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports as an apt source"
        cat >/etc/apt/sources.list.d/tce-sidecar-lab-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt_quiet update || skip "lab host packages" "apt-get update failed: $(last_err)"
    if ! qemu_ok; then
        log "installing qemu-system-ppc from bookworm-backports"
        apt_quiet install -y --no-install-recommends -t bookworm-backports qemu-system-ppc ||
            skip "qemu-system-ppc (bookworm-backports)" "apt-get install failed: $(last_err)"
        qemu_ok || skip "qemu-system-ppc" "installed, but it lacks powernv10 or cap-nested-papr"
    fi
    if ! tools_ok; then
        log "installing gcc-powerpc64le-linux-gnu cpio xz-utils kmod gzip"
        apt_quiet install -y --no-install-recommends gcc-powerpc64le-linux-gnu libc6-dev-ppc64el-cross \
            cpio xz-utils kmod gzip ||
            skip "gcc-powerpc64le-linux-gnu cpio xz-utils kmod" "apt-get install failed: $(last_err)"
    fi
fi
log "$(qemu-system-ppc64 --version | head -n 1)"

# --- private ppc64el apt tree --------------------------------------------------------------
A=$CACHE/apt
mkdir -p "$A/etc/apt/sources.list.d" "$A/etc/apt/preferences.d" "$A/etc/apt/apt.conf.d" \
    "$A/lists/partial" "$A/archives/partial" "$A/dpkg" "$CACHE/debs"
touch "$A/dpkg/status"
cat >"$A/etc/apt/sources.list" <<'EOF'
deb [arch=ppc64el signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [arch=ppc64el signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
cat >"$A/apt.conf" <<EOF
Dir::Etc "$A/etc/apt/";
Dir::State "$A/";
Dir::State::lists "$A/lists/";
Dir::State::status "$A/dpkg/status";
Dir::Cache "$A/";
Dir::Cache::archives "$A/archives/";
APT::Architecture "ppc64el";
APT::Architectures { "ppc64el"; };
Debug::NoLocking "true";
EOF
papt() { APT_CONFIG=$A/apt.conf "$@"; }

# Refresh the indexes at most once a day.
if [ -z "$(find "$A/lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n 1)" ]; then
    log "updating the private ppc64el package lists"
    papt apt-get -q update >/dev/null 2>"$CACHE/apt.err" ||
        skip "ppc64el package lists" "apt-get update (private ppc64el tree) failed: $(last_err)"
fi

# The versioned image the suite's meta package depends on, e.g. linux-image-6.12.57+deb12-powerpc64le.
image=$(papt apt-cache show "linux-image-powerpc64le/$KERNEL_SUITE" 2>/dev/null |
    sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-powerpc64le\).*/\1/p' | head -n 1)
case $image in
linux-image-"$KERNEL_SERIES".*) ;;
*) skip "ppc64el $KERNEL_SERIES kernel" "linux-image-powerpc64le/$KERNEL_SUITE resolves to '${image:-nothing}'" ;;
esac
image_version=$(papt apt-cache show "$image/$KERNEL_SUITE" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
busybox_version=$(papt apt-cache show busybox-static/bookworm 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
[ -n "$image_version" ] || skip "ppc64el kernel $image" "no version in the package lists"
[ -n "$busybox_version" ] || skip "ppc64el busybox-static" "not in the package lists"

fetch() { # fetch PACKAGE VERSION -> path of the .deb in $CACHE/debs
    local pkg=$1 ver=$2 deb
    deb=$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
        [ "$(dpkg-deb -f "$f" Version)" = "$ver" ] && echo "$f"
    done | head -n 1)
    if [ -z "$deb" ]; then
        (cd "$CACHE/debs" && papt apt-get -q download "$pkg=$ver" >/dev/null 2>"$CACHE/apt.err") ||
            return 1
        deb=$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
            [ "$(dpkg-deb -f "$f" Version)" = "$ver" ] && echo "$f"
        done | head -n 1)
    fi
    [ -n "$deb" ] && echo "$deb"
}

kdir=$CACHE/kernel-$image_version
if [ ! -f "$kdir/.done" ]; then
    log "downloading $image $image_version"
    deb=$(fetch "$image" "$image_version") || skip "ppc64el kernel $image $image_version" "apt-get download failed: $(last_err)"
    rm -rf "$kdir" && mkdir -p "$kdir"
    dpkg-deb -x "$deb" "$kdir"
    kver=$(ls "$kdir/lib/modules")
    depmod -b "$kdir" "$kver"
    touch "$kdir/.done"
fi
kver=$(ls "$kdir/lib/modules")
vmlinux=$(find "$kdir/boot" -name 'vmlinux-*' | head -n 1)
[ -n "$vmlinux" ] || {
    echo "lab setup: no vmlinux in $kdir/boot" >&2
    exit 1
}

bdir=$CACHE/busybox-$busybox_version
if [ ! -f "$bdir/.done" ]; then
    log "downloading busybox-static $busybox_version"
    deb=$(fetch busybox-static "$busybox_version") || skip "ppc64el busybox-static $busybox_version" "apt-get download failed: $(last_err)"
    rm -rf "$bdir" && mkdir -p "$bdir"
    dpkg-deb -x "$deb" "$bdir"
    touch "$bdir/.done"
fi

# --- Rust target ---------------------------------------------------------------------------
command -v rustup >/dev/null 2>&1 || skip "Rust target $RUST_TARGET" "rustup is not available"
if ! rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET"; then
    out=$(rustup target add "$RUST_TARGET" 2>&1) || skip "Rust target $RUST_TARGET" "rustup target add failed: $(echo "$out" | tail -n 1)"
fi

cat >"$CACHE/lab.env" <<EOF
LAB_KERNEL_DIR=$kdir
LAB_KERNEL_RELEASE=$kver
LAB_VMLINUX=$vmlinux
LAB_BUSYBOX=$bdir/bin/busybox
EOF
log "kernel $kver, busybox $busybox_version, cache $CACHE"
echo "lab setup: ok"
