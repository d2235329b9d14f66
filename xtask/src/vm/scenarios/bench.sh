# Guest script of `cargo xtask vm-bench`: the bench table on the real kernel path.
# Every row runs the same three fio jobs (those of `cargo xtask bench`) on a device whose
# backing is a brd RAM disk of the same size (one /dev/ramN per device: rows never share a
# disk; a later round reuses its row's disks):
#   raw          fio straight on /dev/ram0
#   tandem-alone one tandem daemon without a peer (memory mode): the frontend's own cost
#   tandem-memory, tandem-disk
#                two tandem daemons over 127.0.0.1 with frontend = "ublk", fio on the
#                primary's /dev/mapper/tandem-vol0 (dm linear over /dev/ublkbN)
#   drbd-C, drbd-B
#                two in-kernel DRBD 8.4 resources over 127.0.0.1, fio on the primary's
#                /dev/drbdN; both sides start from zeroed RAM disks, so the initial sync is
#                skipped with `new-current-uuid --clear-bitmap` (DRBD's documented way)
# The rows run ROUNDS times, every other round in reverse order. fio's JSON goes to
# $OUT/<row>-<job>-r<round>.json; the host reads it and prints the ratios.
# Run by `sh -eu` with TANDEM, DRBD_UTILS (drbd-utils unpacked with dpkg -x), OUT, RUNTIME
# (seconds per job), SIZE_MIB (the device size), REGION_MIB (fio's --size) and ROUNDS set.
: "${TANDEM:?TANDEM must name the tandem binary}"
: "${DRBD_UTILS:?DRBD_UTILS must name the unpacked drbd-utils}"
: "${OUT:?OUT must name the results directory}"
: "${RUNTIME:?RUNTIME must give the seconds of each fio job}"
: "${SIZE_MIB:?SIZE_MIB must give the size of the devices}"
: "${REGION_MIB:?REGION_MIB must give the region fio writes}"
: "${ROUNDS:?ROUNDS must give how many times each row runs}"
SCENARIO=bench STEP_ELAPSED=1 FAILURE_LOGS='*.log'
# shellcheck source=xtask/src/vm/scenarios/lib.sh
. "$(dirname "$0")/lib.sh"
mkdir -p "$OUT"

on_failure() {
    cat /proc/drbd 2>/dev/null || true
    dmsetup table 2>/dev/null || true
}

# The jobs of xtask/src/bench.rs (JOBS), on one device: <row>-<qd1|qd32|seq>-r<round>.json. With
# --lat_percentiles, because the latency that compares is submission + completion: brd
# completes a bio inside io_submit, so its completion latency alone would be ~0.
run_jobs() {
    device=$1
    row=$2
    for job in qd1 qd32 seq; do
        case $job in
            qd1) args="--rw=randwrite --bs=4k --iodepth=1" ;;
            qd32) args="--rw=randwrite --bs=4k --iodepth=32" ;;
            seq) args="--rw=write --bs=1M --iodepth=4" ;;
        esac
        # shellcheck disable=SC2086
        fio --name=bench --ioengine=libaio --direct=1 --time_based --output-format=json --lat_percentiles=1 \
            --filename="$device" --runtime="$RUNTIME" --size="${REGION_MIB}M" $args \
            > "$OUT/$row-$job-r$round.json.partial"
        mv "$OUT/$row-$job-r$round.json.partial" "$OUT/$row-$job-r$round.json"
        # A progress line only (the host parses the JSON): python3 is the host's, if it has one.
        command -v python3 > /dev/null || continue
        python3 -c 'import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print("   %s: %.0f IOPS, %.1f MiB/s, p50 %.1f us" % (sys.argv[2], w["iops"], w["bw"] / 1024, w["lat_ns"]["percentile"]["50.000000"] / 1000))' \
            "$OUT/$row-$job-r$round.json" "$row $job"
    done
}

step "kernel $(uname -r); $(fio --version); brd: 12 RAM disks of $SIZE_MIB MiB; fio region $REGION_MIB MiB, $RUNTIME s per job"
# ram0 raw; ram1/ram2 tandem memory; ram3/ram4 tandem disk; ram5/ram6 DRBD C; ram7/ram8 DRBD B;
# ram9 tandem without a peer; ram10/ram11 DRBD C with data-integrity-alg crc32c.
modprobe brd rd_nr=12 rd_size=$((SIZE_MIB * 1024))
modprobe ublk_drv
modprobe dm_mod
modprobe drbd
# data-integrity-alg crc32c needs the kernel's crc32c (built in, or a module).
modprobe -q crc32c 2>/dev/null || true
head -n 1 /proc/drbd
{
    echo "kernel=$(uname -r)"
    echo "fio=$(fio --version)"
    echo "drbd=$(head -n 1 /proc/drbd)"
    echo "cpus=$(nproc)"
} > "$OUT/info"

# brd allocates a page on the first write to it: fill fio's region of every disk first, so
# that no row pays for allocation and none is measured on pages another row already paid for.
for n in 0 1 2 3 4 5 6 7 8 9 10 11; do
    dd if=/dev/zero of=/dev/ram$n bs=1M count="$REGION_MIB" oflag=direct status=none
done
free -m


# --- Tandem: two daemons over loopback, ublk frontend, each row on fresh RAM disks.
tandem_row() {
    mode=$1
    d0=$2
    d1=$3
    port=$4
    row=$5
    if [ -n "$d1" ]; then peer_said="node 1 on $d1"; else peer_said="no peer"; fi
    step "$row: mode $mode, node 0 on $d0, $peer_said; frontend ublk"
    nodes="0 1"
    [ -n "$d1" ] || nodes=0
    rm -f "$W/$row"*
    # tandem N: $W/<row>N.toml
    CONF_PREFIX=$row
    for id in $nodes; do
        peer=$((1 - id))
        if [ "$id" = 0 ]; then data=$d0; dm=tandem-vol0; else data=$d1; dm=tandem-vol0-n1; fi
        cat > "${row}$id.toml" <<TOML
[volume]
name = "vol0"
id = 11
size = "${SIZE_MIB}MiB"
mode = "$mode"
secret = "vm-bench secret, 16+ bytes long"

[node]
id = $id
data = "$data"
meta = "$W/${row}$id.meta"
listen = "127.0.0.1:$((port + id))"
control = "$W/${row}$id.sock"
frontend = "ublk"
dm_name = "$dm"
record_pin = "bench-${row}$id"

TOML
        if [ -n "$d1" ]; then
            printf '\n[[peer]]\nid = %s\naddress = "127.0.0.1:%s"\n' "$peer" "$((port + peer))" >> "${row}$id.toml"
        fi
        tandem "$id" create-md > /dev/null
    done
    tandem 0 up --log "$W/$row-node0.log" > /dev/null
    [ -z "$d1" ] || tandem 1 up --log "$W/$row-node1.log" > /dev/null
    retry_handshake tandem 0 primary
    tandem_within 120 0 status --watch > /dev/null
    tandem 0 status
    run_jobs /dev/mapper/tandem-vol0 "$row"
    tandem 0 secondary
    [ -z "$d1" ] || tandem 1 down
    tandem 0 down
}

# --- DRBD 8.4 (the kernel's module) with drbd-utils unpacked from Debian's package: its
# binaries go into this guest's tmpfs overlay at the paths drbdadm expects (/lib/drbd for the
# 8.4 helpers); nothing reaches the host.
# drbdmeta locks /var/lock/drbd-<major>-<minor>: /var/lock is /run/lock, and /run is a fresh tmpfs.
mkdir -p /usr/lib/drbd /var/lib/drbd /run/drbd /run/lock
cp -a "$DRBD_UTILS/lib/drbd/." /usr/lib/drbd/
cp -a "$DRBD_UTILS/sbin/." /usr/sbin/

# Two resources on one host: a resource has exactly one `on` section naming this host, so
# side a and side b are separate resources whose addresses point at each other.
# Optional: the row's name (default drbd-<protocol>) and more `net` options.
drbd_row() {
    protocol=$1
    minor=$2
    d0=$3
    d1=$4
    port=$5
    row=${6:-drbd-$protocol}
    net_extra=${7:-}
    step "$row: DRBD protocol $protocol ${net_extra:+($net_extra) }/dev/drbd$minor on $d0, /dev/drbd$((minor + 1)) on $d1, over 127.0.0.1"
    host=$(uname -n)
    res=p$protocol-$minor
    cat > "$row.conf" <<CONF
global { usage-count no; }
resource $res-a {
    net { protocol $protocol; $net_extra }
    device /dev/drbd$minor;
    disk $d0;
    meta-disk internal;
    on $host { address 127.0.0.1:$port; }
    on side-b { address 127.0.0.1:$((port + 1)); }
}
resource $res-b {
    net { protocol $protocol; $net_extra }
    device /dev/drbd$((minor + 1));
    disk $d1;
    meta-disk internal;
    on $host { address 127.0.0.1:$((port + 1)); }
    on side-a { address 127.0.0.1:$port; }
}
CONF
    conf=$W/$row.conf
    for d in $d0 $d1; do
        # A previous round's metadata (internal: the end of the disk, outside fio's region).
        dd if=/dev/zero of="$d" bs=1M seek=$((SIZE_MIB - 4)) count=4 oflag=direct status=none
    done
    for side in a b; do
        drbdadm -c "$conf" -- --force create-md "$res-$side"
        drbdadm -c "$conf" up "$res-$side"
    done
    wait_for 120 "DRBD to connect" sh -c "drbdadm -c '$conf' cstate $res-a | grep -qx Connected"
    drbdadm -c "$conf" dstate "$res-a"
    # Both sides are zeroed RAM disks, identical: no initial sync needed.
    drbdadm -c "$conf" -- --clear-bitmap new-current-uuid "$res-a"
    wait_for 120 "both DRBD sides UpToDate" sh -c "drbdadm -c '$conf' dstate $res-a | grep -qx UpToDate/UpToDate"
    drbdadm -c "$conf" primary "$res-a"
    cat /proc/drbd
    run_jobs "/dev/drbd$minor" "$row"
    cat /proc/drbd
    drbdadm -c "$conf" secondary "$res-a"
    drbdadm -c "$conf" down "$res-a"
    drbdadm -c "$conf" down "$res-b"
}
run_row() {
    case $1 in
        raw) step "raw: /dev/ram0"; run_jobs /dev/ram0 raw ;;
        # Without a peer: what the ublk frontend and the daemon cost before any replication.
        tandem-alone) tandem_row memory /dev/ram9 "" 7794 tandem-alone ;;
        tandem-memory) tandem_row memory /dev/ram1 /dev/ram2 7790 tandem-memory ;;
        tandem-disk) tandem_row disk /dev/ram3 /dev/ram4 7792 tandem-disk ;;
        drbd-C) drbd_row C 10 /dev/ram5 /dev/ram6 7800 ;;
        drbd-B) drbd_row B 20 /dev/ram7 /dev/ram8 7810 ;;
        # Like for like with Tandem's frame checksum (crc32c over every payload, both ends).
        drbd-C-crc32c) drbd_row C 30 /dev/ram10 /dev/ram11 7820 drbd-C-crc32c "data-integrity-alg crc32c;" ;;
    esac
}

# Odd rounds in this order, even rounds reversed: a slow drift of the host's load (TCG runs on
# shared cores) then weighs on every row alike, and raw is measured first and last.
ORDER="raw tandem-alone tandem-memory tandem-disk drbd-C drbd-B drbd-C-crc32c"
REVERSED=$(echo "$ORDER" | tr ' ' '\n' | tac | tr '\n' ' ')
round=1
while [ "$round" -le "$ROUNDS" ]; do
    if [ $((round % 2)) = 1 ]; then rows=$ORDER; else rows=$REVERSED; fi
    step "round $round of $ROUNDS: $rows"
    for row in $rows; do
        run_row "$row"
    done
    round=$((round + 1))
done
step "done"
echo "== bench: PASSED"
