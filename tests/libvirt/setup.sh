#!/usr/bin/env bash
# Installs what tests/libvirt/x86.sh needs: Debian's libvirtd with its QEMU driver and virsh
# (libvirt-daemon-system, libvirt-daemon-driver-qemu, libvirt-clients), SLOF and VOF for the
# pseries machine (qemu-system-data), and setpriv (util-linux), all without recommends.
#
# Idempotent: installed packages are not touched. Prints `libvirt setup: ok` when everything is
# there; otherwise one `SKIP:` line saying what is missing and why, and exits 0, so that the test
# can skip rather than fail on a machine where it cannot run.
set -u

PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-data util-linux)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        echo "SKIP: libvirt test (cannot apt-get install ${missing[*]}: no apt-get or not root)"
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    # the packages' maintainer scripts must not try to start services on a machine without an
    # init that could run them; the test starts the daemons itself
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        if ! out=$(apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1); then
            echo "$out" | tail -n 5 | sed 's/^/  apt-get: /'
            echo "SKIP: libvirt test (apt-get install ${missing[*]} failed)"
            exit 0
        fi
    fi
    echo "libvirt setup: installed ${missing[*]}"
fi
for tool in libvirtd virtlogd virsh setpriv python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "SKIP: libvirt test (no $tool after the install)"
        exit 0
    fi
done
if ! id libvirt-qemu >/dev/null 2>&1; then
    echo "SKIP: libvirt test (libvirt-daemon-system did not create the user libvirt-qemu)"
    exit 0
fi
for f in slof.bin vof.bin; do
    if [ ! -f "/usr/share/qemu/$f" ]; then
        echo "SKIP: libvirt test (no /usr/share/qemu/$f after installing qemu-system-data)"
        exit 0
    fi
done
echo "libvirt setup: ok"
