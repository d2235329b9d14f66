# Shared by the guest scenarios (sourced; not a scenario itself). POSIX sh: the scenarios run
# with `sh -eu` (the host's /bin/sh in the guest).
#
# A scenario sets, before sourcing this file (after checking its environment):
#   SCENARIO      its name: `== $SCENARIO: ...` lines, work directory /tmp/tandem-$SCENARIO
#   STEP_ELAPSED  1 to have `step` say the seconds since the start: `== name: [N s] ...`
#   FAILURE_LOGS  a glob under $W whose files a failure tails (e.g. 'node*.log'); none if unset
#   FAILURE_SAID  what the FAILED line calls them ("the daemons' logs"); nothing if unset
#   FAILURE_TAIL  how many lines of each (40)
# and may define `on_failure`, run after the logs when the scenario fails (dmsetup table, ...).
# Sourcing makes $W, changes into it and sets the EXIT trap that reports a failure.
: "${SCENARIO:?SCENARIO must name the scenario sourcing lib.sh}"
STEP_ELAPSED=${STEP_ELAPSED:-}
FAILURE_LOGS=${FAILURE_LOGS:-}
FAILURE_SAID=${FAILURE_SAID:-}
FAILURE_TAIL=${FAILURE_TAIL:-40}
# tandem N: node N's config is $W/${CONF_PREFIX}N.toml.
CONF_PREFIX=${CONF_PREFIX:-node}

W=/tmp/tandem-$SCENARIO
mkdir -p "$W"
cd "$W" || exit
scenario_started=$(date +%s)

step() {
    if [ -n "$STEP_ELAPSED" ]; then
        echo "== $SCENARIO: [$(($(date +%s) - scenario_started)) s] $*"
    else
        echo "== $SCENARIO: $*"
    fi
}

# What a failure shows besides the logs; the scenario redefines it.
on_failure() {
    :
}

on_exit() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "== $SCENARIO: FAILED (exit status $status)${FAILURE_SAID:+; $FAILURE_SAID:}"
        if [ -n "$FAILURE_LOGS" ]; then
            # shellcheck disable=SC2086 # the glob is meant to expand
            for log in "$W"/$FAILURE_LOGS; do
                [ -f "$log" ] && { echo "--- $log"; tail -n "$FAILURE_TAIL" "$log"; }
            done
        fi
        on_failure
    fi
}
trap on_exit EXIT

# node_config ID VOLUME_ID PORT FRONTEND [LINE...]: $W/nodeID.toml, node ID (0 or 1) of two over
# 127.0.0.1 (node N listens on PORT + N) in one guest, each with its own data, meta, control socket,
# dm table (tandem-vol0 on node 0, tandem-vol0-n1 on node 1) and eBPF record pin; a 256 MiB
# memory-mode volume; LINEs go into [node].
node_config() {
    id=$1
    volume_id=$2
    port=$3
    frontend=$4
    shift 4
    peer=$((1 - id))
    if [ "$id" = 0 ]; then dm_name=tandem-vol0; else dm_name=tandem-vol0-n1; fi
    {
        cat <<TOML
[volume]
name = "vol0"
id = $volume_id
size = "256MiB"
mode = "memory"
secret = "vm-test $SCENARIO secret, 16+ bytes"

[node]
id = $id
data = "$W/node$id.img"
meta = "$W/node$id.meta"
listen = "127.0.0.1:$((port + id))"
control = "$W/node$id.sock"
frontend = "$frontend"
dm_name = "$dm_name"
# Both nodes run in this one guest: each needs its own pinned eBPF record.
record_pin = "vol0-node$id"
TOML
        for line in "$@"; do
            echo "$line"
        done
        cat <<TOML

[[peer]]
id = $peer
address = "127.0.0.1:$((port + peer))"
TOML
    } > "$W/node$id.toml"
}

# The tandem CLI with node N's config: tandem N ARG...
tandem() {
    node=$1
    shift
    "$TANDEM" -c "$W/$CONF_PREFIX$node.toml" "$@"
}

# The same under `timeout SECONDS`: tandem_within SECONDS N ARG...
tandem_within() {
    seconds=$1
    node=$2
    shift 2
    timeout "$seconds" "$TANDEM" -c "$W/$CONF_PREFIX$node.toml" "$@"
}

# Runs CMD every 0.1 s, its output dropped, until it succeeds (0) or SECONDS have passed (1).
poll() {
    polls=$(($1 * 10))
    shift
    for _ in $(seq 1 "$polls"); do
        if "$@" > /dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# wait_for SECONDS WHAT CMD...: polls CMD; says what it waited for if it never succeeds.
wait_for() {
    seconds=$1
    what=$2
    shift 2
    if ! poll "$seconds" "$@"; then
        echo "timed out after $seconds s waiting for $what"
        return 1
    fi
}

# Waits (60 s at most) until FILE has a line; prints it.
first_line() {
    if ! poll 60 test -s "$1"; then
        echo "no line in $1 after 60 s" >&2
        return 1
    fi
    head -n 1 "$1"
}

# An operator command that meets a connection handshake in flight is refused and changes
# nothing ("a connection handshake is in progress"): retry it for up to 30 s, as an operator
# would. Any other failure fails at once.
retry_handshake() {
    tries=0
    while ! out=$("$@" 2>&1); do
        case "$out" in
        *"handshake is in progress"*) ;;
        *)
            echo "$out" >&2
            return 1
            ;;
        esac
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            echo "$out" >&2
            return 1
        fi
        sleep 0.5
    done
    if [ -n "$out" ]; then echo "$out"; fi
}

# No udev in the guest: LVM must neither wait for it nor ask it for the device list. The
# settings to append to an lvm.conf (led by a blank line).
lvm_without_udev() {
    printf '%s\n' '' 'activation {' '    udev_sync = 0' '    udev_rules = 0' '}' \
        'devices {' '    obtain_device_list_from_udev = 0' '}'
}

# COUNT files of 4 MiB of random data, mnt/file1..COUNT, synced; their sums in sums.
write_files() {
    for i in $(seq 1 "$1"); do
        dd if=/dev/urandom of="mnt/file$i" bs=1M count=4 status=none
    done
    sync
    (cd mnt && sha256sum file* > ../sums)
}

# Every file in sums checks under mnt.
check_files() {
    (cd mnt && sha256sum -c ../sums)
}

# ublk_serve NAME [ARG...]: the ublk_file example serving $W/backing.img in the background (stdout
# in NAME.out, stderr in NAME.log); its pid in $served, the device it prints in $served_device.
ublk_serve() {
    name=$1
    shift
    "$UBLK_FILE" "$W/backing.img" "$@" > "$name.out" 2> "$name.log" &
    # shellcheck disable=SC2034 # read by the scenario
    served=$!
    # shellcheck disable=SC2034
    served_device=$(first_line "$name.out")
}

# A writer across a ublk server's death: `during` copied to mnt/during with conv=fsync in the
# background (queued by the kernel while no server runs: user recovery, not failed); its pid in
# $writer. writer_done waits for it and checks that it succeeded and wrote every byte.
writer_start() {
    (dd if=during of=mnt/during bs=1M conv=fsync status=none && echo "writer: done") > writer.out 2>&1 &
    writer=$!
}

writer_done() {
    wait "$writer"
    cat writer.out
    grep -q "writer: done" writer.out
    cmp during mnt/during
}
