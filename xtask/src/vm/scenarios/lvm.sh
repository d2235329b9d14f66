# Guest scenario `lvm` (cargo xtask vm-test): LVM stacked on a device-mapper linear table
# (`tandem-vol0`) over a ublk device served by tandem-frontend's `ublk_file` example. Shows the
# duplicate-PV pitfall without dm-setup/lvm/tandem.conf's filter and its absence with it, then
# ext4 on an LV, files checked, and a kill -9 + re-attach of the ublk server under the mounted LV
# (ext4 -> LV -> tandem-vol0 -> ublkb): no I/O error, files intact, fsck clean.
# Run by `sh -eu` with UBLK_FILE and DM_SETUP (the repository's dm-setup/) set; no udev in the
# guest (DM_DISABLE_UDEV=1).
: "${UBLK_FILE:?UBLK_FILE must name the ublk_file example binary}"
: "${DM_SETUP:?DM_SETUP must name the repository's dm-setup directory}"
W=/tmp/tandem-lvm
mkdir -p "$W/mnt" "$W/lvm-plain" "$W/lvm-filtered"
cd "$W"

step() {
    echo "== lvm: $*"
}

on_exit() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "== lvm: FAILED (exit status $status); the servers' logs:"
        for log in "$W"/server*.log; do
            [ -f "$log" ] && { echo "--- $log"; tail -n 40 "$log"; }
        done
        dmsetup table 2>/dev/null || true
    fi
}
trap on_exit EXIT

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

# No udev here: LVM must neither wait for it nor ask it for the device list.
guest_settings='
activation {
    udev_sync = 0
    udev_rules = 0
}
devices {
    obtain_device_list_from_udev = 0
}'
printf '%s\n' "$guest_settings" > lvm-plain/lvm.conf
{ cat "$DM_SETUP/lvm/tandem.conf"; printf '%s\n' "$guest_settings"; } > lvm-filtered/lvm.conf

step "ublk device + dm linear tandem-vol0 on it"
modprobe ublk_drv
modprobe dm_mod
truncate -s 256M backing.img
"$UBLK_FILE" "$W/backing.img" > server1.out 2> server1.log &
server1=$!
device=$(first_line server1.out)
id=${device#/dev/ublkb}
dmsetup create tandem-vol0 --table "0 $(blockdev --getsz "$device") linear $device 0"

step "a PV on /dev/mapper/tandem-vol0 (filtered config)"
export LVM_SYSTEM_DIR="$W/lvm-filtered"
pvcreate -q /dev/mapper/tandem-vol0
vgcreate -q vmvg /dev/mapper/tandem-vol0
lvcreate -q -y -n data -l 100%FREE vmvg

step "the pitfall: without the filter LVM sees the PV twice ($device and tandem-vol0)"
LVM_SYSTEM_DIR="$W/lvm-plain" pvs 2> pvs-plain.err || true
cat pvs-plain.err
grep -qi "duplicate\|not using device" pvs-plain.err
step "with dm-setup/lvm/tandem.conf: only tandem-vol0, no warning"
pvs 2> pvs-filtered.err
cat pvs-filtered.err
if grep -qi "duplicate\|not using device" pvs-filtered.err; then
    echo "the filter left a duplicate PV visible"
    exit 1
fi
pvs --noheadings -o pv_name | grep -q "/dev/mapper/tandem-vol0"

step "ext4 on the LV, files written and checked"
vgchange -q -ay vmvg
mkfs.ext4 -q /dev/vmvg/data
mount /dev/vmvg/data mnt
for i in 1 2 3; do
    dd if=/dev/urandom of="mnt/file$i" bs=1M count=4 status=none
done
sync
(cd mnt && sha256sum file* > ../sums)

step "kill -9 of the ublk server under the mounted LV, a writer running, re-attach"
dd if=/dev/urandom of=during bs=1M count=4 status=none
kill -9 "$server1"
wait "$server1" || true
(dd if=during of=mnt/during bs=1M conv=fsync status=none && echo "writer: done") > writer.out 2>&1 &
writer=$!
"$UBLK_FILE" "$W/backing.img" --recover "$id" > server2.out 2> server2.log &
server2=$!
test "$(first_line server2.out)" = "$device"
wait "$writer"
cat writer.out
grep -q "writer: done" writer.out
cmp during mnt/during
(cd mnt && sha256sum -c ../sums)
umount mnt
e2fsck -fn /dev/vmvg/data

step "teardown: VG off, tandem-vol0 removed, server stopped"
vgchange -q -an vmvg
dmsetup remove tandem-vol0
kill -TERM "$server2"
wait "$server2"
echo "== lvm: PASSED"
