#!/bin/sh
# /init of the nested guest (L2), booted by the lab VM with a vhost-vsock device: load the
# virtio vsock transport, then become the small static C program that serves vsock to the
# lab VM (CID 2). Its base port comes from the kernel command line (vsockmon_lab.port).
# vsockmon_lab.transport=off leaves the transport driver out (Lab.run(guest_transport=False)):
# the vhost-vsock device then has no driver, as in a guest that has not loaded it yet.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
transport=$(sed -n 's/.*vsockmon_lab\.transport=\([a-z]*\).*/\1/p' /proc/cmdline)
while read -r module; do
  if [ "$transport" = off ] && [ "$module" = vmw_vsock_virtio_transport.ko ]; then
    echo "vsockmon-lab-guest: not loading $module (vsockmon_lab.transport=off)"
    continue
  fi
  insmod "/lib/modules/$module" || echo "vsockmon-lab-guest: insmod $module failed"
done < /lib/modules/order
port=$(sed -n 's/.*vsockmon_lab\.port=\([0-9]*\).*/\1/p' /proc/cmdline)
exec /bin/lab-guest "${port:-9000}"
