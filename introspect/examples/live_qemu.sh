#!/bin/bash
# Check the readers against a real kernel: boot a Debian kernel under QEMU (TCG, KASLR on)
# with a busybox initramfs, stop it, dump the registers from the monitor, and list its
# tasks from outside with `live_ps` (guest RAM shared through a memory-backend-file).
#
# usage: introspect/examples/live_qemu.sh <release> [kernel root, default /tmp/k/x]
# needs: qemu-system-x86_64, a static /bin/busybox, cpio, python3; the kernel at
# <root>/<release>/boot/vmlinuz-<release> and profiles/<release>.json.
set -euo pipefail
rel=$1
kroot=${2:-/tmp/k/x}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
ram=/dev/shm/ornament-live-$$
trap 'kill "$qemu" 2>/dev/null || true; rm -rf "$work" "$ram"' EXIT

mkdir -p "$work/root/bin" "$work/root/etc"
cp /bin/busybox "$work/root/bin/busybox"
printf 'root:x:0:0::/:/bin/sh\nu:x:1000:1001::/:/bin/sh\n' > "$work/root/etc/passwd"
printf 'root:x:0:\ng:x:1001:\n' > "$work/root/etc/group"
cat > "$work/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /tmp /dev /usr/local/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
/bin/busybox cp /bin/busybox /usr/local/sbin/sh
/bin/busybox sleep 4242 &
/usr/local/sbin/sh -c 'while :; do /bin/busybox sleep 1; done' name0 "arg with spaces" "" &
/bin/busybox su u -c "/bin/busybox sleep 999" &
echo "ornament-live READY"
/bin/busybox sleep 1
/bin/busybox ps -o pid,ppid,user,group,comm,args | /bin/busybox grep -v ' \['
while true; do /bin/busybox sleep 5; done
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null > "$work/init.cpio")

qemu-system-x86_64 -accel tcg -M pc -m 512 -smp 2 \
  -object memory-backend-file,id=mem,size=512M,mem-path="$ram",share=on -machine memory-backend=mem \
  -kernel "$kroot/$rel/boot/vmlinuz-$rel" -initrd "$work/init.cpio" \
  -append "console=ttyS0 panic=-1 cryptomgr.notests" -display none -no-reboot \
  -serial file:"$work/serial.log" -monitor unix:"$work/mon.sock",server,nowait &
qemu=$!
for _ in $(seq 1 120); do grep -q "ornament-live READY" "$work/serial.log" 2>/dev/null && break; sleep 1; done
sleep 3
python3 - "$work" <<'PY'
import socket, sys, time
work = sys.argv[1]
s = socket.socket(socket.AF_UNIX); s.connect(work + '/mon.sock'); s.settimeout(0.5)
def cmd(c):
    s.sendall((c + '\n').encode()); time.sleep(1.0)
    out = b''
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
    except OSError:
        pass
    return out.decode(errors='replace')
cmd(''); cmd('stop')
open(work + '/regs.txt', 'w').write(cmd('info registers -a'))
PY
echo "--- ps inside the guest:"
sed -n '/ornament-live READY/,$p' "$work/serial.log" | tail -n +2
echo "--- from outside:"
cd "$repo"
cargo run -q --release -p ornament-introspect --example live_ps -- \
  "profiles/$rel.json" "$ram" "$work/regs.txt" | grep -v 'kernel thread'
