#!/usr/bin/env bash
# benches/run.sh — the whole benchmark in one command (see benches/README.md).
#
# Starts crier, Nchan and Pushpin in turn on loopback, runs the workloads of issue 5 against
# each (fan-out SSE/WebSocket at a set rate and as fast as possible, many channels, idle
# capacity, publish rate over TCP and crier's Unix socket), then the proxy pass-through with wrk
# (direct vs crier vs nginx), each REPS times, and writes benches/RESULTS.md and
# benches/results.json (SMOKE=1: RESULTS-smoke.md, results-smoke.json). The workloads of the
# later issues (15-22: a second crier build side by side, nginx as the app, the slow reader,
# multiplexed subscribers, the Redis cluster, the file store, WebSocket publishing, publish_on and
# [[poll]]) are named workloads too, and WORKLOADS=issueN (or all) selects them.
#
#   benches/run.sh                 # full run of issue 5's workloads (~30-40 min on 2 cores)
#   SMOKE=1 benches/run.sh         # 500 subscribers, 1 repetition: a few minutes
#   SERVERS="crier nchan" WORKLOADS="fanout-sse-max capacity-sse" REPS=1 benches/run.sh
#   CRIER_BASE_BIN=$(benches/build-base.sh main~3) SERVERS="crier-base crier nchan" \
#       WORKLOADS="fanout-sse-max fanout-ws-max proxy" benches/run.sh
#
# Every size is an environment variable (defaults below). Only loopback addresses are used;
# every generator run is bounded in count and time.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PEERS=$HERE/peers

# The variables a caller may set; the ones set are recorded as part of the exact command.
VARS=(SMOKE REPS SUBS MSGS SIZE RATE CHANNEL_SUBS CHANNEL_PUBS CAP_SUBS PUBRATE_MSGS PUBRATE_CONNS
      WRK_DURATION WRK_CONNS WRK_THREADS RAMP_RATE PUSHPIN_RAMP_RATE BUFFER WORKERS GEN_THREADS SERVERS WORKLOADS
      OUT RUN_DIR CRIER_BIN CRIER_BASE_BIN LOADGEN_BIN INSTALL MAX_SECONDS DRAIN_MAX ROUNDS PROXY_APP
      SLOW_MSGS SLOW_CONNS SLOW_READ_BPS MUX_SUBS MUX_CHANNELS MUX_PER_SUB MUX_PUBS
      CLUSTER_SERVERS CLUSTER_PUB_CONNS STORE_SERVERS STORE_CHANNELS STORE_MSGS STORE_PUB_CONNS
      WSPUB_MSGS WSPUB_SUBS POLL_SUBS POLL_SECONDS POLL_INTERVAL)
COMMAND=""
for v in "${VARS[@]}"; do
    if [[ -n "${!v+x}" ]]; then COMMAND+="$v=${!v@Q} "; fi
done
COMMAND+="benches/run.sh${*:+ $*}"

if [[ "${SMOKE:-0}" == 1 ]]; then
    : "${REPS:=1}" "${SUBS:=500}" "${MSGS:=50}" "${CHANNEL_SUBS:=500}" "${CHANNEL_PUBS:=1000}"
    : "${CAP_SUBS:=1000}" "${PUBRATE_MSGS:=2000}" "${WRK_DURATION:=3}" "${DRAIN_MAX:=10}"
    : "${ROUNDS:=2}" "${SLOW_MSGS:=20000}" "${MUX_SUBS:=500}" "${MUX_CHANNELS:=100}" "${MUX_PUBS:=2000}"
    : "${STORE_CHANNELS:=1000}" "${STORE_MSGS:=20}" "${WSPUB_MSGS:=2000}" "${WSPUB_SUBS:=200}"
    : "${POLL_SUBS:=500}" "${POLL_SECONDS:=4}"
    SUFFIX=-smoke
else
    SUFFIX=
fi
REPS=${REPS:-3}
SUBS=${SUBS:-10000}               # fan-out subscribers (one channel)
MSGS=${MSGS:-200}                 # fan-out messages
SIZE=${SIZE:-100}                 # message body bytes
RATE=${RATE:-20}                  # fan-out "-rate" workloads: messages/s
CHANNEL_SUBS=${CHANNEL_SUBS:-10000}   # many channels: subscribers, one channel each
CHANNEL_PUBS=${CHANNEL_PUBS:-20000}   # many channels: publishes, round-robin
CAP_SUBS=${CAP_SUBS:-19000}       # capacity: idle subscribers (hard limit here: 20,000 fds/process)
PUBRATE_MSGS=${PUBRATE_MSGS:-20000}   # publish rate: publishes to a channel with one subscriber
PUBRATE_CONNS=${PUBRATE_CONNS:-1}     # publish rate: keep-alive connections (1 = sequential)
WRK_DURATION=${WRK_DURATION:-10}  # proxy: seconds per wrk run
WRK_CONNS=${WRK_CONNS:-64}
WRK_THREADS=${WRK_THREADS:-1}
RAMP_RATE=${RAMP_RATE:-2000}      # new subscriber connections per second
PUSHPIN_RAMP_RATE=${PUSHPIN_RAMP_RATE:-1000}  # Pushpin answers 500/502 to part of a faster ramp
BUFFER=${BUFFER:-100}             # per-channel message buffer, crier and Nchan alike
WORKERS=${WORKERS:-2}             # crier worker_threads = nginx worker_processes
GEN_THREADS=${GEN_THREADS:-2}     # generator runtime threads
MAX_SECONDS=${MAX_SECONDS:-300}   # hard limit per generator run
DRAIN_MAX=${DRAIN_MAX:-30}        # after the last publish, wait at most this long for deliveries
ROUNDS=${ROUNDS:-3}               # proxy-nginxapp, publish-on-*: alternating rounds per repetition
PROXY_APP=${PROXY_APP:-loadgen}   # the app behind the proxy workload: loadgen | nginx
SLOW_MSGS=${SLOW_MSGS:-100000}    # slow reader: publishes (100 B)
SLOW_CONNS=${SLOW_CONNS:-8}       # slow reader: keep-alive publish connections
SLOW_READ_BPS=${SLOW_READ_BPS:-1000000}  # slow-reader-throttled: the reader's bytes/s
MUX_SUBS=${MUX_SUBS:-10000}       # multiplexed: subscribers
MUX_CHANNELS=${MUX_CHANNELS:-1000}  # multiplexed: channels
MUX_PER_SUB=${MUX_PER_SUB:-4}     # multiplexed: channels per subscriber
MUX_PUBS=${MUX_PUBS:-20000}       # multiplexed: publishes spread over the channels
CLUSTER_SERVERS=${CLUSTER_SERVERS:-crier crier-cluster nchan-redis}
CLUSTER_PUB_CONNS=${CLUSTER_PUB_CONNS:-32}
STORE_SERVERS=${STORE_SERVERS:-crier crier-file}
STORE_CHANNELS=${STORE_CHANNELS:-10000}  # restart: channels stored
STORE_MSGS=${STORE_MSGS:-100}     # restart: messages per channel stored
STORE_PUB_CONNS=${STORE_PUB_CONNS:-32}
WSPUB_MSGS=${WSPUB_MSGS:-20000}   # WebSocket publishing: frames from one client
WSPUB_SUBS=${WSPUB_SUBS:-1000}    # WebSocket publishing: fan-out subscribers
POLL_SUBS=${POLL_SUBS:-10000}     # poll: subscribers on the [[poll]] channel = simulated browsers
POLL_SECONDS=${POLL_SECONDS:-10}  # poll: measuring window
POLL_INTERVAL=${POLL_INTERVAL:-2} # poll: seconds between polls (crier's and each browser's)
SERVERS=${SERVERS:-crier nchan pushpin pushpin-tuned}
WORKLOADS=${WORKLOADS:-issue5}
OUT=${OUT:-$HERE}
RUN_DIR=${RUN_DIR:-/tmp/crier-bench.$$}
INSTALL=${INSTALL:-1}
REDIS_PORT=18500

# Workload groups: one name for the workloads an issue asks for.
expand_workloads() {
    local w out=()
    for w in $1; do
        case $w in
        issue5) out+=(fanout-sse-rate fanout-sse-max fanout-ws-rate fanout-ws-max channels capacity-sse capacity-ws pubrate-tcp pubrate-unix proxy) ;;
        issue15) out+=(fanout-sse-max fanout-ws-max proxy proxy-nginxapp) ;;
        issue16) out+=(store-pubrate-1 store-pubrate-32 store-restart) ;;
        issue17) out+=(cluster-fanout cluster-pubrate) ;;
        issue19) out+=(slow-reader slow-reader-throttled proxy-nginxapp) ;;
        issue20) out+=(mux mux-single mux-single-fanout) ;;
        issue21) out+=(ws-publish-rate ws-publish-fanout) ;;
        issue22) out+=(publish-on-get publish-on-post poll-upstream) ;;
        all) out+=($(expand_workloads "issue5 issue19 issue20 issue17 issue16 issue21 issue22")) ;;
        *) out+=("$w") ;;
        esac
    done
    # Each workload once, in first-named order.
    printf '%s\n' "${out[@]}" | awk '!seen[$0]++' | tr '\n' ' '
}
WORKLOADS=$(expand_workloads "$WORKLOADS")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ " $SERVERS " == *" crier-base"* && -z "${CRIER_BASE_BIN:-}" ]]; then
    echo "SERVERS names crier-base: set CRIER_BASE_BIN to the other crier build (benches/build-base.sh REV prints one)" >&2
    exit 1
fi

# --- dependencies (only what the selected servers and workloads use) --------------------------
need_pkgs=()
[[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx-light)
[[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]] || need_pkgs+=(libnginx-mod-nchan)
uses_pushpin=0
for w in $WORKLOADS; do
    case $w in fanout-* | channels | capacity-* | pubrate-tcp) uses_pushpin=1 ;; esac
done
if [[ " $SERVERS " == *" pushpin"* && $uses_pushpin == 1 ]]; then
    command -v pushpin >/dev/null || need_pkgs+=(pushpin)
fi
if [[ " $WORKLOADS " =~ \ (proxy|publish-on) ]]; then command -v wrk >/dev/null || need_pkgs+=(wrk); fi
if [[ " $WORKLOADS " == *" cluster-"* ]]; then
    command -v redis-server >/dev/null || need_pkgs+=(redis-server)
    command -v curl >/dev/null || need_pkgs+=(curl)
fi
if ((${#need_pkgs[@]})); then
    if [[ "$INSTALL" == 1 ]]; then
        log "installing ${need_pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    else
        echo "missing packages: ${need_pkgs[*]} (apt-get install them, or run with INSTALL=1)" >&2
        exit 1
    fi
fi
NGINX=/usr/sbin/nginx

if [[ -z "${CRIER_BIN:-}" || -z "${LOADGEN_BIN:-}" ]]; then
    log "building crier and crier-loadgen (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin crier --bin crier-loadgen)
fi
CRIER_BIN=${CRIER_BIN:-$ROOT/target/release/crier}
LOADGEN_BIN=${LOADGEN_BIN:-$ROOT/target/release/crier-loadgen}

mkdir -p "$RUN_DIR" "$OUT"
RESULTS=$RUN_DIR/results.jsonl
: >"$RESULTS"
log "run directory: $RUN_DIR"
log "workloads: $WORKLOADS"

# --- process helpers (every process is ended by its own pid) ------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port [seconds] [pid]: fails early when pid (the process that should open it) died
    local i
    for ((i = 0; i < ${2:-10} * 20; i++)); do
        port_open "$1" && return 0
        if [[ -n "${3:-}" ]] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
        sleep 0.05
    done
    log "port $1 did not open"
    return 1
}

wait_port_closed() {
    local i
    for ((i = 0; i < 200; i++)); do
        port_open "$1" || return 0
        sleep 0.05
    done
    log "port $1 is still open"
    return 1
}

descendants() { # pid → the pid and all its descendants
    local p=$1 c
    echo "$p"
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do descendants "$c"; done
}

stop_tree() { # pid [signal]: signal the tree, wait, then SIGKILL what is left
    local root=$1 sig=${2:-TERM} pids i
    pids=$(descendants "$root" | sort -u)
    kill -"$sig" "$root" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        local alive=0 p
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.05
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
}

SERVER_PIDS=()   # every process of the server under test (nodes, redis-server): memory and CPU
EXTRA_PIDS=()    # helpers that are not measured (Pushpin's GRIP backend)
UPSTREAM_PID=""
START_ERROR=""
CRIER_CMD=()     # how the last crier (first node) was started, for the restart measurement
ALL_PORTS="18080 18081 18082 18090 18180 18181 18280 18281 18282 18283 18284 18290 18380 18480 18481 18482 18500 18580 18581"

ports_free() { # a process left on one of our ports would answer in place of the server under test
    local p busy=""
    for p in $ALL_PORTS; do
        if [[ $p == 18090 && -n "$UPSTREAM_PID" ]]; then continue; fi # our own upstream
        if port_open "$p"; then busy+=" $p"; fi
    done
    if [[ -n "$busy" ]]; then
        log "ports in use:$busy — stop whatever listens there (ss -ltnp) and rerun"
        return 1
    fi
}

# crier's config for a server variant (and workload), node 1 or 2 (ports 1808x / 1848x).
crier_config() { # variant workload dir node
    local variant=$1 w=$2 dir=$3 node=$4 ports=""
    if [[ $node == 2 ]]; then ports='s|127.0.0.1:18080|127.0.0.1:18480|; s|127.0.0.1:18081|127.0.0.1:18481|; s|127.0.0.1:18082|127.0.0.1:18482|;'; fi
    sed -e "s|@RUN@|$dir|g; s|@BUFFER@|$BUFFER|g; s|^worker_threads = .*|worker_threads = $WORKERS|; $ports" \
        "$PEERS/crier.toml"
    case $variant in
    crier-file|crier-file-base) ;; # below: the store line goes into [channels]
    crier-cluster) sed -e "s|@REDIS_PORT@|$REDIS_PORT|g" "$PEERS/crier-cluster.toml" ;;
    crier-rules10) cat "$PEERS/crier-publish-on.toml" ;;
    crier-postrule) cat "$PEERS/crier-publish-on-post.toml" ;;
    crier-poll) sed -e "s|@POLL_INTERVAL@|$POLL_INTERVAL|g" "$PEERS/crier-poll.toml" ;;
    esac
    if [[ $w == ws-publish-* ]]; then cat "$PEERS/crier-wspub.toml"; fi
}

start_crier() { # variant workload node → appends to SERVER_PIDS; fails with START_ERROR
    local variant=$1 w=$2 node=$3 dir=$RUN_DIR/$1 bin=$CRIER_BIN pid public=18080 publish=18081
    if [[ $node == 2 ]]; then dir=$RUN_DIR/$1/node2 public=18480 publish=18481; fi
    if [[ $variant == crier-base || $variant == crier-file-base || $variant == crier-base-loops ]]; then bin=$CRIER_BASE_BIN; fi
    mkdir -p "$dir"
    crier_config "$variant" "$w" "$dir" "$node" >"$dir/crier.toml"
    if [[ $variant == crier-file || $variant == crier-file-base ]]; then
        sed -i "/^\[channels\]/a store = \"$dir/channels.redb\"" "$dir/crier.toml"
    fi
    if [[ $variant == crier-loops || $variant == crier-base-loops ]]; then # one event loop per worker thread
        sed -i "/^\[server\]/a event_loops = $WORKERS" "$dir/crier.toml"
    fi
    local logged
    logged=$(stat -c %s "$dir/crier.log" 2>/dev/null || echo 0)
    "$bin" --config "$dir/crier.toml" >>"$dir/crier.log" 2>&1 &
    pid=$!
    SERVER_PIDS+=("$pid")
    if [[ $node == 1 ]]; then CRIER_CMD=("$bin" --config "$dir/crier.toml"); fi
    if ! wait_port $public 10 "$pid" || ! wait_port $publish 10 "$pid"; then
        # The line that says why (crier names the file, line and key), from this start's output.
        START_ERROR="$variant node $node did not start: $(tail -c +$((logged + 1)) "$dir/crier.log" |
            sed 's/\x1b\[[0-9;]*m//g' | grep -v -e '^\s*$' -e 'not starting' | tail -1 | sed "s|$dir/||" | cut -c1-300)"
        return 1
    fi
}

start_redis() { # dir
    mkdir -p "$1/redis"
    redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no --dir "$1/redis" \
        >>"$1/redis.log" 2>&1 &
    SERVER_PIDS+=("$!")
    wait_port $REDIS_PORT 10 "$!" || { START_ERROR="redis-server did not start (see $1/redis.log)"; return 1; }
}

wait_ready() { # url seconds [accept]: until the URL answers 2xx 10 times in a row (a cluster node
    # takes subscribers only once its Redis connections are up; Nchan answers 503 until then)
    local url=$1 i ok=0 code
    for ((i = 0; i < $2 * 20; i++)); do
        code=$(curl -s -o /dev/null -m 0.3 -w '%{http_code}' ${3:+-H "Accept: $3"} "$url" || true)
        if [[ $code == 2* ]]; then ((++ok >= 10)) && return 0; else ok=0; sleep 0.05; fi
    done
    log "  $url did not answer 2xx (last: $code); going on"
}

start_nchan_redis_node() { # dir node public publish
    local dir=$1/node$2
    mkdir -p "$dir"
    sed -e "s|@RUN@|$dir|g; s|@BUFFER@|$BUFFER|g; s|@WORKERS@|$WORKERS|g; s|@PUBLIC@|$3|g; s|@PUBLISH@|$4|g; s|@REDIS_PORT@|$REDIS_PORT|g" \
        "$PEERS/nchan-redis.conf" >"$dir/nginx.conf"
    "$NGINX" -p "$dir/" -c "$dir/nginx.conf" || { START_ERROR="nginx (Nchan, Redis) node $2 did not start"; return 1; }
    wait_port "$3" && wait_port "$4" || { START_ERROR="Nchan node $2: ports $3/$4 did not open"; return 1; }
    SERVER_PIDS+=("$(cat "$dir/nginx.pid")")
}

start_server() { # name [workload]: fails (START_ERROR says why) when the server did not come up
    local name=$1 w=${2:-} dir=$RUN_DIR/$1
    mkdir -p "$dir"
    ports_free || exit 1
    SERVER_PIDS=() EXTRA_PIDS=() START_ERROR=""
    case $name in
    crier | crier-base | crier-loops | crier-base-loops | crier-file | crier-file-base | crier-rules10 | crier-postrule | crier-poll)
        start_crier "$name" "$w" 1 || return 1
        ;;
    crier-cluster)
        start_redis "$dir" || return 1
        start_crier crier-cluster "$w" 1 || return 1
        start_crier crier-cluster "$w" 2 || return 1
        wait_ready http://127.0.0.1:18082/readyz 10
        wait_ready http://127.0.0.1:18482/readyz 10
        ;;
    nchan)
        sed -e "s|@RUN@|$dir|g; s|@BUFFER@|$BUFFER|g; s|@WORKERS@|$WORKERS|g" \
            "$PEERS/nchan.conf" >"$dir/nginx.conf"
        "$NGINX" -p "$dir/" -c "$dir/nginx.conf" || { START_ERROR="nginx (Nchan) did not start"; return 1; }
        wait_port 18180 && wait_port 18181 || { START_ERROR="Nchan ports did not open"; return 1; }
        SERVER_PIDS+=("$(cat "$dir/nginx.pid")")
        ;;
    nchan-redis)
        start_redis "$dir" || return 1
        start_nchan_redis_node "$dir" 1 18180 18181 || return 1
        start_nchan_redis_node "$dir" 2 18580 18581 || return 1
        wait_ready http://127.0.0.1:18180/live/bench-ready 10 text/event-stream
        wait_ready http://127.0.0.1:18580/live/bench-ready 10 text/event-stream
        ;;
    pushpin | pushpin-tuned)
        local rate=2500 hwm=25000
        if [[ $name == pushpin-tuned ]]; then rate=0 hwm=0; fi
        sed -e "s|@RUN@|$dir|g; s|@PEERS@|$PEERS|g; s|@MESSAGE_RATE@|$rate|; s|@MESSAGE_HWM@|$hwm|" \
            "$PEERS/pushpin.conf" >"$dir/pushpin.conf"
        "$LOADGEN_BIN" grip --listen 127.0.0.1:18290 >>"$dir/grip.log" 2>&1 &
        EXTRA_PIDS+=("$!")
        pushpin --config "$dir/pushpin.conf" >>"$dir/pushpin.log" 2>&1 &
        SERVER_PIDS+=("$!")
        wait_port 18290 && wait_port 18280 20 && wait_port 18281 20 || { START_ERROR="Pushpin did not start"; return 1; }
        sleep 1 # the handler's and proxy's internal sockets connect after the listeners open
        ;;
    nginx-proxy)
        sed -e "s|@RUN@|$dir|g; s|@WORKERS@|$WORKERS|g" "$PEERS/nginx-proxy.conf" >"$dir/nginx.conf"
        "$NGINX" -p "$dir/" -c "$dir/nginx.conf" || { START_ERROR="nginx did not start"; return 1; }
        wait_port 18380 || { START_ERROR="nginx port did not open"; return 1; }
        SERVER_PIDS+=("$(cat "$dir/nginx.pid")")
        ;;
    *)
        echo "unknown server $name" >&2
        exit 1
        ;;
    esac
}

stop_server() {
    local p
    for p in "${SERVER_PIDS[@]}" "${EXTRA_PIDS[@]}"; do stop_tree "$p"; done
    SERVER_PIDS=() EXTRA_PIDS=()
    for p in $ALL_PORTS; do [[ $p == 18090 ]] || wait_port_closed "$p" || true; done
}

pid_args() { local p; for p in "${SERVER_PIDS[@]}"; do printf -- '--server-pid\n%s\n' "$p"; done; }

skipped() { # server workload rep: records a run that could not happen, and why
    log "  not run: $START_ERROR"
    jq -nc --arg s "$1" --arg w "$2" --arg r "$3" --arg why "$START_ERROR" \
        '{kind:"skipped", tags:{server:$s, workload:$w, rep:$r}, reason:$why}' >>"$RESULTS"
}

start_app() { # loadgen | nginx: the app behind the proxies, on 18090
    local dir=$RUN_DIR/app-$1
    mkdir -p "$dir"
    case $1 in
    loadgen)
        "$LOADGEN_BIN" upstream --listen 127.0.0.1:18090 >>"$RUN_DIR/upstream.log" 2>&1 &
        UPSTREAM_PID=$!
        ;;
    nginx)
        sed -e "s|@RUN@|$dir|g" "$PEERS/nginx-app.conf" >"$dir/nginx.conf"
        "$NGINX" -p "$dir/" -c "$dir/nginx.conf"
        wait_port 18090
        UPSTREAM_PID=$(cat "$dir/nginx.pid")
        ;;
    *)
        echo "PROXY_APP must be loadgen or nginx" >&2
        exit 1
        ;;
    esac
    wait_port 18090
}

stop_app() {
    if [[ -n "$UPSTREAM_PID" ]]; then stop_tree "$UPSTREAM_PID"; fi
    UPSTREAM_PID=""
    wait_port_closed 18090 || true
}

cleanup() {
    stop_server
    stop_app
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- workloads --------------------------------------------------------------------------------
urls() { # server workload → SUB_URLS PUB_URLS (arrays) PUB_FORMAT
    local s=$1 w=$2 live=/live
    PUB_FORMAT=raw
    case $s in
    crier*)
        if [[ $w == ws-publish-* ]]; then live=/room; fi
        SUB_URLS=("http://127.0.0.1:18080$live/{channel}") PUB_URLS=('http://127.0.0.1:18081/pub/{channel}')
        if [[ $s == crier-cluster ]]; then
            SUB_URLS+=("http://127.0.0.1:18480$live/{channel}") PUB_URLS+=('http://127.0.0.1:18481/pub/{channel}')
        fi
        ;;
    nchan*)
        if [[ $w == mux ]]; then live=/mux; fi
        if [[ $w == ws-publish-* ]]; then live=/room; fi
        SUB_URLS=("http://127.0.0.1:18180$live/{channel}") PUB_URLS=('http://127.0.0.1:18181/pub/{channel}')
        if [[ $s == nchan-redis ]]; then
            SUB_URLS+=("http://127.0.0.1:18580$live/{channel}") PUB_URLS+=('http://127.0.0.1:18581/pub/{channel}')
        fi
        ;;
    pushpin*) SUB_URLS=('http://127.0.0.1:18280/live/{channel}') PUB_URLS=('http://127.0.0.1:18281/publish/') PUB_FORMAT=pushpin ;;
    esac
    if [[ $w == ws-publish-* ]]; then PUB_URLS=("${SUB_URLS[0]}"); fi # frames to the public location
}

workload_args() { # workload → generator arguments
    case $1 in
    fanout-sse-rate) echo "--transport sse --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate $RATE" ;;
    fanout-sse-max | cluster-fanout) echo "--transport sse --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate 0" ;;
    fanout-ws-rate) echo "--transport ws --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate $RATE" ;;
    fanout-ws-max) echo "--transport ws --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate 0" ;;
    channels) echo "--transport sse --subscribers $CHANNEL_SUBS --channels $CHANNEL_SUBS --messages $CHANNEL_PUBS --size $SIZE --rate 0" ;;
    capacity-sse) echo "--transport sse --subscribers $CAP_SUBS --channels 1 --messages 0 --settle 3" ;;
    capacity-ws) echo "--transport ws --subscribers $CAP_SUBS --channels 1 --messages 0 --settle 3" ;;
    pubrate-tcp | pubrate-unix) echo "--transport sse --subscribers 1 --channels 1 --messages $PUBRATE_MSGS --size $SIZE --rate 0 --pub-conns $PUBRATE_CONNS" ;;
    cluster-pubrate) echo "--transport sse --subscribers 1 --channels 1 --messages $PUBRATE_MSGS --size $SIZE --rate 0 --pub-conns $CLUSTER_PUB_CONNS" ;;
    store-pubrate-1) echo "--transport sse --subscribers 1 --channels 1 --messages $PUBRATE_MSGS --size $SIZE --rate 0 --pub-conns 1" ;;
    store-pubrate-32) echo "--transport sse --subscribers 1 --channels 1 --messages $PUBRATE_MSGS --size $SIZE --rate 0 --pub-conns 32" ;;
    store-fill) echo "--transport sse --subscribers 0 --channels $STORE_CHANNELS --messages $((STORE_CHANNELS * STORE_MSGS)) --size $SIZE --rate 0 --pub-conns $STORE_PUB_CONNS --channel-prefix rs" ;;
    mux) echo "--transport sse --subscribers $MUX_SUBS --channels $MUX_CHANNELS --channels-per-sub $MUX_PER_SUB --messages $MUX_PUBS --size $SIZE --rate 0" ;;
    mux-single) echo "--transport sse --subscribers $MUX_SUBS --channels $MUX_CHANNELS --messages $MUX_PUBS --size $SIZE --rate 0" ;;
    # As many single-channel subscribers per channel as `mux` has multiplexed ones (MUX_SUBS ×
    # MUX_PER_SUB / MUX_CHANNELS): the same deliveries per publish, so the cost of a publish to
    # a channel with N multiplexed subscribers is compared with N single-channel ones.
    mux-single-fanout) echo "--transport sse --subscribers $MUX_SUBS --channels $((MUX_CHANNELS / MUX_PER_SUB)) --messages $MUX_PUBS --size $SIZE --rate 0" ;;
    ws-publish-rate) echo "--transport sse --subscribers 1 --channels 1 --messages $WSPUB_MSGS --size $SIZE --rate 0 --pub-ws" ;;
    ws-publish-fanout) echo "--transport sse --subscribers $WSPUB_SUBS --channels 1 --messages $MSGS --size $SIZE --rate $RATE --pub-ws" ;;
    poll-upstream) echo "--transport sse --subscribers $POLL_SUBS --channels 1 --channel-prefix scoreboard --messages 0 --settle $POLL_SECONDS --upstream-count http://127.0.0.1:18090/__count" ;;
    *) echo "unknown workload $1" >&2; exit 1 ;;
    esac
}

servers_for() { # workload → the servers it runs on, from SERVERS (or its own list)
    local s out=""
    case $1 in
    cluster-*) echo "$CLUSTER_SERVERS"; return ;;
    store-*) echo "$STORE_SERVERS"; return ;;
    slow-reader* | mux* | ws-publish-*)
        # Pushpin has no slow-reader resume, multiplexing or client publishing to compare.
        for s in $SERVERS; do [[ $s == pushpin* ]] || out+="$s "; done
        echo "$out"
        ;;
    *) echo "$SERVERS" ;;
    esac
}

say_push() { # one line of what happened, for the person watching
    jq -r '"  connected \(.subs.connected)/\(.subscribers), deliveries/s \(.delivery.per_s), p99 \(.delivery.latency_ms.p99) ms, lost \(.delivery.lost_total), pubs/s \(.publish.rate_per_s // "-"), RSS/sub \(.server.rss_per_sub_kib) KiB\(if .upstream then ", upstream/s \(.upstream.per_s)" else "" end)"' \
        "$RUN_DIR/last.json" >&2 2>/dev/null || true
}

gen_push() { # server workload rep [extra generator args...]: the generator against a running server
    local server=$1 w=$2 rep=$3 ramp=$RAMP_RATE u args=()
    shift 3
    urls "$server" "$w"
    if [[ $server == pushpin* ]]; then ramp=$PUSHPIN_RAMP_RATE; fi
    for u in "${SUB_URLS[@]}"; do args+=(--sub-url "$u"); done
    for u in "${PUB_URLS[@]}"; do args+=(--pub-url "$u"); done
    # shellcheck disable=SC2046
    if ! timeout $((MAX_SECONDS + 60)) "$LOADGEN_BIN" push --threads "$GEN_THREADS" \
        "${args[@]}" --pub-format "$PUB_FORMAT" "$@" \
        $(workload_args "$w") --ramp-rate "$ramp" --drain-max "$DRAIN_MAX" \
        --max-seconds "$MAX_SECONDS" $(pid_args) \
        --tag server="$server" --tag workload="$w" --tag rep="$rep" \
        --out "$RESULTS" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
        log "  generator failed (see $RUN_DIR/loadgen.log)"
        return 1
    fi
    say_push
}

run_push() { # server workload rep
    local server=$1 w=$2 rep=$3 extra=()
    # Idle capacity does not depend on the handler's message limits: measure Pushpin once.
    if [[ $server == pushpin-tuned && $w == capacity-* && " $SERVERS " == *" pushpin "* ]]; then return 0; fi
    if [[ $w == pubrate-unix ]]; then
        [[ $server == crier || $server == crier-base ]] || return 0 # only crier has a Unix publish socket
        extra=(--pub-unix "$RUN_DIR/$server/crier-publish.sock")
    fi
    log "$w / $server / rep $rep"
    if ! start_server "$server" "$w"; then
        skipped "$server" "$w" "$rep"
        stop_server
        return 0
    fi
    gen_push "$server" "$w" "$rep" "${extra[@]}" || true
    stop_server
}

run_slow() { # server workload rep: the slow reader (issue 19)
    local server=$1 w=$2 rep=$3 pace=()
    urls "$server" "$w"
    if [[ $w == slow-reader-throttled ]]; then pace=(--read-bytes-per-sec "$SLOW_READ_BPS"); fi
    log "$w / $server / rep $rep"
    if ! start_server "$server" "$w"; then
        skipped "$server" "$w" "$rep"
        stop_server
        return 0
    fi
    # shellcheck disable=SC2046
    if ! timeout $((MAX_SECONDS + 60)) "$LOADGEN_BIN" slow-reader --sub-url "${SUB_URLS[0]}" \
        --pub-url "${PUB_URLS[0]}" --messages "$SLOW_MSGS" --size "$SIZE" --pub-conns "$SLOW_CONNS" \
        "${pace[@]}" --drain-max "$DRAIN_MAX" --max-seconds "$MAX_SECONDS" $(pid_args) \
        --tag server="$server" --tag workload="$w" --tag rep="$rep" \
        --out "$RESULTS" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
        log "  generator failed (see $RUN_DIR/loadgen.log)"
    else
        jq -r '"  published \(.publish.ok) at \(.publish.rate_per_s)/s; received \(.reader.received), lost \(.reader.lost) (told \(.reader.lost_told), silent \(.reader.lost_silent)), dups \(.reader.duplicates), out of order \(.reader.out_of_order), reconnects \(.reader.reconnects), gap notices \(.reader.gap_events), gap resumes \(.reader.gap_headers)"' \
            "$RUN_DIR/last.json" >&2 || true
    fi
    stop_server
}

run_restart() { # server rep: fill the buffers, restart, time the listener and a resume (issue 16)
    local server=$1 rep=$2 dir=$RUN_DIR/$1
    log "store-restart / $server / rep $rep"
    if ! start_server "$server" store-restart; then
        skipped "$server" store-fill "$rep"
        skipped "$server" store-restart "$rep"
        stop_server
        return 0
    fi
    gen_push "$server" store-fill "$rep" || true
    stop_server # SIGTERM: a clean shutdown
    ports_free || exit 1
    if ! "$LOADGEN_BIN" startup --listen 127.0.0.1:18080 \
        --resume-url 'http://127.0.0.1:18080/live/rs0?last_event_id=earliest' \
        --file "$dir/channels.redb" --log "$dir/crier.log" --pid-file "$dir/restart.pid" \
        --tag server="$server" --tag workload=store-restart --tag rep="$rep" \
        --out "$RESULTS" -- "${CRIER_CMD[@]}" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
        log "  restart measurement failed (see $RUN_DIR/loadgen.log)"
    else
        jq -r '"  listener \(.startup.listen_ms) ms, resume head \(.startup.resume_head_ms) ms (Crier-Resume: \(.startup.crier_resume)), first event \(.startup.first_event_ms) ms, file \(.file_mib) MiB"' \
            "$RUN_DIR/last.json" >&2 || true
    fi
    if [[ -s "$dir/restart.pid" ]]; then SERVER_PIDS=("$(cat "$dir/restart.pid")"); fi
    stop_server
}

wrk_once() { # target port rep round workload app [path] [script]: one measured wrk run
    local target=$1 port=$2 rep=$3 round=$4 w=$5 app=$6 path=${7:-/} script=${8:-} sargs=()
    if [[ -n "$script" ]]; then sargs=(--script "$script"); fi
    # A short warm-up so pools and workers are up, then the measured run.
    wrk -t1 -c"$WRK_CONNS" -d1s ${script:+-s "$script"} "http://127.0.0.1:$port$path" >/dev/null 2>&1 || true
    # shellcheck disable=SC2046
    if ! "$LOADGEN_BIN" proxy --url "http://127.0.0.1:$port$path" --threads "$WRK_THREADS" \
        --conns "$WRK_CONNS" --duration "$WRK_DURATION" "${sargs[@]}" $(pid_args) \
        --tag server="$target" --tag workload="$w" --tag rep="$rep" --tag round="$round" --tag app="$app" \
        --out "$RESULTS" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
        log "  wrk failed (see $RUN_DIR/loadgen.log)"
    else
        jq -r '"  \(.wrk.rps) req/s, p99 \(.wrk.p99_ms) ms, errors \(.wrk.errors)"' "$RUN_DIR/last.json" >&2 || true
    fi
}

run_wrk_workload() { # workload rep: proxies in alternating rounds in front of one app
    local w=$1 rep=$2 app=nginx targets rounds=$ROUNDS path=/ script="" t r port
    local base="" loops=""
    if [[ " $SERVERS " == *" crier-base "* ]]; then base=crier-base; fi
    if [[ " $SERVERS " == *" crier-loops "* ]]; then loops=crier-loops; fi
    case $w in
    proxy) app=$PROXY_APP targets="direct $base crier $loops nginx" rounds=1 ;;
    proxy-nginxapp) targets="direct $base crier $loops nginx" ;;
    publish-on-get) targets="crier crier-rules10" ;;
    publish-on-post) targets="crier crier-postrule" path=/api/orders/42 script=$PEERS/wrk-post.lua ;;
    esac
    start_app "$app"
    for ((r = 1; r <= rounds; r++)); do
        for t in $targets; do
            if [[ $t != direct || $r == 1 ]]; then log "$w / $t / rep $rep round $r"; fi
            case $t in
            direct)
                ((r == 1)) || continue # the app alone, once per repetition
                SERVER_PIDS=("$UPSTREAM_PID")
                wrk_once direct 18090 "$rep" "$r" "$w" "$app" "$path" "$script"
                SERVER_PIDS=()
                continue
                ;;
            nginx) start_server nginx-proxy "$w" || { skipped nginx "$w" "$rep"; stop_server; continue; }; port=18380 ;;
            *) start_server "$t" "$w" || { skipped "$t" "$w" "$rep"; stop_server; continue; }; port=18080 ;;
            esac
            wrk_once "$t" "$port" "$rep" "$r" "$w" "$app" "$path" "$script"
            stop_server
        done
    done
    stop_app
}

run_poll() { # rep: upstream requests/s, [[poll]] channel vs browsers polling through crier (issue 22)
    local rep=$1
    start_app loadgen
    log "poll-upstream / crier-poll / rep $rep"
    if start_server crier-poll poll-upstream; then
        gen_push crier-poll poll-upstream "$rep" || true
    else
        skipped crier-poll poll-upstream "$rep"
    fi
    stop_server
    log "poll-upstream / crier (browsers) / rep $rep"
    if start_server crier poll-upstream; then
        # shellcheck disable=SC2046
        if ! timeout $((MAX_SECONDS + 60)) "$LOADGEN_BIN" browsers --threads "$GEN_THREADS" \
            --url http://127.0.0.1:18080/api/scoreboard --clients "$POLL_SUBS" \
            --interval "$POLL_INTERVAL" --duration "$POLL_SECONDS" --ramp-rate "$RAMP_RATE" \
            --upstream-count http://127.0.0.1:18090/__count $(pid_args) \
            --tag server=crier --tag workload=poll-upstream --tag rep="$rep" \
            --out "$RESULTS" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
            log "  generator failed (see $RUN_DIR/loadgen.log)"
        else
            jq -r '"  \(.subs.connected) browsers, \(.requests.per_s) req/s through crier, upstream \(.upstream.per_s)/s, p99 \(.requests.latency_ms.p99) ms, errors \(.requests.errors)"' "$RUN_DIR/last.json" >&2 || true
        fi
    else
        skipped crier poll-upstream "$rep"
    fi
    stop_server
    stop_app
}

ports_free || exit 1
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "load average at start: $LOAD_START"

for ((rep = 1; rep <= REPS; rep++)); do
    for w in $WORKLOADS; do
        case $w in
        proxy | proxy-nginxapp | publish-on-get | publish-on-post) run_wrk_workload "$w" "$rep" ;;
        poll-upstream) run_poll "$rep" ;;
        store-restart) for s in $STORE_SERVERS; do run_restart "$s" "$rep"; done ;;
        slow-reader | slow-reader-throttled) for s in $(servers_for "$w"); do run_slow "$s" "$w" "$rep"; done ;;
        *)
            workload_args "$w" >/dev/null # unknown names stop the run here
            # Servers interleaved within each repetition, so a change in background load hits all.
            for s in $(servers_for "$w"); do run_push "$s" "$w" "$rep"; done
            ;;
        esac
    done
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at end: $LOAD_END"

describe_crier() { "$1" --version 2>/dev/null | head -1 || echo '?'; }
versions="$(describe_crier "$CRIER_BIN") ($CRIER_BIN; tree $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'))"
if [[ -n "${CRIER_BASE_BIN:-}" ]]; then
    versions+="; crier-base: $(describe_crier "$CRIER_BASE_BIN") ($CRIER_BASE_BIN$( [[ -f $CRIER_BASE_BIN.rev ]] && echo "; $(cat "$CRIER_BASE_BIN.rev")" || true))"
fi
versions+="; $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null); pushpin $(dpkg-query -W -f='${Version}' pushpin 2>/dev/null || echo -); redis $(redis-server --version 2>/dev/null | grep -o 'v=[0-9.]*' || echo -); $( (wrk -v 2>&1 || true) | head -1 | cut -d' ' -f1-2)"
jq -n \
    --arg date "$START_TS" \
    --arg cores "$(nproc)" \
    --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    --arg memory "$(free -g | awk '/^Mem:/{print $2" GiB"}')" \
    --arg kernel "$(uname -r)" \
    --arg load_start "$LOAD_START" \
    --arg load_end "$LOAD_END" \
    --arg uptime "$(uptime)" \
    --arg command "$COMMAND" \
    --arg sizes "REPS=$REPS SUBS=$SUBS MSGS=$MSGS SIZE=$SIZE RATE=$RATE CHANNEL_SUBS=$CHANNEL_SUBS CHANNEL_PUBS=$CHANNEL_PUBS CAP_SUBS=$CAP_SUBS PUBRATE_MSGS=$PUBRATE_MSGS PUBRATE_CONNS=$PUBRATE_CONNS WRK=-t$WRK_THREADS/-c$WRK_CONNS/${WRK_DURATION}s ROUNDS=$ROUNDS PROXY_APP=$PROXY_APP RAMP_RATE=$RAMP_RATE PUSHPIN_RAMP_RATE=$PUSHPIN_RAMP_RATE BUFFER=$BUFFER WORKERS=$WORKERS GEN_THREADS=$GEN_THREADS SLOW_MSGS=$SLOW_MSGS SLOW_CONNS=$SLOW_CONNS SLOW_READ_BPS=$SLOW_READ_BPS MUX=$MUX_SUBS×$MUX_PER_SUB/$MUX_CHANNELS,$MUX_PUBS CLUSTER_PUB_CONNS=$CLUSTER_PUB_CONNS STORE=$STORE_CHANNELS×$STORE_MSGS WSPUB_MSGS=$WSPUB_MSGS WSPUB_SUBS=$WSPUB_SUBS POLL=$POLL_SUBS/${POLL_INTERVAL}s/${POLL_SECONDS}s" \
    --arg versions "$versions" \
    --arg note "The generator, wrk and the servers share this machine's $(nproc) cores; other work on the machine (load average above) makes a run noisy. Compare ratios within one run; rerun on a quiet machine before quoting absolute figures." \
    '{date:$date, cores:$cores, cpu:$cpu, memory:$memory, kernel:$kernel, load_start:$load_start,
      load_end:$load_end, uptime:$uptime, command:$command, sizes:$sizes, versions:$versions, note:$note,
      notes: [
        "crier: worker_threads = WORKERS; nginx (Nchan and the plain proxy): worker_processes = WORKERS, listen ... reuseport (one accept queue per worker, so both workers share the connections). Pushpin runs as packaged (condure, zurl, pushpin-proxy, pushpin-handler).",
        "Memory and CPU are summed over every process of a server (nginx master + workers; Pushpin runner + condure + zurl + pushpin-proxy + pushpin-handler; both nodes and redis-server for crier-cluster and nchan-redis). RSS counts shared pages once per process; PSS splits them and is the fairer total for multi-process servers. Pushpin figures exclude its GRIP backend (crier-loadgen grip), which stands for the application.",
        "pushpin = Pushpin as packaged (handler message_rate=2500/s, message_hwm=25000: most of a 10,000-subscriber fan-out is dropped by design); pushpin-tuned = both set to 0. Pushpin runs with log_level=1 (no per-request log lines, like nginx with access_log off). Idle capacity does not depend on those two settings and is measured once, as packaged. Pushpin subscribers ramp at PUSHPIN_RAMP_RATE: at 2,000/s it answered part of the ramp with 500/502.",
        "Buffer: crier buffer_messages and Nchan nchan_message_buffer_length = BUFFER, 10 minutes. A subscriber that falls more than BUFFER messages behind loses messages (crier disconnects it and counts it; Nchan skips silently).",
        "Latency is publish request sent → message parsed by the subscriber (wall clock on one machine); deliveries/s = deliveries / (first publish sent → last delivery). Lost = messages published with a 2xx answer that a connected subscriber had not received DRAIN_MAX s after the last publish (so a very slow server shows as loss), per (subscriber, channel) for multiplexed subscribers; duplicates are counted per subscriber.",
        "Pushpin publishing (POST /publish/) answers before delivery; crier and Nchan answer after the message is stored.",
        "Subscribers connect from 127.0.0.2.. (one source address per 5,000) at RAMP_RATE connections/s; capacity runs hold CAP_SUBS idle subscribers in one generator process (the per-process limit here is 20,000 open files).",
        "crier-base is a second crier build (CRIER_BASE_BIN) run with exactly the configs of crier, interleaved with it: crier/crier-base is the before/after ratio of issue 15.",
        "Slow reader (issue 19): lost = published − received; lost, told = lost messages inside a gap the reader was told of (an SSE event: crier.gap, or a resume answered Crier-Resume: gap), between the last message before the signal and the first after it; lost silently = the rest. Nchan has no gap signal: all its losses are silent.",
        "Wrk workloads with rounds (proxy-nginxapp, publish-on-*): each repetition runs ROUNDS rounds alternating between the proxies (a fresh process per round); medians are over all rounds. The app is nginx return 200 with 1 worker (PROXY_APP=nginx), or crier-loadgen upstream (1 thread).",
        "Servers for features crier does not have yet (crier-cluster, crier-file, crier-rules10, crier-postrule, crier-poll, the ws-publish location) are configured by the issues contracts; a build without the feature refuses the config at start-up, and the run lists it under Not run."
      ]}' >"$RUN_DIR/meta.json"

"$LOADGEN_BIN" report --input "$RESULTS" --meta "$RUN_DIR/meta.json" \
    --md "$OUT/RESULTS$SUFFIX.md" --json "$OUT/results$SUFFIX.json"
log "done: $OUT/RESULTS$SUFFIX.md"
