#!/bin/sh
# /init of the nested guest (L2), booted by the lab VM with a vhost-vsock device: load the
# virtio vsock transport, then become the small static C program that serves vsock to the
# lab VM (CID 2). Its base port comes from the kernel command line (vsockmon_lab.port).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
  insmod "/lib/modules/$module" || echo "vsockmon-lab-guest: insmod $module failed"
done < /lib/modules/order
port=$(sed -n 's/.*vsockmon_lab\.port=\([0-9]*\).*/\1/p' /proc/cmdline)
exec /bin/lab-guest "${port:-9000}"
