#!/lab/bin/sh
# /init of the lab VM (L1): a real Debian kernel with vsockmon, running the host's own
# userland read-only so the host's venv, tcpdump and tshark work unchanged.
#
# The host passes the nonce of its console markers and the path of a job file (under the
# host's /, shared read-only over 9p as "host") on the kernel command line. The job file,
# written by vsockmon.lab.vm.job_script, sets LAB_* variables and defines lab_command.
# Markers (the host strips them): BOOT when init starts, START just before the command,
# EXIT:<code> when it is done, ERROR:<text> when the lab itself failed. Without a nonce
# (lab shell) none is printed.
PATH=/lab/bin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

cmdline_arg() { sed -n "s/.*vsockmon_lab\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
nonce=$(cmdline_arg nonce)
job=$(cmdline_arg job)

marker() { [ -n "$nonce" ] && printf '@@VSOCKMON-LAB-%s:%s:%s@@' "$1" "$nonce" "$2" > /dev/ttyS0; }
# stty applies its settings with TCSADRAIN: it returns once the UART has sent everything,
# so the last output and the EXIT marker are not lost in the power-off.
drain() { stty -F /dev/ttyS0 raw -echo; stty -F /dev/ttyS1 raw -echo; }
fail() { marker ERROR "$(echo "$*" | tr -d @)"; drain; poweroff -f; }

marker BOOT ""

while read -r module; do
  insmod "/lab/modules/$module" || fail "insmod $module failed"
done < /lab/modules/order

p9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$p9,ro,cache=loose" host /host || fail "cannot mount the host's / over 9p"
. "/host$job" || fail "cannot read the job file $job"

# A root of our own: the host's directories bound read-only, the merged-/usr links,
# fresh kernel file systems, then the working directory read-write on top.
for dir in $LAB_BINDS; do
  mkdir -p "/$dir" && mount --bind "/host/$dir" "/$dir" || fail "cannot bind /$dir"
done
for link in $LAB_LINKS; do
  ln -s "${link#*:}" "/${link%%:*}"
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm /lab/kernel /run/vsockmon-lab
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount --bind "/host$LAB_KERNEL_ROOT" /lab/kernel || fail "cannot bind the kernel tree"
for path in $LAB_EXTRA_BINDS; do
  mkdir -p "$path" && mount --bind "/host$path" "$path" || fail "cannot bind $path"
done
mkdir -p "$LAB_CWD"
mount -t 9p -o "$p9,cache=none" cwd "$LAB_CWD" || fail "cannot mount $LAB_CWD over 9p"
# Nothing in the guest may reach the host's /dev, /proc or /sys through the share.
umount -l /host
hostname vsockmon-lab
ip link set lo up

# The nested guest (L2) boots under TCG inside TCG: minutes on a loaded machine. A boot
# that shows no sign of life within LAB_GUEST_BOOT_S is killed and tried once more, and the
# retry is said on the command's stderr, so a slow machine is told from a broken guest.
# Its qemu's monitor (HMP) listens on a Unix socket, so a scenario can snapshot and restore
# the guest (savevm/loadvm): the restore makes qemu send the guest a TRANSPORT_RESET.
boot_guest() {
  : > "$log"
  "$LAB_QEMU" -M pc -accel tcg -cpu qemu64 -m 256M -smp 1 -nodefaults -no-reboot \
    -display none -serial "file:$log" -monitor "unix:$LAB_GUEST_MONITOR,server=on,wait=off" \
    -device "vhost-vsock-pci,guest-cid=$LAB_GUEST_CID" \
    -kernel /lab/l2/vmlinux -initrd /lab/l2/initrd.img \
    -append "console=ttyS0 quiet loglevel=0 panic=-1 no_timer_check mitigations=off nokaslr vsockmon_lab.port=$LAB_GUEST_PORT vsockmon_lab.transport=$LAB_GUEST_TRANSPORT" \
    < /dev/null > /run/vsockmon-lab/guest-qemu.log 2>&1 &
  guest_qemu=$!
  waited=0
  until grep -q 'vsockmon-lab-guest: ready' "$log"; do
    kill -0 "$guest_qemu" 2> /dev/null \
      || fail "nested guest died: $(tail -c 300 /run/vsockmon-lab/guest-qemu.log "$log" | tr '\n' ' ')"
    [ "$waited" -ge "$((LAB_GUEST_BOOT_S * 2))" ] && return 1
    sleep 0.5
    waited=$((waited + 1))
  done
}
if [ -n "$LAB_GUEST_CID" ]; then
  log=/run/vsockmon-lab/guest.log
  LAB_GUEST_MONITOR=/run/vsockmon-lab/guest-monitor.sock
  if ! boot_guest; then
    kill -9 "$guest_qemu" 2> /dev/null
    echo "vsockmon-lab: the nested guest was not ready after $LAB_GUEST_BOOT_S s" \
      "(console: $(tail -c 200 "$log" | tr '\n' ' ')); booting it once more" > /dev/ttyS1
    boot_guest || fail "the nested guest was not ready after $LAB_GUEST_BOOT_S s, twice"
  fi
fi

cd "$LAB_CWD" || fail "cannot enter $LAB_CWD"
# lab_command execs the command: the subshell keeps init alive.
if [ "$LAB_MODE" = shell ]; then
  (lab_command) < /dev/ttyS0 > /dev/ttyS0 2>&1
  rc=$?
else
  drain
  marker START ""
  (lab_command) < /dev/null > /dev/ttyS0 2> /dev/ttyS1
  rc=$?
fi
cd /
[ -n "$LAB_GUEST_CID" ] && kill "$guest_qemu" 2> /dev/null
sync
umount "$LAB_CWD" 2> /dev/null
marker EXIT "$rc"
drain
poweroff -f
