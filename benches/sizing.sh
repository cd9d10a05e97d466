#!/bin/bash
# Memory figures for sizing a node (README "Sizing a node"): RSS per idle connection per
# transport, per channel and per buffered message. Each figure is an RSS delta of a fresh
# crier process divided by what was added. By hand, not part of run.sh; build first:
#   cargo build --release --bin crier --bin crier-loadgen
# Usage: benches/sizing.sh [CONNS=10000] [CHANNELS=10000] [MESSAGES=1000] [SIZE=100]
#   CONNS idle SSE, WebSocket and long-poll subscribers on one channel (one run each);
#   CHANNELS channels with one SIZE-byte message each; then 10 channels x MESSAGES messages
#   of SIZE bytes (buffer_messages = MESSAGES), and the same with 10 x SIZE-byte bodies.
# WebRTC sessions need a WebRTC client: tests/webrtc.rs's 1,000-session test prints crier's
# RSS per session; run it against this binary with
#   CRIER_BIN=target/release/crier CRIER_WEBRTC_SESSIONS=1000 \
#     cargo test --test webrtc a_thousand_sessions -- --nocapture
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONNS=${1:-10000}; CHANNELS=${2:-10000}; MESSAGES=${3:-1000}; SIZE=${4:-100}
D=${RUN_DIR:-$(mktemp -d /tmp/crier-sizing.XXXX)}; cd "$D"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
LG=${LOADGEN_BIN:-$ROOT/target/release/crier-loadgen}
CRIER=${CRIER_BIN:-$ROOT/target/release/crier}
port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; } # KiB

start() { # buffer_messages → sets CP, P, PP
  P=$(port); PP=$(port); AP=$(port)
  cat > crier.toml <<EOT
[server]
listen = ["127.0.0.1:$P"]
worker_threads = 2
[upstream]
url = "http://127.0.0.1:9"
[publish]
unix = "$D/pub.sock"
listen = ["127.0.0.1:$PP"]
[channels]
buffer_messages = $1
buffer_ttl = "1h"
max_channels = 1000000
[[push]]
path = "/live/{channel}"
keepalive = "60s"
longpoll_timeout = "120s"
[admin]
listen = "127.0.0.1:$AP"
EOT
  CRIER_LOG=warn $CRIER --config crier.toml 2>crier.log & CP=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$AP/readyz" >/dev/null && break; sleep 0.1; done
}
stop() { kill "$CP"; wait "$CP" 2>/dev/null; }

echo "crier $($CRIER --version 2>/dev/null) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for t in sse ws longpoll; do
  start 100
  # One warm-up subscriber run first, so the runtime's lazily made parts are not counted.
  $LG push --transport $t --subscribers 100 --channels 1 --messages 0 --settle 1 \
    --sub-url "http://127.0.0.1:$P/live/{channel}" --pub-url "http://127.0.0.1:$PP/pub/{channel}" >/dev/null 2>&1
  sleep 1
  $LG push --transport $t --subscribers "$CONNS" --channels 1 --messages 0 --settle 3 \
    --sub-url "http://127.0.0.1:$P/live/{channel}" --pub-url "http://127.0.0.1:$PP/pub/{channel}" \
    --server-pid "$CP" > "idle-$t.json" 2>"idle-$t.err"
  python3 - "$t" "idle-$t.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[2])); s = j["server"]; n = j["subs"]["connected"]
d = s["connected"]["rss_kib"] - s["before"]["rss_kib"]
print(f"idle {sys.argv[1]:8}: {n} connected, RSS +{d} KiB = {d * 1024 / max(n, 1):.0f} B per connection")
PY
  stop
done

publish() { # channels messages size → publishes round-robin over the channels
  $LG push --subscribers 0 --channels "$1" --messages "$2" --size "$3" --rate 0 --pub-conns 8 \
    --channel-prefix sz --sub-url "http://127.0.0.1:$P/live/{channel}" \
    --pub-url "http://127.0.0.1:$PP/pub/{channel}" >/dev/null 2>publish.err
}

# Per channel: CHANNELS channels, one message each (a channel cannot exist without one).
start 100
publish 100 100 "$SIZE"; sleep 1 # warm-up: the publish path and 100 channels
r0=$(rss $CP); publish "$CHANNELS" "$CHANNELS" "$SIZE"; sleep 1; r1=$(rss $CP)
echo "channels: $CHANNELS channels x 1 message of $SIZE B: RSS +$((r1 - r0)) KiB = $(((r1 - r0) * 1024 / CHANNELS)) B per channel (with its message)"
stop

# Per buffered message: 10 channels x MESSAGES, bodies of SIZE and 10 x SIZE bytes.
for s in "$SIZE" $((SIZE * 10)); do
  start "$MESSAGES"
  publish 10 10 "$s"; sleep 1
  r0=$(rss $CP); publish 10 $((10 * MESSAGES)) "$s"; sleep 1; r1=$(rss $CP)
  n=$((10 * MESSAGES - 10))
  echo "messages: $n more messages of $s B in 10 channels: RSS +$((r1 - r0)) KiB = $(((r1 - r0) * 1024 / n)) B per message"
  stop
done
echo "raw runs in $D"
