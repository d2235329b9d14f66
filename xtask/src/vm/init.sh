#!/bin/busybox sh
# Stage 1 of the guest (`cargo xtask vm-test`): the initramfs's /init. Loads the modules that
# mount the host's root (9p over virtio, overlayfs), mounts it read-only under a tmpfs overlay,
# and hands over to stage 2 as PID 1 in that root. A failure here ends in "tandem-vm: stage 1
# failed", then init exits (a kernel panic, "Attempted to kill init"), which the host reads as
# a harness failure, not a test result.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "tandem-vm: stage 1 failed: $*"
    exit 1
}

mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
for module in $(cat /modules/order); do
    insmod "/modules/$module" || fail "insmod $module"
done
# cache=loose: the lower layer is read-only, so the guest may cache it (binaries run from it).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower \
    || fail "mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mount the overlay"
mkdir -p /newroot/tandem-vm || fail "mkdir /tandem-vm in the new root"
cp /bin/busybox /stage2 /tandem-vm.env /newroot/tandem-vm/ || fail "copy stage 2"
umount /proc /sys
umount /dev
exec switch_root /newroot /tandem-vm/busybox sh /tandem-vm/stage2
