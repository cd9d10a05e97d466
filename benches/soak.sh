#!/usr/bin/env bash
# The soak with faults (issue 18, part 5), full size by default:
#
#   benches/soak.sh                     # 19,000 connections, 2,000 publishes/s over 1,000 channels, 10 min
#   SOAK_SHORT=1 benches/soak.sh        # 1,000 connections, 500/s over 100 channels, 30 s (tests/soak.rs runs this size)
#
# crier (CRIER_BIN, release) runs benches/peers/crier-soak.toml; `crier-loadgen soak` runs the
# app behind it (which resets and stalls on purpose), the subscribers (SSE, crier.json
# WebSocket, long-poll; 10 % slow readers, 1 % reconnecting every second with their last id),
# the publishers, proxied requests, and a SIGHUP every 10 s; then it judges the run (see
# benches/loadgen/soak.rs) and prints one JSON report, also written to $OUT/soak.json.
# Exit status 0 = pass.
set -euo pipefail
cd "$(dirname "$0")/.."

CRIER_BIN=${CRIER_BIN:-target/release/crier}
LOADGEN_BIN=${LOADGEN_BIN:-target/release/crier-loadgen}
OUT=${OUT:-benches/soak}
RUN_DIR=${RUN_DIR:-$(mktemp -d /tmp/crier-soak.XXXXXX)}
mkdir -p "$RUN_DIR"
if [[ ${SOAK_SHORT:-0} == 1 ]]; then
    args=(--size 1000 --conns 1000 --channels 100 --rate 500 --seconds 30 --warmup-frac 0.4 --reload-every 5 --hot-rate 200)
    BUFFER=${BUFFER:-20}
else
    args=(--size 1000 --conns 19000 --channels 1000 --rate 2000 --seconds 600 --warmup-frac 0.2 --reload-every 10)
    BUFFER=${BUFFER:-100}
fi
[[ -x $CRIER_BIN && -x $LOADGEN_BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }
ulimit -n 20000 2>/dev/null || true
mkdir -p "$OUT"
# Ports 19080-19090 by default, so a soak can run beside benches/run.sh or callgrind.sh.
P=${PORT_BASE:-19080}
sed -e "s|@RUN@|$RUN_DIR|g" -e "s|@BUFFER@|$BUFFER|g" -e "s|18080|$P|; s|18081|$((P + 1))|; s|18082|$((P + 2))|; s|18090|$((P + 10))|" \
    benches/peers/crier-soak.toml >"$RUN_DIR/crier.toml"
"$CRIER_BIN" run --config "$RUN_DIR/crier.toml" >"$RUN_DIR/crier.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$((P + 2))/healthz" 2>/dev/null && break
    sleep 0.1
done
echo "soak: crier pid $pid, ${args[*]}, buffer $BUFFER; run directory $RUN_DIR" >&2
status=0
"$LOADGEN_BIN" soak --pid "$pid" "${args[@]}" --threads 2 \
    --sub-url "http://127.0.0.1:$P/live/{channel}" --pub-url "http://127.0.0.1:$((P + 1))/pub/{channel}" \
    --proxy-url "http://127.0.0.1:$P" --upstream-listen "127.0.0.1:$((P + 10))" >"$OUT/soak.json" || status=$?
jq 'del(.server.samples)' "$OUT/soak.json" 2>/dev/null || cat "$OUT/soak.json"
exit $status
