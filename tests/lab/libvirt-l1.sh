#!/bin/bash
# lab.service in L1 of tests/lab/libvirt-host.sh (a Debian ppc64el host with systemd and
# libvirt in the emulated POWER9). Its output is L1's console; the host powers off when it ends.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
STAGE=$(cat /opt/lab/stage)
# straight to the console, so that STEP lines begin their lines (tests/lab/boots.sh)
exec >/dev/console 2>&1
uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "L1: lab.service started at $(uptime_s) s of uptime; kernel $(uname -r)"
echo "STEP case=host step=virsh-list seconds=600"
t0=$(uptime_s)
i=0
until virsh -c qemu:///system list >/tmp/virsh.out 2>&1; do
    i=$((i + 1))
    [ $i -ge 600 ] && break
    sleep 1
done
t1=$(uptime_s)
echo "L1: virsh list answered at $t1 s of uptime (waited $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s):"
sed 's/^/L1:   /' /tmp/virsh.out
echo "L1: $(systemd-analyze 2>&1 | head -n1)"
systemd-analyze blame 2>/dev/null | head -n 12 | sed 's/^/L1: blame /'
systemctl is-active libvirtd.service libvirtd.socket virtlogd.socket 2>&1 | tr '\n' ' ' | sed 's/^/L1: active: /'
echo
systemctl --failed --no-legend 2>&1 | sed 's/^/L1: failed unit: /'
virsh -c qemu:///system version 2>&1 | sed 's/^/L1: /'
result=PASS
grep -q 'Id' /tmp/virsh.out || result=FAIL
echo "LIBVIRT-PPC64 stage=boot result=$result virsh_list_at_s=$t1"

if [ "$STAGE" = domain ] && [ $result = PASS ]; then
    . /opt/lab/domain.sh
fi
echo "STEP case=host step=power-off seconds=120"
