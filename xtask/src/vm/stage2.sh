# Stage 2 of the guest (`cargo xtask vm-test`), PID 1 in the host's root (read-only over 9p,
# under a tmpfs overlay). Mounts the API filesystems, makes modprobe work with the guest
# kernel's modules, runs the one command the host put in the output share with stdin from
# /dev/null, writes its exit status there and powers off. Every tool here is the copied
# busybox: the host's userland is only for the command.
BB=/tandem-vm/busybox
. /tandem-vm/tandem-vm.env

fail() {
    echo "tandem-vm: stage 2 failed: $*"
    $BB sync
    $BB poweroff -f
}

$BB mount -t proc proc /proc || fail "mount proc"
$BB mount -t sysfs sysfs /sys || fail "mount sysfs"
$BB mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
$BB mkdir -p /dev/pts /dev/shm
$BB mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts || fail "mount devpts"
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
$BB mount -t tmpfs -o mode=0755 tmpfs /run || fail "mount /run"
# No tmpfs over /tmp: the overlay's upper layer is a tmpfs already, and a checkout (or a
# cargo target dir) under the host's /tmp must stay visible at the same path.
$BB mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
$BB mount -t tracefs tracefs /sys/kernel/tracing || fail "mount tracefs"
$BB mount -t debugfs debugfs /sys/kernel/debug || echo "tandem-vm: no debugfs (continuing)"
$BB mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "tandem-vm: no cgroup2 (continuing)"
$BB mkdir -p /tandem-vm/out
$BB mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /tandem-vm/out \
    || fail "mount the output share (9p tag out)"

# The guest kernel's modules at the path modprobe expects (the overlay makes the mount point).
$BB mkdir -p "/lib/modules/$RELEASE" || fail "mkdir /lib/modules/$RELEASE"
$BB mount --bind "$MODULES" "/lib/modules/$RELEASE" || fail "bind $MODULES"
echo "$MODPROBE" > /proc/sys/kernel/modprobe || fail "set /proc/sys/kernel/modprobe"
$BB ip link set lo up || fail "ip link set lo up"
$BB hostname tandem-vm

echo "tandem-vm: command starts (guest uptime $($BB cut -d' ' -f1 /proc/uptime) s)"
$BB env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb \
    /bin/sh /tandem-vm/out/command </dev/null
status=$?
echo "tandem-vm: command exit status $status (guest uptime $($BB cut -d' ' -f1 /proc/uptime) s)"
echo "$status" > /tandem-vm/out/status.partial && $BB mv /tandem-vm/out/status.partial /tandem-vm/out/status
$BB sync
$BB umount /tandem-vm/out
$BB poweroff -f
