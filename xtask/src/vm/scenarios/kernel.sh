# Guest scenario `kernel` (cargo xtask vm-test): issue 5's end-to-end path on the real kernel.
# Two tandem nodes over loopback, each with the ublk frontend and its device-mapper table
# (`tandem-vol0` on node 0, `tandem-vol0-n1` on node 1); LVM on node 0's `/dev/mapper/tandem-vol0`,
# ext4 on the LV, files written and checksummed; the pinned eBPF maps dumped with bpftool; `kill -9`
# of the primary's daemon under the mounted filesystem with writers running across the kill,
# restart, user recovery once it is primary again: no I/O error, no lost write; then failover to
# node 1 and the VG activated there, files intact.
#
# Both "hosts" share this guest's kernel, so LVM commands name the devices of one side with
# `--devices`: each node's table carries the same PV label once replicated.
# Run by `sh -eu` with TANDEM and DM_SETUP set; no udev in the guest (DM_DISABLE_UDEV=1).
: "${TANDEM:?TANDEM must name the tandem binary}"
: "${DM_SETUP:?DM_SETUP must name the dm-setup directory of the repository}"
SCENARIO=kernel STEP_ELAPSED=1
FAILURE_LOGS='node*.log' FAILURE_SAID="the daemons' logs" FAILURE_TAIL=60
# shellcheck source=xtask/src/vm/scenarios/lib.sh
. "$(dirname "$0")/lib.sh"
mkdir -p mnt lvm

on_failure() {
    dmsetup table 2>/dev/null || true
    for n in 0 1; do tandem "$n" status 2>&1 || true; done
}

# `tandem N up` prints "... (daemon pid P, log ...)".
daemon_pid() {
    sed -n 's/.*daemon pid \([0-9]*\).*/\1/p' "$1"
}

# Set bits in the pinned bitmap map, as bpftool dumps it.
bitmap_bits() {
    bpftool -j map dump pinned "/sys/fs/bpf/tandem/$1/bitmap" |
        python3 -c 'import json,sys; print(sum(bin(int(v) if not isinstance(v, list) else int.from_bytes(bytes(int(b, 16) for b in v), "little")).count("1") for v in (e.get("value", e.get("formatted", {}).get("value")) for e in json.load(sys.stdin))))'
}

# No udev here: LVM must neither wait for it nor ask it for the device list.
{ cat "$DM_SETUP/lvm/tandem.conf"; lvm_without_udev; } > lvm/lvm.conf
export LVM_SYSTEM_DIR="$W/lvm"
side0="--devices /dev/mapper/tandem-vol0"
side1="--devices /dev/mapper/tandem-vol0-n1"

step "kernel $(uname -r): ublk_drv, dm_mod; two nodes with frontend = \"ublk\""
modprobe ublk_drv
modprobe dm_mod
for id in 0 1; do
    node_config "$id" 9 7780 ublk
    tandem "$id" create-md > /dev/null
done
tandem 0 up --log "$W/node0.log" | tee up0.out
tandem 1 up --log "$W/node1.log" | tee up1.out
pid0=$(daemon_pid up0.out)
retry_handshake tandem 0 primary
tandem_within 120 0 status --watch
tandem 0 status --json > status0.json
grep -q '"device": "/dev/mapper/tandem-vol0"' status0.json
grep -q '"kind": "ublk"' status0.json
ublk0=$(sed -n 's/^ *"device": *"\(\/dev\/ublkb[0-9]*\)".*/\1/p' status0.json)
test -b "$ublk0"
dmsetup table tandem-vol0
dmsetup table tandem-vol0-n1

step "LVM on /dev/mapper/tandem-vol0: pvcreate, vgcreate tvg, lvcreate data; ext4; files"
# shellcheck disable=SC2086
pvcreate -q $side0 /dev/mapper/tandem-vol0
# shellcheck disable=SC2086
vgcreate -q $side0 tvg /dev/mapper/tandem-vol0
# shellcheck disable=SC2086
lvcreate -q -y $side0 -n data -l 100%FREE tvg
# shellcheck disable=SC2086
pvs $side0
mkfs.ext4 -q /dev/tvg/data
mount /dev/tvg/data mnt
write_files 4
step "the pinned eBPF maps (bpftool): $(bitmap_bits vol0-node0) tracks marked right after the writes"
bpftool map show pinned /sys/fs/bpf/tandem/vol0-node0/bitmap

step "kill -9 of the primary's daemon (pid $pid0) under the mounted LV, writers running across it"
for i in $(seq 1 24); do
    dd if=/dev/urandom of="w$i" bs=64k count=4 status=none
done
(
    for i in $(seq 1 24); do
        dd if="w$i" of="mnt/w$i" bs=64k conv=fsync status=none || { echo "writer: w$i FAILED"; exit 1; }
    done
    echo "writer: done"
) > writer.out 2>&1 &
writer=$!
sleep 1
# Kernel messages from here on: a secondary's device fails reads (the partition scan when
# node 1's device is added logs I/O errors), the primary's must not fail any.
dmesg_before=$(dmesg | wc -l)
kill -9 "$pid0"
dd if=/dev/urandom of=during bs=1M count=4 status=none
(dd if=during of=mnt/during bs=1M conv=fsync status=none && echo "late writer: done") > late.out 2>&1 &
late=$!
sleep 2
if ! kill -0 "$writer" 2> /dev/null && ! kill -0 "$late" 2>/dev/null; then
    echo "both writers ended while no daemon served the device:"
    cat writer.out late.out
    exit 1
fi
marked=$(bitmap_bits vol0-node0)
step "with the daemon dead, bpftool shows $marked tracks marked in vol0-node0/bitmap; tandem dirty:"
tandem 0 dirty || true
test "$marked" -gt 0

step "restart node 0: it re-attaches to $ublk0 once primary again"
restart_started=$(date +%s)
tandem 0 up --log "$W/node0.log" | tee up0b.out
pid0=$(daemon_pid up0b.out)
# The ublk device (and its diskseq) survived the kill: the restarted daemon keeps the pinned
# programs recording it instead of unpinning and loading again (a window without marks).
if ! grep -q "the device survived the previous daemon" "$W/node0.log"; then
    echo "the restarted daemon did not keep the pinned kernel record of its surviving device"
    exit 1
fi
tandem 0 status
tandem_within 120 0 status --watch
retry_handshake tandem 0 primary
wait "$writer"
wait "$late"
cat writer.out late.out
grep -q "writer: done" writer.out
grep -q "late writer: done" late.out
step "writers finished $(($(date +%s) - restart_started)) s after the restart; checking every file"
tandem 0 status
tandem 0 status --json > status0b.json
grep -q "took over $ublk0" status0b.json
if grep -q "re-attach pending" status0b.json; then
    echo "still pending after the promotion"
    exit 1
fi
for i in $(seq 1 24); do
    cmp "w$i" "mnt/w$i"
done
cmp during mnt/during
check_files
(cd mnt && sha256sum w* during >> ../sums)
if dmesg | tail -n +"$((dmesg_before + 1))" | grep -i "I/O error\|EXT4-fs error\|Buffer I/O"; then
    echo "the kernel logged I/O errors above the primary's device"
    exit 1
fi

step "failover: node 0 stops its stack and its daemon is killed; node 1 becomes primary"
umount mnt
# shellcheck disable=SC2086
vgchange -q -an $side0 tvg
tandem_within 120 0 status --watch
kill -9 "$pid0"
wait_for 60 "node 1 to lose node 0" sh -c "! '$TANDEM' -c '$W/node1.toml' status | grep -q 'connection:Connected'"
retry_handshake tandem 1 primary
tandem 1 status
# shellcheck disable=SC2086
pvs $side1
# shellcheck disable=SC2086
vgchange -q -ay $side1 tvg
mount /dev/tvg/data mnt
check_files
umount mnt
e2fsck -fn /dev/tvg/data
# shellcheck disable=SC2086
vgchange -q -an $side1 tvg
step "node 0 back as secondary of node 1; its pending re-attach ends with \`down\`"
tandem 0 up --log "$W/node0.log" > /dev/null
tandem_within 120 0 status --watch
tandem 0 status | grep -q "re-attach pending"
tandem 0 down
# The table (nothing held it) is gone; the device stays quiesced for a later start.
if dmsetup info tandem-vol0 > /dev/null 2>&1; then
    echo "down left tandem-vol0 behind"
    exit 1
fi
test -b "$ublk0"
grep "left the device quiesced" node0.log | sed 's/^[^ ]* *//'

step "the role changes ran with the user-facing table suspended:"
grep -h "role change done" node0.log node1.log | sed 's/^[^ ]* *//'
step "the files are intact on node 1; PASSED"
echo "== kernel: PASSED"
