#!/usr/bin/env bash
# The watch latency of the README's "Watching" section, on this machine: a login
# through server B to its `join` at each watcher on server A, two servers on one Redis.
#
#   bash examples/watch_latency.sh                            # 1 000 watchers, 3 rounds
#   WATCHERS="250 500 1000" ROUNDS=2 bash examples/watch_latency.sh
#   RATE=200 bash examples/watch_latency.sh                   # 200 logins/s
#   BIN=/tmp/new OLD=/tmp/old bash examples/watch_latency.sh  # two builds, interleaved
#
# It needs redis-server, redis-cli and python3 (to read the JSON reports), and builds
# the presence_server and presence_load examples in release mode unless BIN names a
# folder holding both. Its Redis and servers are its own, on free ports, under a
# temporary directory, and are stopped on exit; the Redis on 6379 is not touched.
#
# Each round first times one watcher alone (how fast the machine is at the moment),
# then each watcher count, with each build when OLD is given (the order of the builds
# alternating by round, each build with its own load generator). Every run gets fresh
# servers and a fresh key prefix: a node of an earlier run expiring during the next
# would add events. A run prints the join latency, and the CPU that server A and the
# load generator spent per event per watcher over 4 s in the middle of the run.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
WATCHERS=${WATCHERS:-1000}
RATE=${RATE:-100}
DURATION=${DURATION:-10}
cd "$(dirname "$0")/.."
source examples/bench_support.sh
need redis-server redis-cli python3
release_build
BUILDS=("$BIN")
[[ -z ${OLD:-} ]] || BUILDS+=("$OLD")

REDIS=$(free_port)
start_redis "$REDIS"

start_server() {  # build, port, key prefix; sets SERVER_PID
    env PRESENCE_HTTP_HOST=127.0.0.1 PRESENCE_HTTP_PORT="$2" \
        PRESENCE_REDIS_URI="redis://127.0.0.1:$REDIS" PRESENCE_KEY_PREFIX="$3" \
        PRESENCE_RATE_LIMIT_RATE=1000000 PRESENCE_RATE_LIMIT_CAPACITY=1000000 \
        PRESENCE_MAX_CONNECTIONS=20000 PRESENCE_MAX_WATCHERS=20000 RUST_LOG=warn \
        "$1/presence_server" >>"$DIR/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$2"
}

RUN=0
# One run: fresh servers A and B, `watchers` watchers on A, logins through B.
run() {  # build, watchers
    local build=$1 watchers=$2 a b pid_a pid_b load g0 a0 out
    RUN=$((RUN + 1))
    a=$(free_port); start_server "$build" "$a" "watch$RUN"; pid_a=$SERVER_PID
    b=$(free_port); start_server "$build" "$b" "watch$RUN"; pid_b=$SERVER_PID
    "$build/presence_load" --mode watch --watchers "$watchers" --nodes 2000 --rate "$RATE" \
        --duration "$DURATION" --watch-url "http://127.0.0.1:$a/presence" \
        --url "http://127.0.0.1:$b/presence" --json >"$DIR/out.json" 2>/dev/null &
    load=$!
    sleep 4
    g0=$(ticks "$load"); a0=$(ticks "$pid_a")
    sleep 4
    local g1 a1
    g1=$(ticks "$load"); a1=$(ticks "$pid_a")
    wait "$load"
    kill "$pid_a" "$pid_b"; wait "$pid_a" "$pid_b" 2>/dev/null || true
    out=$(tail -1 "$DIR/out.json")
    python3 - "$build" "$watchers" "$(( a1 - a0 ))" "$(( g1 - g0 ))" "$HZ" "$RATE" "$out" <<'EOF'
import json, sys
build, watchers, a, g, hz, rate, out = sys.argv[1:]
w = json.loads(out)["watch"]
lat = w["latency_ms"]
# Events handed to watchers in the 4 s window: each login's join, to every watcher.
events = 4 * float(rate) * int(watchers)
cpu = lambda ticks: int(ticks) * 1e6 / float(hz) / events
line = (f"{build}: {watchers} watchers: p50 {lat['p50']:.2f} p90 {lat['p90']:.2f} "
        f"p99 {lat['p99']:.2f} max {lat['max']:.2f} ms, {w['missing']} missing, "
        f"{w['duplicates']} duplicates")
if int(watchers) > 1:
    # (With one watcher the servers' own work, the feed's reader and the sweep,
    # would be most of it.)
    line += f"; CPU per event per watcher: server A {cpu(a):.2f} µs, generator {cpu(g):.2f} µs"
print(line)
EOF
}

for round in $(seq "$ROUNDS"); do
    echo "== round $round"
    order=("${BUILDS[@]}")
    if (( ${#BUILDS[@]} == 2 && round % 2 == 0 )); then order=("${BUILDS[1]}" "${BUILDS[0]}"); fi
    run "${order[0]}" 1
    for watchers in $WATCHERS; do
        for build in "${order[@]}"; do run "$build" "$watchers"; done
    done
done
