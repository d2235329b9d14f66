# Shared by the guest scenarios (sourced; not a scenario itself).

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
