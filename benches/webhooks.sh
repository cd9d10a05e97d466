#!/bin/bash
# Webhook deliveries/s to a fast loopback receiver (crier-loadgen upstream) while SSE
# subscribers are fed. Ad hoc, not part of run.sh; build first:
#   cargo build --release --bin crier --bin crier-loadgen
# Usage: benches/webhooks.sh WEBHOOK(0|1) SUBSCRIBERS MESSAGES [SIDE_MESSAGES]
#   SIDE_MESSAGES: a second publisher sends this many to another channel (no subscribers)
#   7 s in, while the fan-out runs; the webhook gets every message of both channels.
# Prints the loadgen's fan-out figures, the webhook's delivered count over the sampled window
# (its /metrics polled every 50 ms) and the largest queue depth seen.
#
# A receiver far away (issue 19: "≥ 500 events/s to a receiver 50 ms away"):
#   RX_DELAY_MS=50 CHANNELS=64 benches/webhooks.sh 1 0 10000
# The receiver waits RX_DELAY_MS before each answer; the MESSAGES are published round-robin
# over CHANNELS channels; MAX_IN_FLIGHT sets the webhook's max_in_flight (default: crier's).
# One channel has one request in flight at a time, so the ceiling is
# min(CHANNELS, max_in_flight) / RX_DELAY_MS.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WH=$1; SUBS=$2; MSGS=$3; SIDE=${4:-0}
RX_DELAY_MS=${RX_DELAY_MS:-0}; CHANNELS=${CHANNELS:-1}; MAX_IN_FLIGHT=${MAX_IN_FLIGHT:-}
D=${RUN_DIR:-$(mktemp -d /tmp/crier-webhooks.XXXX)}; cd "$D"
ulimit -n 65536
port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
P=$(port); PP=$(port); AP=$(port); RP=$(port); UP=$(port)
LG=${LOADGEN_BIN:-$ROOT/target/release/crier-loadgen}
CRIER=${CRIER_BIN:-$ROOT/target/release/crier}
echo "whsec_$(openssl rand -base64 32)" > wh.secret
HOOK=""
if [ "$WH" = 1 ]; then HOOK="[[webhook]]
name = \"bench\"
url = \"http://127.0.0.1:$RP/hook\"
secret_file = \"wh.secret\"
max_queue = 1000000
${MAX_IN_FLIGHT:+max_in_flight = $MAX_IN_FLIGHT}"; fi
cat > crier.toml <<EOT
[server]
listen = ["127.0.0.1:$P"]
worker_threads = 2
[upstream]
url = "http://127.0.0.1:$UP"
[publish]
unix = "$D/pub.sock"
listen = ["127.0.0.1:$PP"]
[channels]
buffer_messages = 2000
[[push]]
path = "/live/{channel}"
[admin]
listen = "127.0.0.1:$AP"
$HOOK
EOT
$LG upstream --listen 127.0.0.1:$RP --threads 1 --delay-ms $RX_DELAY_MS & RX=$!
CRIER_LOG=warn $CRIER --config crier.toml 2>crier.log & CP=$!
sleep 1
# Sample the delivered counter every 50 ms.
( while kill -0 $CP 2>/dev/null; do
    m=$(curl -s http://127.0.0.1:$AP/metrics)
    v=$(echo "$m" | grep '^crier_webhook_deliveries_total{outcome="delivered"' | awk '{print $2}')
    q=$(echo "$m" | grep '^crier_webhook_queue_depth{' | awk '{print $2}')
    echo "$(date +%s.%N) ${v:-0} ${q:-0}"; sleep 0.05; done ) > samples.txt &
SP=$!
if [ "$SIDE" != 0 ]; then
  # A second publisher on another channel (no subscribers) while the fan-out runs: the
  # webhook gets every message of both.
  ( sleep 7; $LG push --subscribers 0 --messages $SIDE --rate 0 --size 100 --channel-prefix side \
      --sub-url "http://127.0.0.1:$P/live/{channel}" --pub-url "http://127.0.0.1:$PP/pub/{channel}" > side.json 2>side.err ) &
fi
$LG push --subscribers $SUBS --channels $CHANNELS --messages $MSGS --rate 0 --size 100 \
  --sub-url "http://127.0.0.1:$P/live/{channel}" --pub-url "http://127.0.0.1:$PP/pub/{channel}" \
  --server-pid $CP --drain-max 60 > push.json 2>push.err
# Until the webhook's queue is empty and nothing is in flight (or 5 s without progress).
last=-1; still=0
while [ "$WH" = 1 ] && [ $still -lt 50 ]; do
  st=$(curl -s http://127.0.0.1:$AP/webhooks)
  if echo "$st" | grep -Eq '"queue_depth":0[,}]' && echo "$st" | grep -Eq '"in_flight":0[,}]'; then break; fi
  cur=$(echo "$st" | grep -o '"delivered":[0-9]*' | head -1)
  if [ "$cur" = "$last" ]; then still=$((still + 1)); else still=0; last=$cur; fi
  sleep 0.1
done
sleep 0.2
curl -s http://127.0.0.1:$AP/metrics | grep -E '^crier_webhook_(deliveries_total|duration_seconds_(sum|count))' 
kill $CP; wait $CP; kill $SP $RX 2>/dev/null
python3 - <<PY
import json
j=json.load(open("push.json"))
keys=[k for k in j if any(s in k for s in ("deliver","lat","publish","connected","lost","cpu"))]
print({k:j[k] for k in keys})
s=[tuple(map(float,l.split())) for l in open("samples.txt") if len(l.split())==3]
print("max webhook queue depth sampled:", max((x[2] for x in s), default=0))
i=next((k for k,x in enumerate(s) if x[1]>0), None)
if i is not None:
    final=max(x[1] for x in s)
    first=s[i-1] if i>0 else s[i]
    last=next(x for x in s if x[1]==final)
    print("webhook delivered", final, "in", round(last[0]-first[0],3), "s ->", round(final/max(last[0]-first[0],1e-9)), "/s (50 ms sampling)")
PY
