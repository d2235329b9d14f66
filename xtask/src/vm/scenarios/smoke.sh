# Guest scenario `smoke` (cargo xtask vm-test): proves the harness on the real kernel path.
# Loads ublk_drv and dm_mod, puts a device-mapper linear table over a loop device and checks
# the bytes through it, then runs two tandem nodes over loopback with the file frontend (each
# daemon puts its dm linear table, `tandem-vol0` and `tandem-vol0-n1`, over its loop device),
# ext4 on the primary's, writes files and checks them after a remount and with `tandem verify`
# against the secondary; `tandem down` removes the tables.
# Run by `sh -eu` with TANDEM set to the host-built binary; no udev here (DM_DISABLE_UDEV=1).
: "${TANDEM:?TANDEM must name the tandem binary}"
SCENARIO=smoke
FAILURE_LOGS='node*.log' FAILURE_SAID="the daemons' logs"
# shellcheck source=xtask/src/vm/scenarios/lib.sh
. "$(dirname "$0")/lib.sh"
mkdir -p mnt

on_failure() {
    dmsetup table 2>/dev/null || true
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
    node_config "$id" 7 7790 file "mountpoint = \"$W/fuse$id\""
    tandem "$id" create-md
done
tandem 0 up --log "$W/node0.log"
tandem 1 up --log "$W/node1.log"
retry_handshake tandem 0 primary
tandem_within 120 0 status --watch
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
write_files 4
umount mnt
mount /dev/mapper/tandem-vol0 mnt
check_files
umount mnt

step "verify: the secondary's replica is identical"
tandem_within 300 0 verify
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
