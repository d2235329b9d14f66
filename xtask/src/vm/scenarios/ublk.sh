# Guest scenario `ublk` (cargo xtask vm-test): the ublk frontend of tandem-frontend on a real
# kernel, through its `ublk_file` example (a file served as /dev/ublkbN). ext4 on the device,
# files written and checksummed; then the server is killed with SIGKILL while the filesystem
# stays mounted and a writer is running, a new server re-attaches with user recovery, and the
# writer finishes without an I/O error; every file checks, and e2fsck finds the fs clean.
# Run by `sh -eu` with UBLK_FILE set to the host-built example; no udev here.
: "${UBLK_FILE:?UBLK_FILE must name the ublk_file example binary}"
SCENARIO=ublk
FAILURE_LOGS='server*.log' FAILURE_SAID="the servers' logs"
# shellcheck source=xtask/src/vm/scenarios/lib.sh
. "$(dirname "$0")/lib.sh"
mkdir -p mnt

on_failure() {
    ls -l /dev/ublk* 2>/dev/null || true
}

step "load ublk_drv"
modprobe ublk_drv
test -c /dev/ublk-control

step "serve a 256 MiB file as a ublk device"
truncate -s 256M backing.img
# The server moves itself into a mount namespace of its own (a server whose namespace holds a
# filesystem on its own device can deadlock on exit); a recovering one detaches the copies of
# the mounts on its device there.
ublk_serve server1
server1=$served
device=$served_device
id=${device#/dev/ublkb}
test -b "$device"
echo "device $device (id $id), server pid $server1"
cat "/sys/block/ublkb$id/queue/logical_block_size" "/sys/block/ublkb$id/queue/write_cache" "/sys/block/ublkb$id/queue/fua"

step "ext4 on $device, files written and checked"
mkfs.ext4 -q "$device"
mount "$device" mnt
write_files 4
check_files

step "kill -9 of the server under a mounted filesystem, with a writer running"
dd if=/dev/urandom of=during bs=1M count=8 status=none
kill -9 "$server1"
wait "$server1" || true
# Written after the server died: queued by the kernel (user recovery), not failed.
writer_start
sleep 2
echo "writer still waiting for the device: $(kill -0 "$writer" 2>/dev/null && echo yes || echo no)"

step "a new server re-attaches to $device"
ublk_serve server2 --recover "$id"
server2=$served
test "$served_device" = "$device"
writer_done
check_files
sync
umount mnt
e2fsck -fn "$device"

step "orderly stop: SIGTERM ends the server and removes the device"
kill -TERM "$server2"
wait "$server2"
test ! -e "$device"
echo "== ublk: PASSED"
