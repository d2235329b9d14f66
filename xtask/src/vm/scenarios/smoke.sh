# Guest scenario `smoke` (cargo xtask vm-test): proves the harness on the real kernel path.
# Loads ublk_drv and dm_mod, puts a device-mapper linear table over a loop device and checks
# the bytes through it, then runs two tandem nodes over loopback with the file frontend (each
# daemon puts its dm linear table, `tandem-vol0` and `tandem-vol0-n1`, over its loop device),
# ext4 on the primary's, writes files and checks them after a remount and with `tandem verify`
# against the secondary; `tandem down` removes the tables.
# Run by `sh -eu` with TANDEM set to the host-built binary; no udev here (DM_DISABLE_UDEV=1).
. "$(dirname "$0")/lib.sh"
: "${TANDEM:?TANDEM must name the tandem binary}"
W=/tmp/tandem-smoke
mkdir -p "$W/mnt"
cd "$W"

step() {
    echo "== smoke: $*"
}

on_exit() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "== smoke: FAILED (exit status $status); the daemons' logs:"
        for log in "$W"/node*.log; do
            [ -f "$log" ] && { echo "--- $log"; tail -n 40 "$log"; }
        done
        dmsetup table 2>/dev/null || true
    fi
}
trap on_exit EXIT

tandem() {
    node=$1
    shift
    "$TANDEM" -c "$W/node$node.toml" "$@"
}

step "kernel $(uname -r): load ublk_drv, dm_mod, loop"
modprobe ublk_drv
modprobe dm_mod
modprobe loop
test -c /dev/ublk-control
test -c /dev/mapper/control
dmsetup version

step "dm linear over a loop device"
truncate -s 64M plain.img
loop=$(losetup --show -f plain.img)
sectors=$(blockdev --getsz "$loop")
dmsetup create smoke-linear --table "0 $sectors linear $loop 0"
dd if=/dev/urandom of=pattern bs=1M count=8 status=none
dd if=pattern of=/dev/mapper/smoke-linear bs=1M oflag=direct status=none
dd if="$loop" bs=1M count=8 iflag=direct status=none | cmp - pattern
echo "8 MiB written through /dev/mapper/smoke-linear read back identical from $loop"
dmsetup remove smoke-linear
losetup -d "$loop"

step "two tandem nodes over loopback (file frontend)"
for id in 0 1; do
    peer=$((1 - id))
    cat > "node$id.toml" <<TOML
[volume]
name = "vol0"
id = 7
size = "256MiB"
mode = "memory"
secret = "vm-test smoke secret, 16+ bytes"

[node]
id = $id
data = "$W/node$id.img"
meta = "$W/node$id.meta"
listen = "127.0.0.1:779$id"
control = "$W/node$id.sock"
mountpoint = "$W/fuse$id"
frontend = "file"
dm_name = "$(if [ "$id" = 0 ]; then echo tandem-vol0; else echo tandem-vol0-n1; fi)"
# Both nodes run in this one guest: each needs its own pinned eBPF record.
record_pin = "vol0-node$id"

[[peer]]
id = $peer
address = "127.0.0.1:779$peer"
TOML
    tandem "$id" create-md
done
tandem 0 up --log "$W/node0.log"
tandem 1 up --log "$W/node1.log"
retry_handshake tandem 0 primary
timeout 120 "$TANDEM" -c "$W/node0.toml" status --watch
# The user-facing device comes first; the frontend's own follows under "frontend".
device=$(tandem 0 status --json | sed -n 's/^ *"device": *"\([^"]*\)".*/\1/p' | head -n 1)
test -b "$device"
echo "primary's device: $device"
tandem 0 status

step "the daemon's dm linear table tandem-vol0 over its loop device"
test "$device" = /dev/mapper/tandem-vol0
dmsetup table tandem-vol0
mkfs.ext4 -q /dev/mapper/tandem-vol0
mount /dev/mapper/tandem-vol0 mnt
for i in 1 2 3 4; do
    dd if=/dev/urandom of="mnt/file$i" bs=1M count=4 status=none
done
(cd mnt && sha256sum file* > ../sums)
sync
umount mnt
mount /dev/mapper/tandem-vol0 mnt
(cd mnt && sha256sum -c ../sums)
umount mnt

step "verify: the secondary's replica is identical"
timeout 300 "$TANDEM" -c "$W/node0.toml" verify
tandem 0 status

step "down is refused while the table is open, and changes nothing"
tandem 0 secondary
exec 3< /dev/mapper/tandem-vol0
if refusal=$(tandem 0 down 2>&1); then
    echo "tandem down went ahead with /dev/mapper/tandem-vol0 open"
    exit 1
fi
echo "$refusal"
echo "$refusal" | grep -q "still open"
exec 3<&-
tandem 0 status | grep -q "role:Secondary"

step "down"
tandem 0 down
tandem 1 down
if dmsetup info tandem-vol0 > /dev/null 2>&1 || dmsetup info tandem-vol0-n1 > /dev/null 2>&1; then
    echo "tandem down left a device-mapper table behind"
    dmsetup ls
    exit 1
fi
echo "== smoke: PASSED"
