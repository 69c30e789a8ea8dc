#!/usr/bin/env bash
# The measurements behind the README's "Capacity" section, on this machine:
#
#   bash examples/capacity.sh            # about 10 minutes
#   ROUNDS=5 DURATION=10 bash examples/capacity.sh
#   REPLICAS=0 ROUNDS=1 bash examples/capacity.sh   # a cluster of 3 masters alone
#   PARTS=heartbeats bash examples/capacity.sh      # step 1 alone (about 3 minutes)
#   BIN=/tmp/old PARTS=heartbeats bash examples/capacity.sh   # another build's binaries
#   SPREAD=1 PARTS=heartbeats bash examples/capacity.sh   # also 3 shards and 1 on the cluster
#
# It needs redis-server, redis-cli, openssl and python3 (to read the JSON reports),
# and builds the presence_server and presence_load examples in release mode. Every
# Redis and server it starts is its own, on free ports, under a temporary directory,
# and is stopped on exit; the Redis on 6379 is not touched.
#
# What it measures, each round back to back:
#   1. heartbeats over 64 keep-alive connections (`presence_load --mode flood`) against
#      one standalone Redis (one shard, then PRESENCE_SHARDS=16) and against a local
#      Redis Cluster of 3 masters with one replica each, PRESENCE_SHARDS=16: the CPU
#      Redis spent per heartbeat (INFO cpu of every master, and INFO commandstats),
#      and the server's own CPU per heartbeat (/proc/<pid>/stat); then the same at
#      an offered 10 000 heartbeats/s; with SPREAD=1 also on the cluster with
#      PRESENCE_SHARDS=3 (a prefix whose three shards sit on the three masters: the
#      most a call per master could batch) and PRESENCE_SHARDS=1 (all on one master);
#   2. the same flood over plain HTTP and over HTTPS (a certificate made here), memory
#      store and standalone Redis: throughput of each;
#   3. `GET /presence` of 100 000 nodes (`--mode list`, one client) on the three
#      layouts: server and Redis CPU per listed node (a 12 s run less a 4 s one, so
#      the logins cancel out);
#   4. the watch feed: 2 000 logins at 200/s with 100 watchers and with 1: the
#      difference in the server's CPU per event delivered to a watcher, and the
#      time Redis spends on an event (its XADD, inside the login script).
# Figures are printed as they come, then one summary table.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
NODES=${NODES:-2000}
REPLICAS=${REPLICAS:-1}   # per master in the cluster: 0 shows what replication costs
SPREAD=${SPREAD:-}        # non-empty: the cluster with 3 shards and with 1 too
cd "$(dirname "$0")/.."
source examples/bench_support.sh
need redis-server redis-cli openssl python3
PARTS=${PARTS:-all}       # "heartbeats": step 1 only
release_build

redis_cpu() {   # used_cpu_user + used_cpu_sys of the Redis on port $1, seconds
    redis-cli -p "$1" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.4f", s}'
}
redis_reads() { # reads of client sockets (passes of the event loop that read), Redis on port $1
    redis-cli -p "$1" info stats | tr -d '\r' | sed -n 's/^total_reads_processed:\([0-9]*\)/\1/p'
}
redis_usec() {  # microseconds spent in commands, INFO commandstats, Redis on port $1
    redis-cli -p "$1" info commandstats | tr -d '\r' | sed -n 's/.*usec=\([0-9]*\),.*/\1/p' | awk '{s += $1} END {print s + 0}'
}
sum_over() { local f=$1; shift; local t=0; for p in "$@"; do t=$(python3 -c "print($t + $($f "$p"))"); done; echo "$t"; }

# The standalone Redis.
SOLO=$(free_port)
start_redis "$SOLO"

# The cluster: 3 masters with $REPLICAS replicas each.
CLUSTER=()
for _ in $(seq $((3 * (1 + REPLICAS)))); do
    port=$(free_port)
    start_redis "$port" --cluster-enabled yes --cluster-config-file "$DIR/nodes-$port.conf" --cluster-node-timeout 2000
    CLUSTER+=("$port")
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER[@]}") --cluster-replicas "$REPLICAS" --cluster-yes >"$DIR/create.log"
for _ in $(seq 100); do
    redis-cli -p "${CLUSTER[0]}" cluster info | grep -q 'cluster_state:ok' && break
    sleep 0.1
done
SEEDS=$(printf 'redis://127.0.0.1:%s,' "${CLUSTER[@]}"); SEEDS=${SEEDS%,}
masters() { for p in "${CLUSTER[@]}"; do if [[ $(redis-cli -p "$p" role | head -1) == master ]]; then echo "$p"; fi; done; }
MASTERS=($(masters))
REPLICA_PORTS=()
for p in "${CLUSTER[@]}"; do [[ " ${MASTERS[*]} " == *" $p "* ]] || REPLICA_PORTS+=("$p"); done

# A CA and a certificate for localhost, for the HTTPS runs.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=capacity-ca \
    -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$DIR/server.key" \
    -out "$DIR/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$DIR/san.ext"
openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
    -days 1 -extfile "$DIR/san.ext" -out "$DIR/server.pem" 2>/dev/null

SERVER_PID=
start_server() {  # port, env assignments...
    local port=$1; shift
    env PRESENCE_HTTP_HOST=127.0.0.1 PRESENCE_HTTP_PORT="$port" \
        PRESENCE_RATE_LIMIT_RATE=10000000 PRESENCE_RATE_LIMIT_CAPACITY=10000000 \
        PRESENCE_MAX_CONNECTIONS=20000 PRESENCE_MAX_WATCHERS=20000 RUST_LOG=warn "$@" \
        "$BIN/presence_server" >>"$DIR/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$port"
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }

# The last phase of a presence_load JSON report: "<requests> <throughput/s>".
steady() { tail -1 | python3 -c 'import json,sys; p=json.load(sys.stdin)["phases"][-1]; print(p["ok"], p["throughput_rps"])'; }
watch_events() { tail -1 | python3 -c 'import json,sys; w=json.load(sys.stdin)["watch"]["events"]; print(w["join"] + w["update"] + w["leave"])'; }
calc() { python3 -c "print(f'{$1:.${2:-2f}}')"; }

declare -A SUMS
add() { SUMS[$1]="${SUMS[$1]:-} $2"; }

# Runs presence_load with `args` against the server, Redis ports given; sets OK and
# RPS (of its last phase), SRV (server CPU, s), RCPU (Redis CPU, s) and USEC (µs in
# commands) for the run.
sample() {  # args, redis ports...
    local args=$1; shift
    local r0 s0 out
    for p in "$@"; do redis-cli -p "$p" config resetstat >/dev/null; done
    r0=$(sum_over redis_cpu "$@"); s0=$(ticks "$SERVER_PID")
    out=$("$BIN/presence_load" $args --json 2>/dev/null)
    read -r OK RPS < <(echo "$out" | steady)
    SRV=$(calc "($(ticks "$SERVER_PID") - $s0) / $HZ" 4f)
    RCPU=$(calc "$(sum_over redis_cpu "$@") - $r0" 4f)
    USEC=$(sum_over redis_usec "$@")
    READS=$(sum_over redis_reads "$@")
}

# One flood: prints and records the server's and Redis's CPU per heartbeat.
measured() {  # label, args, redis ports...
    local label=$1 args=$2; shift 2
    sample "$args" "$@"
    local server_us redis_us cmd_us
    server_us=$(calc "$SRV * 1e6 / max($OK, 1)")
    redis_us=$(calc "$RCPU * 1e6 / max($OK, 1)")
    cmd_us=$(calc "$USEC / max($OK, 1)")
    echo "$label: $OK ok, $RPS/s; server CPU $server_us µs/heartbeat; Redis CPU $redis_us µs/heartbeat (in commands $cmd_us); heartbeats per socket read $(calc "$OK / max($READS, 1)")"
    # (A master that ran none of these, as with SPREAD's one shard, prints nothing.)
    for p in "$@"; do redis-cli -p "$p" info commandstats | tr -d '\r' | { grep -E 'cmdstat_(evalsha|eval|exists|zadd|pexpire|hset|xadd):' || true; } | sed "s/^/   $p /"; done
    add "$label.server" "$server_us"; add "$label.redis" "$redis_us"; add "$label.cmd" "$cmd_us"; add "$label.rps" "$RPS"
}

# Listings of 100 000 nodes for 4 s and for 12 s: the difference is the listings'
# alone (each run logs its nodes in first).
listing() {  # label, url, redis ports...
    local label=$1 url=$2; shift 2
    local args="--mode list --nodes 100000 --login-concurrency 64 --concurrency 1 --url $url"
    sample "$args --duration 4" "$@"
    local ok1=$OK srv1=$SRV r1=$RCPU
    sample "$args --duration 12" "$@"
    local n=$((OK - ok1))
    local server_ns redis_ns
    server_ns=$(calc "($SRV - $srv1) * 1e9 / max($n, 1) / 1e5" 1f)
    redis_ns=$(calc "($RCPU - $r1) * 1e9 / max($n, 1) / 1e5" 1f)
    echo "$label: $n listings more in 8 s ($RPS/s); server CPU $server_ns ns/node, Redis CPU $redis_ns ns/node"
    add "$label.server" "$server_ns"; add "$label.redis" "$redis_ns"; add "$label.rps" "$RPS"
}

FLOOD="--mode flood --nodes $NODES --concurrency 64 --login-concurrency 64 --duration $DURATION"
# The same 10 000 heartbeats/s offered to both layouts (batches as small as a real
# deployment's per-server share makes them).
PACED="--mode nodes --nodes 10000 --interval-ms 1000 --concurrency 64 --login-concurrency 64 --duration $DURATION"
# Step 1 on one layout: the flood and the paced run against a server started with the
# env assignments given, counting the CPU of the Redis processes whose ports are in ON.
heartbeats_on() {  # label, env assignments...
    local label=$1 port
    shift
    port=$(free_port)
    start_server "$port" "$@"
    measured "$label" "$FLOOD --url http://127.0.0.1:$port/presence" "${ON[@]}"
    measured "paced.$label" "$PACED --url http://127.0.0.1:$port/presence" "${ON[@]}"
}
for round in $(seq "$ROUNDS"); do
    echo "== round $round"
    ON=("$SOLO")
    heartbeats_on standalone PRESENCE_REDIS_URI="redis://127.0.0.1:$SOLO" PRESENCE_KEY_PREFIX="cap$round"
    stop_server
    heartbeats_on solo16 PRESENCE_SHARDS=16 PRESENCE_REDIS_URI="redis://127.0.0.1:$SOLO" PRESENCE_KEY_PREFIX="cap16-$round"
    stop_server

    ON=("${MASTERS[@]}")
    heartbeats_on cluster16 PRESENCE_REDIS_MODE=cluster PRESENCE_SHARDS=16 PRESENCE_REDIS_URI="$SEEDS" PRESENCE_KEY_PREFIX="cap$round"
    echo "   (replicas: $(sum_over redis_cpu "${REPLICA_PORTS[@]}") s of CPU since their start)"
    stop_server

    if [[ -n $SPREAD ]]; then
        # A prefix whose shards 0, 1 and 2 hash to the three masters' slot ranges
        # (0-5460, 5461-10922, 10923-16383, as `redis-cli --cluster create` splits them).
        for i in $(seq 200); do
            spread="spread$round-$i"; master_of=()
            for k in 0 1 2; do
                master_of+=($(( $(redis-cli -p "${CLUSTER[0]}" cluster keyslot "{$spread.$k}") / 5461 )))
            done
            [[ ${master_of[0]} != "${master_of[1]}" && ${master_of[1]} != "${master_of[2]}" &&
               ${master_of[0]} != "${master_of[2]}" ]] && break
        done
        heartbeats_on cluster3 PRESENCE_REDIS_MODE=cluster PRESENCE_SHARDS=3 PRESENCE_REDIS_URI="$SEEDS" PRESENCE_KEY_PREFIX="$spread"
        stop_server
        heartbeats_on cluster1 PRESENCE_REDIS_MODE=cluster PRESENCE_SHARDS=1 PRESENCE_REDIS_URI="$SEEDS" PRESENCE_KEY_PREFIX="one$round"
        stop_server
    fi

    [[ $PARTS == all ]] || continue
    for store in memory redis; do
        extra=()
        [[ $store == redis ]] && extra=(PRESENCE_REDIS_URI="redis://127.0.0.1:$SOLO" PRESENCE_KEY_PREFIX="tls$round")
        port=$(free_port)
        start_server "$port" "${extra[@]}"
        read -r _ plain < <("$BIN/presence_load" $FLOOD --url "http://127.0.0.1:$port/presence" --json 2>/dev/null | steady)
        stop_server
        port=$(free_port)
        start_server "$port" "${extra[@]}" PRESENCE_TLS_CERT_FILE="$DIR/server.pem" PRESENCE_TLS_KEY_FILE="$DIR/server.key"
        read -r _ tls < <("$BIN/presence_load" $FLOOD --url "https://localhost:$port/presence" --cacert "$DIR/ca.pem" --json 2>/dev/null | steady)
        stop_server
        ratio=$(calc "100 * $tls / $plain" 0f)
        echo "https vs http, $store store: $tls/s vs $plain/s = $ratio %"
        add "https.$store" "$ratio"
    done
done

if [[ $PARTS == all ]]; then
echo "== listings of 100 000 nodes"
port=$(free_port)
start_server "$port" PRESENCE_REDIS_URI="redis://127.0.0.1:$SOLO" PRESENCE_KEY_PREFIX=list PRESENCE_TTL_SEC=600
listing list.standalone "http://127.0.0.1:$port/presence" "$SOLO"
stop_server
port=$(free_port)
start_server "$port" PRESENCE_SHARDS=16 PRESENCE_REDIS_URI="redis://127.0.0.1:$SOLO" PRESENCE_KEY_PREFIX=list16 PRESENCE_TTL_SEC=600
listing list.solo16 "http://127.0.0.1:$port/presence" "$SOLO"
stop_server
port=$(free_port)
start_server "$port" PRESENCE_REDIS_MODE=cluster PRESENCE_SHARDS=16 PRESENCE_REDIS_URI="$SEEDS" PRESENCE_KEY_PREFIX=list PRESENCE_TTL_SEC=600
listing list.cluster16 "http://127.0.0.1:$port/presence" "${MASTERS[@]}"
stop_server

echo "== the watch feed: 2 000 logins at 200/s, with 100 watchers and with 1"
for watchers in 100 1; do
    port=$(free_port)
    start_server "$port" PRESENCE_REDIS_URI="redis://127.0.0.1:$SOLO" PRESENCE_KEY_PREFIX="feed$watchers"
    redis-cli -p "$SOLO" config resetstat >/dev/null
    s0=$(ticks "$SERVER_PID")
    out=$("$BIN/presence_load" --mode watch --watchers "$watchers" --nodes 2000 --rate 200 --duration 10 \
        --url "http://127.0.0.1:$port/presence" --json 2>/dev/null)
    s1=$(ticks "$SERVER_PID")
    events=$(echo "$out" | watch_events)
    add "feed.server.$watchers" "$(calc "($s1 - $s0) / $HZ * 1e6" 0f)"
    add "feed.events.$watchers" "$events"
    # The event's share of a login: its XADD, inside the login script.
    xadd=$(redis-cli -p "$SOLO" info commandstats | tr -d '\r' | sed -n 's/^cmdstat_xadd:.*usec_per_call=\([0-9.]*\),.*/\1/p')
    add "feed.xadd" "${xadd:-0}"
    echo "watchers $watchers: server CPU $(calc "($s1 - $s0) / $HZ" 3f) s, $events events delivered; XADD $xadd µs per event in Redis"
    stop_server
done

fi

median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.2f}')" $1; }
echo
echo "== summary (medians of $ROUNDS rounds; µs of CPU per operation)"
printf '%-34s %s\n' "Redis CPU / heartbeat, standalone" "$(median "${SUMS[standalone.redis]}") (in commands $(median "${SUMS[standalone.cmd]}"))"
printf '%-34s %s\n' "Redis CPU / heartbeat, 16 shards" "$(median "${SUMS[solo16.redis]}") (in commands $(median "${SUMS[solo16.cmd]}")) on one Redis"
printf '%-34s %s\n' "Redis CPU / heartbeat, cluster" "$(median "${SUMS[cluster16.redis]}") (in commands $(median "${SUMS[cluster16.cmd]}")), 16 shards"
printf '%-34s %s\n' "the same at 10 000/s, standalone" "$(median "${SUMS[paced.standalone.redis]}") (in commands $(median "${SUMS[paced.standalone.cmd]}"))"
printf '%-34s %s\n' "the same at 10 000/s, 16 shards" "$(median "${SUMS[paced.solo16.redis]}") (in commands $(median "${SUMS[paced.solo16.cmd]}")) on one Redis"
printf '%-34s %s\n' "the same at 10 000/s, cluster" "$(median "${SUMS[paced.cluster16.redis]}") (in commands $(median "${SUMS[paced.cluster16.cmd]}")), 16 shards"
if [[ -n $SPREAD ]]; then
    printf '%-34s %s\n' "Redis CPU / heartbeat, cluster" "$(median "${SUMS[cluster3.redis]}") (in commands $(median "${SUMS[cluster3.cmd]}")), 3 shards on 3 masters"
    printf '%-34s %s\n' "Redis CPU / heartbeat, cluster" "$(median "${SUMS[cluster1.redis]}") (in commands $(median "${SUMS[cluster1.cmd]}")), 1 shard"
    printf '%-34s %s\n' "the same at 10 000/s, cluster" "$(median "${SUMS[paced.cluster3.redis]}") (in commands $(median "${SUMS[paced.cluster3.cmd]}")), 3 shards on 3 masters"
    printf '%-34s %s\n' "the same at 10 000/s, cluster" "$(median "${SUMS[paced.cluster1.redis]}") (in commands $(median "${SUMS[paced.cluster1.cmd]}")), 1 shard"
fi
printf '%-34s %s\n' "server CPU / heartbeat" "$(median "${SUMS[standalone.server]}") standalone, $(median "${SUMS[solo16.server]}") 16 shards, $(median "${SUMS[cluster16.server]}") cluster"
printf '%-34s %s\n' "the same at 10 000/s" "$(median "${SUMS[paced.standalone.server]}") standalone, $(median "${SUMS[paced.solo16.server]}") 16 shards, $(median "${SUMS[paced.cluster16.server]}") cluster"
printf '%-34s %s\n' "heartbeats/s (flood)" "$(median "${SUMS[standalone.rps]}") standalone, $(median "${SUMS[solo16.rps]}") 16 shards, $(median "${SUMS[cluster16.rps]}") cluster"
[[ $PARTS == all ]] || exit 0
printf '%-34s %s\n' "HTTPS / HTTP, memory store (%)" "$(median "${SUMS[https.memory]}") (${SUMS[https.memory]} )"
printf '%-34s %s\n' "HTTPS / HTTP, Redis store (%)" "$(median "${SUMS[https.redis]}") (${SUMS[https.redis]} )"
printf '%-34s %s\n' "listing, standalone: server, Redis" "${SUMS[list.standalone.server]}, ${SUMS[list.standalone.redis]} ns of CPU per node (${SUMS[list.standalone.rps]} listings/s)"
printf '%-34s %s\n' "listing, 16 shards: server, Redis" "${SUMS[list.solo16.server]}, ${SUMS[list.solo16.redis]} ns of CPU per node (${SUMS[list.solo16.rps]} listings/s) on one Redis"
printf '%-34s %s\n' "listing, cluster: server, Redis" "${SUMS[list.cluster16.server]}, ${SUMS[list.cluster16.redis]} ns of CPU per node (${SUMS[list.cluster16.rps]} listings/s)"
printf '%-34s %s\n' "feed fan-out, server CPU" "$(calc "(${SUMS[feed.server.100]} - ${SUMS[feed.server.1]}) / max(${SUMS[feed.events.100]} - ${SUMS[feed.events.1]}, 1)") µs per event per watcher"
printf '%-34s %s\n' "feed, Redis CPU per event (XADD)" "${SUMS[feed.xadd]} µs"
