#!/bin/sh
# The L2 guest's init, for the nested lab and the libvirt host (copied into its initramfs).
# L2's part of a case: boot, network, one download (during which L1 may kill the sidecar). Each
# stage is a line on the serial console, which L1 waits for, and the download reports its bytes.
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
if [ -n "$(arg NESTED_FAULT)" ]; then
    echo "L2-FAULT-START"
    download during-fault
else
    download first
fi
dmesg | grep -iE 'e1000e|iommu|tce|dma' | tail -n 8
echo "L2-DONE"
sleep 600
