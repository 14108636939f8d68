#!/usr/bin/env bash
# Installs what the real-kernel lab needs and caches the ppc64el downloads; safe to rerun.
#
# - host packages: qemu-system-ppc from bookworm-backports (QEMU 10.0: powernv9/10 and pseries
#   with nested HV or nested PAPR), gcc-powerpc64le-linux-gnu (the linker for the static Rust
#   binaries), cpio, xz-utils, kmod (depmod), gzip;
# - through private apt configurations under the cache (APT::Architecture ppc64el), so the host's
#   dpkg architectures are left untouched, each .deb extracted once per version:
#   - the Debian ppc64el 6.12 kernel (bookworm-backports), the lab's first kernel;
#   - the newest Debian ppc64el kernel of sid and forky, the lab's second kernel (what a current
#     Debian installs); if it cannot be fetched, one "SKIP:" line and the lab runs on 6.12 alone;
#   - busybox-static and libseccomp-dev of bookworm, the suite whose glibc the cross toolchain
#     (gcc-powerpc64le-linux-gnu, libc6-dev-ppc64el-cross) is built on: the static libseccomp.a
#     the ppc64le sidecar links (tests/lab/ppc64-env.sh);
# - the powerpc64le-unknown-linux-gnu Rust target.
#
# Cache: ${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}. On success it writes
# $CACHE/lab.env and prints "lab setup: ok" last. lab.env holds LAB_BUSYBOX, LAB_LIBSECCOMP_DIR
# (the directory of libseccomp.a), LAB_KERNEL_DIR, LAB_KERNEL_RELEASE and LAB_VMLINUX (the 6.12
# kernel), and the list of kernels: LAB_KERNELS=N and, for each n in 1..N, LAB_KERNEL_<n>_DIR,
# _RELEASE, _VMLINUX and _VERSION (the upstream version, e.g. 6.12.57); kernel 1 is the 6.12 one.
# Anything that cannot be installed: one "SKIP: <what> (<why>)" line; exit 0 without "lab setup:
# ok" if the lab cannot run at all. Any other failure exits non-zero.
set -euo pipefail

CACHE=${TCE_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tce-sidecar-lab}
# The kernel series the lab needs: 6.1 (bookworm) cannot bind vfio-pci on powerpc.
KERNEL_SUITE=bookworm-backports
KERNEL_SERIES=6.12
# The suites of the newest kernel: unstable, and testing should unstable have none for ppc64el.
NEW_KERNEL_SUITES="sid forky"
# The suite of the host's cross toolchain (Debian 12): its glibc is the one the static binaries
# link, so the static libraries they link come from the same suite.
TOOLCHAIN_SUITE=bookworm
RUST_TARGET=powerpc64le-unknown-linux-gnu

skip() {
    echo "SKIP: $1 ($2)"
    exit 0
}
log() { echo "lab setup: $*"; }

export DEBIAN_FRONTEND=noninteractive
apt_quiet() { apt-get -q -o Dpkg::Use-Pty=0 "$@" >/dev/null 2>"$CACHE/apt.err"; }
last_err() { grep -v '^W: ' "$CACHE/apt.err" 2>/dev/null | tail -n 1 || true; }

mkdir -p "$CACHE"
# Labs that run at once (the nested lab and the libvirt host) both call this: one at a time, the
# second then finds everything in place.
exec 9>"$CACHE/.setup.lock"
flock 9

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
        cat >/etc/apt/sources.list.d/tce-sidecar-lab-backports.sources <<'EOT'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
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

# --- private ppc64el apt trees -------------------------------------------------------------
# apt_tree DIR SUITE...: the configuration of a private ppc64el apt tree in DIR with the main
# component of each SUITE. Two trees: $CACHE/apt (bookworm and bookworm-backports) and
# $CACHE/apt-new (the suites of the newest kernel), so that either failing leaves the other.
apt_tree() {
    local a=$1 suite
    shift
    mkdir -p "$a/etc/apt/sources.list.d" "$a/etc/apt/preferences.d" "$a/etc/apt/apt.conf.d" \
        "$a/lists/partial" "$a/archives/partial" "$a/dpkg"
    touch "$a/dpkg/status"
    for suite in "$@"; do
        echo "deb [arch=ppc64el signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main"
    done >"$a/sources.new"
    # rewritten only when it changes: a newer list of sources calls for an update (refresh)
    if cmp -s "$a/sources.new" "$a/etc/apt/sources.list"; then
        rm "$a/sources.new"
    else
        mv "$a/sources.new" "$a/etc/apt/sources.list"
    fi
    cat >"$a/apt.conf" <<EOT
Dir::Etc "$a/etc/apt/";
Dir::State "$a/";
Dir::State::lists "$a/lists/";
Dir::State::status "$a/dpkg/status";
Dir::Cache "$a/";
Dir::Cache::archives "$a/archives/";
APT::Architecture "ppc64el";
APT::Architectures { "ppc64el"; };
Debug::NoLocking "true";
EOT
}
papt() { # papt TREE COMMAND...: COMMAND with the configuration of a private tree
    local a=$1
    shift
    APT_CONFIG=$a/apt.conf "$@"
}
# refresh TREE: updates a tree's indexes, at most once a day and whenever its sources change
# (the stamp TREE/updated). A Release file past its Valid-Until (a mirror or proxy serving an older
# snapshot of a suite that is re-signed weekly) is used anyway, saying so: the signatures are still
# checked. Returns 1 if the update failed.
refresh() {
    local a=$1
    if [ -n "$(find "$a/updated" -mmin -1440 -newer "$a/etc/apt/sources.list" 2>/dev/null)" ]; then
        return 0
    fi
    log "updating the package lists of $(basename "$a") ($(sed -n 's/.* \([^ ]*\) main$/\1/p' "$a/etc/apt/sources.list" | tr '\n' ' ' | sed 's/ $//'))"
    if ! papt "$a" apt-get -q update >/dev/null 2>"$CACHE/apt.err" ||
        grep -q '^E: ' "$CACHE/apt.err"; then
        grep -q '^E: Release file for .* is expired' "$CACHE/apt.err" || return 1
        log "$(grep -m1 '^E: Release file for .* is expired' "$CACHE/apt.err" | sed 's/^E: //; s/)\..*/)/'): using it anyway (its signature is still checked)"
        papt "$a" apt-get -q -o Acquire::Check-Valid-Until=false update >/dev/null 2>"$CACHE/apt.err" ||
            return 1
        ! grep -q '^E: ' "$CACHE/apt.err" || return 1
    fi
    touch "$a/updated"
}

A=$CACHE/apt
ANEW=$CACHE/apt-new
mkdir -p "$CACHE/debs"
apt_tree "$A" bookworm bookworm-backports
# shellcheck disable=SC2086
apt_tree "$ANEW" $NEW_KERNEL_SUITES
refresh "$A" || skip "ppc64el package lists" "apt-get update (private ppc64el tree) failed: $(last_err)"

deb_of() { # deb_of PACKAGE VERSION: the cached .deb of PACKAGE at VERSION, if any
    find "$CACHE/debs" -maxdepth 1 -name "${1}_*.deb" | while read -r f; do
        [ "$(dpkg-deb -f "$f" Version)" = "$2" ] && echo "$f"
    done | head -n 1
}
fetch() { # fetch TREE PACKAGE VERSION -> path of the .deb in $CACHE/debs
    local a=$1 pkg=$2 ver=$3 deb
    deb=$(deb_of "$pkg" "$ver")
    if [ -z "$deb" ]; then
        (cd "$CACHE/debs" && papt "$a" apt-get -q download "$pkg=$ver" >/dev/null 2>"$CACHE/apt.err") ||
            return 1
        deb=$(deb_of "$pkg" "$ver")
    fi
    [ -n "$deb" ] && echo "$deb"
}
version_of() { # version_of TREE PACKAGE[/SUITE]: its newest version in the tree's lists
    papt "$1" apt-cache show "$2" 2>/dev/null | sed -n 's/^Version: //p' | sort -V -r | head -n 1 ||
        true
}

# get_kernel TREE SUITE...: the newest kernel that linux-image-powerpc64le of these suites
# depends on, downloaded and extracted once per version into $CACHE/kernel-<version>. Debian
# splits newer kernels into linux-image-<abi> (empty) and linux-binary-<abi> (the image),
# linux-modules-<abi> and linux-base-<abi> (config, System.map) under /usr/lib/modules; the
# extracted tree gets /lib -> usr/lib so that both layouts are read alike. Sets KDIR, KREL (the
# release, e.g. 6.12.57+deb12-powerpc64le) and KVMLINUX; on failure returns 1 with WHY set.
get_kernel() {
    local a=$1 suite meta="" meta_version="" v image image_version pkgs p deb
    shift
    for suite in "$@"; do
        v=$(version_of "$a" "linux-image-powerpc64le/$suite")
        if [ -n "$v" ] && { [ -z "$meta_version" ] || dpkg --compare-versions "$v" gt "$meta_version"; }; then
            meta=linux-image-powerpc64le/$suite meta_version=$v
        fi
    done
    [ -n "$meta" ] || {
        WHY="no linux-image-powerpc64le in $*"
        return 1
    }
    image=$(papt "$a" apt-cache show "linux-image-powerpc64le=$meta_version" 2>/dev/null |
        sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-powerpc64le\)\([ ,].*\)\{0,1\}$/\1/p' | head -n 1)
    [ -n "$image" ] || {
        WHY="$meta $meta_version depends on no versioned linux-image"
        return 1
    }
    image_version=$(version_of "$a" "$image")
    [ -n "$image_version" ] || {
        WHY="no version of $image in the package lists"
        return 1
    }
    KIMAGE=$image
    KDIR=$CACHE/kernel-$image_version
    if [ ! -f "$KDIR/.done" ]; then
        # the image package and the parts it depends on at its own version
        pkgs="$image $(papt "$a" apt-cache show "$image=$image_version" 2>/dev/null |
            sed -n 's/^Depends: //p' | head -n 1 | tr ',' '\n' |
            sed -n "s/^ *\(linux-\(binary\|modules\|base\)-[^ ]*\) (= ${image_version//./\\.}).*/\1/p" | tr '\n' ' ')"
        rm -rf "$KDIR" && mkdir -p "$KDIR"
        for p in $pkgs; do
            log "downloading $p $image_version"
            deb=$(fetch "$a" "$p" "$image_version") || {
                WHY="apt-get download $p=$image_version failed: $(last_err)"
                return 1
            }
            dpkg-deb -x "$deb" "$KDIR" || {
                WHY="dpkg-deb -x $deb failed"
                return 1
            }
        done
        if [ ! -e "$KDIR/lib" ] && [ -d "$KDIR/usr/lib/modules" ]; then
            ln -s usr/lib "$KDIR/lib"
        fi
        KREL=$(ls "$KDIR/lib/modules" 2>/dev/null || true)
        if [ -z "$KREL" ] || [ "$(wc -l <<<"$KREL")" != 1 ]; then
            WHY="not one kernel release in $KDIR/lib/modules: '${KREL//$'\n'/ }'"
            return 1
        fi
        depmod -b "$KDIR" "$KREL" || {
            WHY="depmod -b $KDIR $KREL failed"
            return 1
        }
        touch "$KDIR/.done"
    fi
    KREL=$(ls "$KDIR/lib/modules")
    KVMLINUX=""
    for p in "$KDIR/boot/vmlinux-$KREL" "$KDIR/lib/modules/$KREL/vmlinuz" "$KDIR/lib/modules/$KREL/vmlinux"; do
        if [ -f "$p" ] && [ "$(head -c 4 "$p" | tr -d '\0')" = "$(printf '\177ELF')" ]; then
            KVMLINUX=$p
            break
        fi
    done
    [ -n "$KVMLINUX" ] || {
        WHY="no ELF kernel image in $KDIR"
        return 1
    }
}

# The 6.12 kernel: without it there is no lab.
get_kernel "$A" "$KERNEL_SUITE" || skip "ppc64el $KERNEL_SERIES kernel" "$WHY"
case $KREL in
"$KERNEL_SERIES".*) ;;
*) skip "ppc64el $KERNEL_SERIES kernel" "linux-image-powerpc64le/$KERNEL_SUITE resolves to $KIMAGE" ;;
esac
kernels=("$KDIR|$KREL|$KVMLINUX")
first_version=${KREL%%[+-]*}

# The newest kernel: without it the lab runs on 6.12 alone.
# shellcheck disable=SC2086
if ! refresh "$ANEW"; then
    echo "SKIP: the newest ppc64el kernel ($NEW_KERNEL_SUITES) (apt-get update of its private tree failed: $(last_err))"
elif ! get_kernel "$ANEW" $NEW_KERNEL_SUITES; then
    echo "SKIP: the newest ppc64el kernel ($NEW_KERNEL_SUITES) ($WHY)"
elif [ "${KREL%%[+-]*}" != "$first_version" ]; then
    kernels+=("$KDIR|$KREL|$KVMLINUX")
fi

# extract_once PACKAGE VERSION DIR: the ppc64el package's files under DIR, downloaded and
# extracted once per version
extract_once() {
    [ -f "$3/.done" ] && return 0
    log "downloading $1 $2"
    local deb
    deb=$(fetch "$A" "$1" "$2") || skip "ppc64el $1 $2" "apt-get download failed: $(last_err)"
    rm -rf "$3" && mkdir -p "$3"
    dpkg-deb -x "$deb" "$3"
    touch "$3/.done"
}

busybox_version=$(version_of "$A" busybox-static/bookworm)
[ -n "$busybox_version" ] || skip "ppc64el busybox-static" "not in the package lists"
bdir=$CACHE/busybox-$busybox_version
extract_once busybox-static "$busybox_version" "$bdir"

seccomp_version=$(version_of "$A" "libseccomp-dev/$TOOLCHAIN_SUITE")
[ -n "$seccomp_version" ] || skip "ppc64el libseccomp-dev ($TOOLCHAIN_SUITE)" "not in the package lists"
sdir=$CACHE/libseccomp-$seccomp_version
extract_once libseccomp-dev "$seccomp_version" "$sdir"
seccomp_a=$(find "$sdir" -name libseccomp.a | head -n 1)
[ -n "$seccomp_a" ] || {
    echo "lab setup: no libseccomp.a in $sdir" >&2
    exit 1
}

# --- Rust target ---------------------------------------------------------------------------
command -v rustup >/dev/null 2>&1 || skip "Rust target $RUST_TARGET" "rustup is not available"
if ! rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET"; then
    out=$(rustup target add "$RUST_TARGET" 2>&1) || skip "Rust target $RUST_TARGET" "rustup target add failed: $(echo "$out" | tail -n 1)"
fi

{
    IFS='|' read -r kdir kver vmlinux <<<"${kernels[0]}"
    printf '%s=%q\n' LAB_KERNEL_DIR "$kdir" LAB_KERNEL_RELEASE "$kver" LAB_VMLINUX "$vmlinux" \
        LAB_BUSYBOX "$bdir/bin/busybox" LAB_LIBSECCOMP_DIR "$(dirname "$seccomp_a")" \
        LAB_KERNELS "${#kernels[@]}"
    for n in "${!kernels[@]}"; do
        IFS='|' read -r kdir kver vmlinux <<<"${kernels[$n]}"
        printf "LAB_KERNEL_$((n + 1))_%s=%q\n" DIR "$kdir" RELEASE "$kver" VMLINUX "$vmlinux" \
            VERSION "${kver%%[+-]*}"
    done
} >"$CACHE/lab.env"
names=""
for k in "${kernels[@]}"; do names="${names:+$names, }$(cut -d'|' -f2 <<<"$k")"; done
log "kernels $names; busybox $busybox_version; libseccomp $seccomp_version; cache $CACHE"
echo "lab setup: ok"
