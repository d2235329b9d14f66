# Guest scenario `lvm` (cargo xtask vm-test): LVM stacked on a device-mapper linear table
# (`tandem-vol0`) over a ublk device served by tandem-frontend's `ublk_file` example. Shows the
# duplicate-PV pitfall without dm-setup/lvm/tandem.conf's filter and its absence with it, then
# ext4 on an LV, files checked, and a kill -9 + re-attach of the ublk server under the mounted LV
# (ext4 -> LV -> tandem-vol0 -> ublkb): no I/O error, files intact, fsck clean.
# Run by `sh -eu` with UBLK_FILE and DM_SETUP (the repository's dm-setup/) set; no udev in the
# guest (DM_DISABLE_UDEV=1).
: "${UBLK_FILE:?UBLK_FILE must name the ublk_file example binary}"
: "${DM_SETUP:?DM_SETUP must name the dm-setup directory of the repository}"
SCENARIO=lvm
FAILURE_LOGS='server*.log' FAILURE_SAID="the servers' logs"
# shellcheck source=xtask/src/vm/scenarios/lib.sh
. "$(dirname "$0")/lib.sh"
mkdir -p mnt lvm-plain lvm-filtered

on_failure() {
    dmsetup table 2>/dev/null || true
}

# No udev here: LVM's configs (LVM_SYSTEM_DIR) without it, without and with the filter.
lvm_without_udev > lvm-plain/lvm.conf
{ cat "$DM_SETUP/lvm/tandem.conf"; lvm_without_udev; } > lvm-filtered/lvm.conf

step "ublk device + dm linear tandem-vol0 on it"
modprobe ublk_drv
modprobe dm_mod
truncate -s 256M backing.img
ublk_serve server1
server1=$served
device=$served_device
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
write_files 3

step "kill -9 of the ublk server under the mounted LV, a writer running, re-attach"
dd if=/dev/urandom of=during bs=1M count=4 status=none
kill -9 "$server1"
wait "$server1" || true
writer_start
ublk_serve server2 --recover "$id"
server2=$served
test "$served_device" = "$device"
writer_done
check_files
umount mnt
e2fsck -fn /dev/vmvg/data

step "teardown: VG off, tandem-vol0 removed, server stopped"
vgchange -q -an vmvg
dmsetup remove tandem-vol0
kill -TERM "$server2"
wait "$server2"
echo "== lvm: PASSED"
