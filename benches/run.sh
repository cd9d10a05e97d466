#!/usr/bin/env bash
# benches/run.sh — the whole benchmark in one command (see benches/README.md).
#
# Starts crier, Nchan and Pushpin in turn on loopback, runs the workloads of issue 5 against
# each (fan-out SSE/WebSocket at a set rate and as fast as possible, many channels, idle
# capacity, publish rate over TCP and crier's Unix socket), then the proxy pass-through with wrk
# (direct vs crier vs nginx), each REPS times, and writes benches/RESULTS.md and
# benches/results.json (SMOKE=1: RESULTS-smoke.md, results-smoke.json).
#
#   benches/run.sh                 # full run (~30-40 min on 2 cores)
#   SMOKE=1 benches/run.sh         # 500 subscribers, 1 repetition: a few minutes
#   SERVERS="crier nchan" WORKLOADS="fanout-sse-max capacity-sse" REPS=1 benches/run.sh
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
      OUT RUN_DIR CRIER_BIN LOADGEN_BIN INSTALL MAX_SECONDS DRAIN_MAX)
COMMAND=""
for v in "${VARS[@]}"; do
    if [[ -n "${!v+x}" ]]; then COMMAND+="$v=${!v@Q} "; fi
done
COMMAND+="benches/run.sh${*:+ $*}"

if [[ "${SMOKE:-0}" == 1 ]]; then
    : "${REPS:=1}" "${SUBS:=500}" "${MSGS:=50}" "${CHANNEL_SUBS:=500}" "${CHANNEL_PUBS:=1000}"
    : "${CAP_SUBS:=1000}" "${PUBRATE_MSGS:=2000}" "${WRK_DURATION:=3}" "${DRAIN_MAX:=10}"
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
SERVERS=${SERVERS:-crier nchan pushpin pushpin-tuned}
WORKLOADS=${WORKLOADS:-fanout-sse-rate fanout-sse-max fanout-ws-rate fanout-ws-max channels capacity-sse capacity-ws pubrate-tcp pubrate-unix proxy}
OUT=${OUT:-$HERE}
RUN_DIR=${RUN_DIR:-/tmp/crier-bench.$$}
INSTALL=${INSTALL:-1}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --- dependencies -----------------------------------------------------------------------------
need_pkgs=()
[[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx-light)
[[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]] || need_pkgs+=(libnginx-mod-nchan)
command -v pushpin >/dev/null || need_pkgs+=(pushpin)
command -v wrk >/dev/null || need_pkgs+=(wrk)
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

# --- process helpers (every process is ended by its own pid) ------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port [seconds]
    local i
    for ((i = 0; i < ${2:-10} * 20; i++)); do
        port_open "$1" && return 0
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

SERVER_PID=""
EXTRA_PID=""
UPSTREAM_PID=""
ALL_PORTS="18080 18081 18082 18090 18180 18181 18280 18281 18282 18283 18284 18290 18380"

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

start_server() { # name
    local name=$1 dir=$RUN_DIR/$1
    mkdir -p "$dir"
    ports_free || exit 1
    case $name in
    crier)
        sed -e "s|@RUN@|$dir|g; s|@BUFFER@|$BUFFER|g; s|^worker_threads = .*|worker_threads = $WORKERS|" \
            "$PEERS/crier.toml" >"$dir/crier.toml"
        "$CRIER_BIN" --config "$dir/crier.toml" >>"$dir/crier.log" 2>&1 &
        SERVER_PID=$!
        wait_port 18080 && wait_port 18081
        ;;
    nchan)
        sed -e "s|@RUN@|$dir|g; s|@BUFFER@|$BUFFER|g; s|@WORKERS@|$WORKERS|g" \
            "$PEERS/nchan.conf" >"$dir/nginx.conf"
        "$NGINX" -p "$dir/" -c "$dir/nginx.conf"
        wait_port 18180 && wait_port 18181
        SERVER_PID=$(cat "$dir/nginx.pid")
        ;;
    pushpin | pushpin-tuned)
        local rate=2500 hwm=25000
        if [[ $name == pushpin-tuned ]]; then rate=0 hwm=0; fi
        sed -e "s|@RUN@|$dir|g; s|@PEERS@|$PEERS|g; s|@MESSAGE_RATE@|$rate|; s|@MESSAGE_HWM@|$hwm|" \
            "$PEERS/pushpin.conf" >"$dir/pushpin.conf"
        "$LOADGEN_BIN" grip --listen 127.0.0.1:18290 >>"$dir/grip.log" 2>&1 &
        EXTRA_PID=$!
        pushpin --config "$dir/pushpin.conf" >>"$dir/pushpin.log" 2>&1 &
        SERVER_PID=$!
        wait_port 18290 && wait_port 18280 20 && wait_port 18281 20
        sleep 1 # the handler's and proxy's internal sockets connect after the listeners open
        ;;
    nginx-proxy)
        sed -e "s|@RUN@|$dir|g; s|@WORKERS@|$WORKERS|g" "$PEERS/nginx-proxy.conf" >"$dir/nginx.conf"
        "$NGINX" -p "$dir/" -c "$dir/nginx.conf"
        wait_port 18380
        SERVER_PID=$(cat "$dir/nginx.pid")
        ;;
    *)
        echo "unknown server $name" >&2
        return 1
        ;;
    esac
}

stop_server() {
    if [[ -n "$SERVER_PID" ]]; then stop_tree "$SERVER_PID"; fi
    if [[ -n "$EXTRA_PID" ]]; then stop_tree "$EXTRA_PID"; fi
    SERVER_PID="" EXTRA_PID=""
    local p
    for p in $ALL_PORTS; do [[ $p == 18090 ]] || wait_port_closed "$p" || true; done
}

cleanup() {
    stop_server
    if [[ -n "$UPSTREAM_PID" ]]; then stop_tree "$UPSTREAM_PID"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- workloads --------------------------------------------------------------------------------
urls() { # server → SUB_URL PUB_URL PUB_FORMAT
    case $1 in
    crier) SUB_URL='http://127.0.0.1:18080/live/{channel}' PUB_URL='http://127.0.0.1:18081/pub/{channel}' PUB_FORMAT=raw ;;
    nchan) SUB_URL='http://127.0.0.1:18180/live/{channel}' PUB_URL='http://127.0.0.1:18181/pub/{channel}' PUB_FORMAT=raw ;;
    pushpin*) SUB_URL='http://127.0.0.1:18280/live/{channel}' PUB_URL='http://127.0.0.1:18281/publish/' PUB_FORMAT=pushpin ;;
    esac
}

workload_args() { # workload → generator arguments
    case $1 in
    fanout-sse-rate) echo "--transport sse --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate $RATE" ;;
    fanout-sse-max) echo "--transport sse --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate 0" ;;
    fanout-ws-rate) echo "--transport ws --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate $RATE" ;;
    fanout-ws-max) echo "--transport ws --subscribers $SUBS --channels 1 --messages $MSGS --size $SIZE --rate 0" ;;
    channels) echo "--transport sse --subscribers $CHANNEL_SUBS --channels $CHANNEL_SUBS --messages $CHANNEL_PUBS --size $SIZE --rate 0" ;;
    capacity-sse) echo "--transport sse --subscribers $CAP_SUBS --channels 1 --messages 0 --settle 3" ;;
    capacity-ws) echo "--transport ws --subscribers $CAP_SUBS --channels 1 --messages 0 --settle 3" ;;
    pubrate-tcp | pubrate-unix) echo "--transport sse --subscribers 1 --channels 1 --messages $PUBRATE_MSGS --size $SIZE --rate 0 --pub-conns $PUBRATE_CONNS" ;;
    esac
}

run_push() { # server workload rep
    local server=$1 w=$2 rep=$3 extra=() ramp=$RAMP_RATE
    urls "$server"
    if [[ $server == pushpin* ]]; then ramp=$PUSHPIN_RAMP_RATE; fi
    # Idle capacity does not depend on the handler's message limits: measure Pushpin once.
    if [[ $server == pushpin-tuned && $w == capacity-* && " $SERVERS " == *" pushpin "* ]]; then return 0; fi
    if [[ $w == pubrate-unix ]]; then
        [[ $server == crier ]] || return 0 # only crier has a Unix publish socket
        extra=(--pub-unix "$RUN_DIR/crier/crier-publish.sock")
    fi
    log "$w / $server / rep $rep"
    start_server "$server"
    # shellcheck disable=SC2046
    if ! timeout $((MAX_SECONDS + 60)) "$LOADGEN_BIN" push --threads "$GEN_THREADS" \
        --sub-url "$SUB_URL" --pub-url "$PUB_URL" --pub-format "$PUB_FORMAT" "${extra[@]}" \
        $(workload_args "$w") --ramp-rate "$ramp" --drain-max "$DRAIN_MAX" \
        --max-seconds "$MAX_SECONDS" --server-pid "$SERVER_PID" \
        --tag server="$server" --tag workload="$w" --tag rep="$rep" \
        --out "$RESULTS" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
        log "  generator failed (see $RUN_DIR/loadgen.log)"
    else
        # One line of what happened, for the person watching.
        jq -r '"  connected \(.subs.connected)/\(.subscribers), deliveries/s \(.delivery.per_s), p99 \(.delivery.latency_ms.p99) ms, lost \(.delivery.lost_total), pubs/s \(.publish.rate_per_s // "-"), RSS/sub \(.server.rss_per_sub_kib) KiB"' \
            "$RUN_DIR/last.json" >&2 2>/dev/null || true
    fi
    stop_server
}

run_proxy() { # rep
    local rep=$1 target port pid
    for target in direct crier nginx; do
        case $target in
        direct) port=18090 pid=$UPSTREAM_PID ;;
        crier) start_server crier; port=18080 pid=$SERVER_PID ;;
        nginx) start_server nginx-proxy; port=18380 pid=$SERVER_PID ;;
        esac
        log "proxy / $target / rep $rep"
        # A short warm-up so pools and workers are up, then the measured run.
        wrk -t1 -c"$WRK_CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
        if ! "$LOADGEN_BIN" proxy --url "http://127.0.0.1:$port/" --threads "$WRK_THREADS" \
            --conns "$WRK_CONNS" --duration "$WRK_DURATION" --server-pid "$pid" \
            --tag server="$target" --tag workload=proxy --tag rep="$rep" \
            --out "$RESULTS" >"$RUN_DIR/last.json" 2>>"$RUN_DIR/loadgen.log"; then
            log "  wrk failed (see $RUN_DIR/loadgen.log)"
        else
            jq -r '"  \(.wrk.rps) req/s, p99 \(.wrk.p99_ms) ms, errors \(.wrk.errors)"' "$RUN_DIR/last.json" >&2 || true
        fi
        [[ $target == direct ]] || stop_server
    done
}

ports_free || exit 1
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "load average at start: $LOAD_START"

for ((rep = 1; rep <= REPS; rep++)); do
    for w in $WORKLOADS; do
        if [[ $w == proxy ]]; then
            "$LOADGEN_BIN" upstream --listen 127.0.0.1:18090 >>"$RUN_DIR/upstream.log" 2>&1 &
            UPSTREAM_PID=$!
            wait_port 18090
            run_proxy "$rep"
            stop_tree "$UPSTREAM_PID"
            UPSTREAM_PID=""
            continue
        fi
        # Servers interleaved within each repetition, so a change in background load hits all.
        for s in $SERVERS; do run_push "$s" "$w" "$rep"; done
    done
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at end: $LOAD_END"

versions="$("$CRIER_BIN" --version 2>/dev/null | head -1) ($CRIER_BIN; tree $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')); $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null); pushpin $(dpkg-query -W -f='${Version}' pushpin 2>/dev/null); $( (wrk -v 2>&1 || true) | head -1 | cut -d' ' -f1-2)"
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
    --arg sizes "REPS=$REPS SUBS=$SUBS MSGS=$MSGS SIZE=$SIZE RATE=$RATE CHANNEL_SUBS=$CHANNEL_SUBS CHANNEL_PUBS=$CHANNEL_PUBS CAP_SUBS=$CAP_SUBS PUBRATE_MSGS=$PUBRATE_MSGS PUBRATE_CONNS=$PUBRATE_CONNS WRK=-t$WRK_THREADS/-c$WRK_CONNS/${WRK_DURATION}s RAMP_RATE=$RAMP_RATE PUSHPIN_RAMP_RATE=$PUSHPIN_RAMP_RATE BUFFER=$BUFFER WORKERS=$WORKERS GEN_THREADS=$GEN_THREADS" \
    --arg versions "$versions" \
    --arg note "The generator, wrk and the servers share this machine's $(nproc) cores; other work on the machine (load average above) makes a run noisy. Compare ratios within one run; rerun on a quiet machine before quoting absolute figures." \
    '{date:$date, cores:$cores, cpu:$cpu, memory:$memory, kernel:$kernel, load_start:$load_start,
      load_end:$load_end, uptime:$uptime, command:$command, sizes:$sizes, versions:$versions, note:$note,
      notes: [
        "crier: worker_threads = WORKERS; nginx (Nchan and the plain proxy): worker_processes = WORKERS, listen ... reuseport (one accept queue per worker, so both workers share the connections). Pushpin runs as packaged (condure, zurl, pushpin-proxy, pushpin-handler).",
        "Memory and CPU are summed over every process of a server (nginx master + workers; Pushpin runner + condure + zurl + pushpin-proxy + pushpin-handler). RSS counts shared pages once per process; PSS splits them and is the fairer total for multi-process servers. Pushpin figures exclude its GRIP backend (crier-loadgen grip), which stands for the application.",
        "pushpin = Pushpin as packaged (handler message_rate=2500/s, message_hwm=25000: most of a 10,000-subscriber fan-out is dropped by design); pushpin-tuned = both set to 0. Pushpin runs with log_level=1 (no per-request log lines, like nginx with access_log off). Idle capacity does not depend on those two settings and is measured once, as packaged. Pushpin subscribers ramp at PUSHPIN_RAMP_RATE: at 2,000/s it answered part of the ramp with 500/502.",
        "Buffer: crier buffer_messages and Nchan nchan_message_buffer_length = BUFFER, 10 minutes. A subscriber that falls more than BUFFER messages behind loses messages (crier disconnects it and counts it; Nchan skips silently).",
        "Latency is publish request sent → message parsed by the subscriber (wall clock on one machine); deliveries/s = deliveries / (first publish sent → last delivery). Lost = messages published with a 2xx answer that a connected subscriber had not received DRAIN_MAX s after the last publish (so a very slow server shows as loss); duplicates are counted per subscriber.",
        "Pushpin publishing (POST /publish/) answers before delivery; crier and Nchan answer after the message is stored.",
        "Subscribers connect from 127.0.0.2.. (one source address per 5,000) at RAMP_RATE connections/s; capacity runs hold CAP_SUBS idle subscribers in one generator process (the per-process limit here is 20,000 open files)."
      ]}' >"$RUN_DIR/meta.json"

"$LOADGEN_BIN" report --input "$RESULTS" --meta "$RUN_DIR/meta.json" \
    --md "$OUT/RESULTS$SUFFIX.md" --json "$OUT/results$SUFFIX.json"
log "done: $OUT/RESULTS$SUFFIX.md"
