# Guest scenario `ublk` (cargo xtask vm-test): the ublk frontend of tandem-frontend on a real
# kernel, through its `ublk_file` example (a file served as /dev/ublkbN). ext4 on the device,
# files written and checksummed; then the server is killed with SIGKILL while the filesystem
# stays mounted and a writer is running, a new server re-attaches with user recovery, and the
# writer finishes without an I/O error; every file checks, and e2fsck finds the fs clean.
# Run by `sh -eu` with UBLK_FILE set to the host-built example; no udev here.
: "${UBLK_FILE:?UBLK_FILE must name the ublk_file example binary}"
W=/tmp/tandem-ublk
mkdir -p "$W/mnt"
cd "$W"

step() {
    echo "== ublk: $*"
}

on_exit() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "== ublk: FAILED (exit status $status); the servers' logs:"
        for log in "$W"/server*.log; do
            [ -f "$log" ] && { echo "--- $log"; tail -n 40 "$log"; }
        done
        ls -l /dev/ublk* 2>/dev/null || true
    fi
}
trap on_exit EXIT

# Waits until FILE has a line; prints it.
first_line() {
    for _ in $(seq 1 600); do
        if [ -s "$1" ]; then
            head -n 1 "$1"
            return 0
        fi
        sleep 0.1
    done
    echo "no line in $1 after 60 s" >&2
    return 1
}

step "load ublk_drv"
modprobe ublk_drv
test -c /dev/ublk-control

step "serve a 256 MiB file as a ublk device"
truncate -s 256M backing.img
# The server moves itself into a mount namespace of its own (a server whose namespace holds a
# filesystem on its own device can deadlock on exit); a recovering one detaches the copies of
# the mounts on its device there.
"$UBLK_FILE" "$W/backing.img" > server1.out 2> server1.log &
server1=$!
device=$(first_line server1.out)
id=${device#/dev/ublkb}
test -b "$device"
echo "device $device (id $id), server pid $server1"
cat "/sys/block/ublkb$id/queue/logical_block_size" "/sys/block/ublkb$id/queue/write_cache" "/sys/block/ublkb$id/queue/fua"

step "ext4 on $device, files written and checked"
mkfs.ext4 -q "$device"
mount "$device" mnt
for i in 1 2 3 4; do
    dd if=/dev/urandom of="mnt/file$i" bs=1M count=4 status=none
done
sync
(cd mnt && sha256sum file* > ../sums)
(cd mnt && sha256sum -c ../sums)

step "kill -9 of the server under a mounted filesystem, with a writer running"
dd if=/dev/urandom of=during bs=1M count=8 status=none
kill -9 "$server1"
wait "$server1" || true
# Written after the server died: queued by the kernel (user recovery), not failed.
(dd if=during of=mnt/during bs=1M conv=fsync status=none && echo "writer: done") > writer.out 2>&1 &
writer=$!
sleep 2
echo "writer still waiting for the device: $(kill -0 "$writer" 2>/dev/null && echo yes || echo no)"

step "a new server re-attaches to $device"
"$UBLK_FILE" "$W/backing.img" --recover "$id" > server2.out 2> server2.log &
server2=$!
recovered=$(first_line server2.out)
test "$recovered" = "$device"
wait "$writer"
cat writer.out
grep -q "writer: done" writer.out
cmp during mnt/during
(cd mnt && sha256sum -c ../sums)
sync
umount mnt
e2fsck -fn "$device"

step "orderly stop: SIGTERM ends the server and removes the device"
kill -TERM "$server2"
wait "$server2"
test ! -e "$device"
echo "== ublk: PASSED"
