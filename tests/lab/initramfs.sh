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
