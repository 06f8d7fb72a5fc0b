#!/bin/busybox sh
# ornament's /init: PID 1 of every guest image.
#
# It prepares a minimal system, runs the command that `ornament run` put in
# /ornament/cmd (a one-line script, `exec` plus the host's argv, each argument
# single-quoted) as its child, reports
# the exit status on the second serial port (ttyS1, read only by the host), and
# powers the guest off. Nothing else runs in the guest.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox --install -s /bin
export PATH=/ornament/bin:/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
cd /

report() {
    # The host reads exactly one line from ttyS1: "ornament-exit <status>".
    echo "ornament-exit $1" > /dev/ttyS1
}

if [ -s /ornament/cmd ]; then
    # The script execs the command, so the command itself is our child.
    sh /ornament/cmd
    status=$?
else
    echo "ornament: no command given; running the built-in demo (/ornament/bin/demo)"
    /ornament/bin/demo
    status=$?
fi
report "$status"
sync
poweroff -f
# poweroff -f does not return; if it does, panic=-1 reboots and QEMU exits.
exit "$status"
