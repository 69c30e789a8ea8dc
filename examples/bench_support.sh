# Sourced by examples/capacity.sh and examples/watch_latency.sh, not run: the release
# binaries, a temporary directory, the processes to stop on exit, free ports, CPU
# ticks of a process, and Redis servers of the script's own.
#
# Sourcing it makes DIR (removed on exit), PIDS (each killed on exit) and HZ.

# Exits naming the first of the tools given that is not on the PATH.
need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$(basename "$0"): $tool is missing" >&2; exit 1; }
    done
}

# BIN: the folder of presence_server and presence_load, built here unless it is set.
release_build() {
    if [[ -z ${BIN:-} ]]; then
        cargo build --release --quiet --example presence_server --example presence_load
        BIN=target/release/examples
    fi
}

DIR=$(mktemp -d)
PIDS=()
cleanup() {
    exec 2>/dev/null   # bash's "Killed" notices of the processes stopped here
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

# A free port below 55536 whose cluster bus port (+10000) is free too.
free_port() {
    python3 -c '
import random, socket
while True:
    p = random.randrange(20000, 55000)
    try:
        for q in (p, p + 10000):
            socket.socket().bind(("127.0.0.1", q))
        print(p)
        break
    except OSError:
        pass'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, in clock ticks
HZ=$(getconf CLK_TCK)
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; tail -n 5 "$DIR"/*.log >&2; exit 1; }

start_redis() {  # port, extra args...
    local port=$1; shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
        --logfile "$DIR/redis-$port.log" "$@" &
    PIDS+=($!)
    wait_port "$port"
}
