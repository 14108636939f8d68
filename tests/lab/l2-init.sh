#!/bin/sh
# The L2 guest's init, for the nested lab and the libvirt host (copied into its initramfs).
# L2's part of a case: boot, network, one download (during which L1 may kill the sidecar), and
# what the guest sees of EEH. Each stage is a line on the serial console, which L1 waits for, and
# the download reports its bytes. With NESTED_HOTPLUG=TAG the download goes to RAM that L1
# hot-plugs instead, and the guest sends it back from there (hotplug below).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "L2-BOOTED"
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "L2: insmod $m failed"; done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
echo "L2-NETWORK carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null) after=${i}s"
download() {
    : >/tmp/blob
    (while sleep 5; do echo "L2-PROGRESS bytes=$(stat -c %s /tmp/blob)"; done) &
    progress=$!
    t0=$(cut -d' ' -f1 /proc/uptime)
    wget -q -O /tmp/blob "http://10.0.2.2:$(arg NESTED_PORT)/blob"
    t1=$(cut -d' ' -f1 /proc/uptime)
    kill $progress
    echo "L2-TRANSFER name=$1 bytes=$(stat -c %s /tmp/blob) seconds=$(awk -v a=$t0 -v b=$t1 'BEGIN { printf "%.2f", b - a }')"
    rm -f /tmp/blob
}
# The Movable zone's pages managed, and those in use, from /proc/zoneinfo (0 without the zone).
# Hot-plugged RAM is onlined there (memhp_default_state=online_movable), and it is the only RAM
# there: the zone is what the guest has of the DIMM.
movable() {
    awk -v want=$1 '/^Node .* zone +Movable/ { z = 1; next } /^Node / { z = 0 }
        z && $1 == "pages" && $2 == "free" { free = $3 } z && $1 == "managed" { managed = $2 }
        END { print (want == "used" ? managed - free : managed) + 0 }' /proc/zoneinfo
}

# hotplug TAG: waits for L1 to hot-plug a DIMM, downloads the blob into a tmpfs there (page
# cache pages are movable, so they come from the Movable zone, which the DIMM alone fills), and
# sends it back: busybox cat sends a file with sendfile(2), so the NIC reads the DIMM's pages by
# DMA. L0's server answers what it received. Then it lets go of the DIMM, and waits for L1 to
# unplug it.
hotplug() {
    echo "L2-HOTPLUG-READY"
    i=0
    while [ "$(movable managed)" -le 0 ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
    echo "L2-HOTPLUG-ADDED movable_pages=$(movable managed) after=${i}s"
    mkdir -p /hp
    mount -t tmpfs hp /hp
    before=$(movable used)
    wget -q -O /hp/blob "http://10.0.2.2:$(arg NESTED_PORT)/blob"
    after=$(movable used)
    page_kb=$(awk '/^KernelPageSize:/ { print $2; exit }' /proc/self/smaps)
    sent=$(sha256sum /hp/blob | cut -d' ' -f1)
    nc 10.0.2.2 "$(arg NESTED_UPLOAD_PORT)" -e sh -c "echo $1; cat /hp/blob"
    received=$(wget -q -O - "http://10.0.2.2:$(arg NESTED_PORT)/received/$1")
    echo "L2-HOTPLUG-UPLOAD bytes=$(stat -c %s /hp/blob) movable_kb=$(((after - before) * page_kb)) sent_sha256=$sent received=\"$received\""
    umount /hp
    echo "L2-HOTPLUG-RELEASED"
    i=0
    while [ "$(movable managed)" -gt 0 ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
    echo "L2-HOTPLUG-REMOVED movable_pages=$(movable managed) after=${i}s"
}

# EEH as the guest sees it: whether the kernel found the PHB capable, and the NIC's PE state,
# which the kernel reads through RTAS ibm,read-slot-reset-state2 (QEMU's VFIO container, or the
# sidecar's EEH_OP, answers it)
eeh_report() {
    capable=$(dmesg | grep -c 'EEH: Capable adapter found')
    state=$(cat /sys/bus/pci/devices/*/eeh_pe_state 2>/dev/null | head -n1)
    echo "L2-EEH capable=$capable pe_state=\"$state\""
}

if [ -n "$(arg NESTED_FAULT)" ]; then
    echo "L2-FAULT-START"
    download during-fault
elif [ -n "$(arg NESTED_HOTPLUG)" ]; then
    hotplug "$(arg NESTED_HOTPLUG)"
else
    download first
fi
eeh_report
dmesg | grep -iE 'e1000e|iommu|tce|dma|eeh|memory' | tail -n 12
echo "L2-DONE"
sleep 600
