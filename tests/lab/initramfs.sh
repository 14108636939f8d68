# Helpers shared by the labs (sourced): an initramfs root with busybox and kernel modules from
# a lab kernel (needs LAB_BUSYBOX, LAB_KERNEL_DIR and LAB_KERNEL_RELEASE from tests/lab/setup.sh:
# the 6.12 kernel, or set to another kernel of its list), and the reading of a run's console log.

# busybox_root ROOT APPLET...: the skeleton of a root with busybox and these applets
busybox_root() {
    local root=$1 applet
    shift
    mkdir -p "$root"/{bin,proc,sys,dev,tmp,lib/modules}
    cp "$LAB_BUSYBOX" "$root/bin/busybox"
    for applet in "$@"; do
        ln -s busybox "$root/bin/$applet"
    done
    : >"$root/modules.order"
}

# copy_module ROOT NAME: module NAME and its dependencies into ROOT/lib/modules, appended to
# ROOT/modules.order in load order; nothing if the kernel has NAME built in
copy_module() {
    local root=$1 md=$LAB_KERNEL_DIR/lib/modules/$LAB_KERNEL_RELEASE line self deps m name
    if grep -qE "/$2\.ko$" "$md/modules.builtin" 2>/dev/null; then
        return 0
    fi
    line=$(grep -E "/$2\.ko(\.xz)?:" "$md/modules.dep") || {
        echo "lab: module $2 not in $md/modules.dep" >&2
        exit 1
    }
    self=${line%%:*}
    deps=${line#*:}
    # modules.dep lists dependencies nearest first: load them from the last one.
    for m in $(tr ' ' '\n' <<<"$deps" | tac) "$self"; do
        [ -n "$m" ] || continue
        name=$(basename "${m%.xz}")
        grep -qx "$name" "$root/modules.order" && continue
        case $m in
        *.xz) xz -dc "$md/$m" >"$root/lib/modules/$name" ;;
        *) cp "$md/$m" "$root/lib/modules/$name" ;;
        esac
        echo "$name" >>"$root/modules.order"
    done
}

# lab_modules ROOT: the modules of an emulated POWER host for KVM-HV guests with VFIO devices:
# kvm-hv, the sPAPR TCE IOMMU driver of VFIO containers and vfio-pci (with their dependencies).
# The Debian kernels of the lab (6.12 and 7.2) name and split them alike; one with a different
# set would be handled here.
lab_modules() {
    local m
    for m in kvm-hv vfio_iommu_spapr_tce vfio-pci; do copy_module "$1" "$m"; done
}

# kernel_warned LOG LABEL: whether LOG holds a kernel WARN splat ("WARNING: CPU: n PID: m at
# ..."), printed under LABEL. One is kvm_spapr_tce_release_vfio_group's, for a group file that
# leaves the kvm-vfio device without ever having been associated: the sidecar must never cause
# one. (Plain printk lines starting with "WARNING:", like pseries' nvram message, are not WARNs.)
kernel_warned() {
    grep -a -q 'WARNING: CPU:' "$1" || return 1
    echo "$2"
    grep -a -A3 'WARNING: CPU:' "$1" | tr -d '\r'
}

# copy_libraries DIR SYSROOT SKIP BINARY...: the shared libraries the ppc64le BINARYs need,
# transitively, from SYSROOT (the cross build's) into DIR; those whose name matches the extended
# regular expression SKIP (e.g. glibc's, where the target root has its own; "" skips none) are
# left out
copy_libraries() {
    local dir=$1 sysroot=$2 skip=$3 todo="" seen=" " lib f
    shift 3
    needed() { powerpc64le-linux-gnu-readelf -d "$1" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'; }
    for f in "$@"; do todo="$todo $(needed "$f")"; done
    while [ -n "${todo// /}" ]; do
        # shellcheck disable=SC2086
        set -- $todo
        lib=$1
        shift
        todo="$*"
        case $seen in *" $lib "*) continue ;; esac
        seen="$seen$lib "
        [ -n "$skip" ] && [[ $lib =~ $skip ]] && continue
        f=$(ls "$sysroot/lib/powerpc64le-linux-gnu/$lib" "$sysroot/usr/lib/powerpc64le-linux-gnu/$lib" 2>/dev/null | head -n1 || true)
        [ -n "$f" ] || {
            echo "lab: $lib (needed by QEMU) not in $sysroot" >&2
            exit 1
        }
        cp -L "$f" "$dir/$lib"
        todo="$todo $(needed "$f")"
    done
}

# start_l0_server WORK: tests/lab/l0-server.py on this machine (L0), which L2 reaches through
# -netdev user, serving WORK/www; sets server (its pid), port (HTTP) and upload_port
start_l0_server() {
    python3 tests/lab/l0-server.py "$1/www" "$1/http.port" "$1/upload.port" >"$1/http.log" 2>&1 &
    server=$!
    for _ in $(seq 50); do [ -s "$1/upload.port" ] && [ -s "$1/http.port" ] && break; sleep 0.1; done
    port=$(cat "$1/http.port" 2>/dev/null) || {
        cat "$1/http.log"
        echo "lab: the server on L0 did not start" >&2
        exit 1
    }
    upload_port=$(cat "$1/upload.port")
}
