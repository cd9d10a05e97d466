#!/usr/bin/env bash
# Instructions per delivery and per publish, counted by callgrind: the same count for the same
# binary and inputs whatever else the machine is doing, so a hot-path change is measured
# before and after on a busy 2-core machine where timings are noise.
#
#   CRIER_BIN=target/release/crier LOADGEN_BIN=target/release/crier-loadgen \
#   CRIER_BASE_BIN=/tmp/crier-base.bin benches/callgrind.sh
#
# For each binary (crier-base first when CRIER_BASE_BIN is set) and case, crier runs under
# `valgrind --tool=callgrind` with benches/peers/crier.toml; the generator connects the
# subscribers, settles, zeroes the counters (`callgrind_control -z`), publishes, and dumps them
# (`callgrind_control -d`) as soon as every subscriber has every message. So the count is the
# publish phase only: the publishes, every delivery, and what the runtime did meanwhile.
#
# Cases (CG_SUBS subscribers on one channel, CG_MSGS messages of 100 B at CG_RATE/s, so each
# wake-up delivers one message: the per-delivery cost without batching):
#   sse      CG_SUBS SSE subscribers (the fast path)
#   ws       CG_SUBS WebSocket subscribers
#   publish  one SSE subscriber, CG_PUB_MSGS publishes at CG_PUB_RATE/s: the cost of a publish
# Writes $OUT/RESULTS.md (instructions per delivery and per publish, crier/crier-base).
set -euo pipefail
cd "$(dirname "$0")/.."

CRIER_BIN=${CRIER_BIN:-target/release/crier}
LOADGEN_BIN=${LOADGEN_BIN:-target/release/crier-loadgen}
CRIER_BASE_BIN=${CRIER_BASE_BIN:-}
CG_SUBS=${CG_SUBS:-500}
CG_MSGS=${CG_MSGS:-100}
CG_RATE=${CG_RATE:-20}
CG_PUB_MSGS=${CG_PUB_MSGS:-2000}
CG_PUB_RATE=${CG_PUB_RATE:-200}
CASES=${CASES:-"sse ws publish"}
OUT=${OUT:-benches/callgrind}
RUN_DIR=${RUN_DIR:-$(mktemp -d /tmp/crier-callgrind.XXXXXX)}

for t in valgrind callgrind_control jq; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install valgrind jq)" >&2; exit 1; }
done
[[ -x $CRIER_BIN && -x $LOADGEN_BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }
ulimit -n 20000 2>/dev/null || true
mkdir -p "$OUT"

run_case() { # label binary case → prints "Ir deliveries publishes"
    local label=$1 bin=$2 case=$3 dir="$RUN_DIR/$1-$3" subs=$CG_SUBS msgs=$CG_MSGS rate=$CG_RATE transport=sse
    mkdir -p "$dir"
    case $case in
    ws) transport=ws ;;
    publish) subs=1; msgs=$CG_PUB_MSGS; rate=$CG_PUB_RATE ;;
    esac
    sed -e "s|@RUN@|$dir|g" -e "s|@BUFFER@|1000|g" benches/peers/crier.toml >"$dir/crier.toml"
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" --dump-instr=no \
        "$bin" run --config "$dir/crier.toml" >"$dir/crier.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null http://127.0.0.1:18082/healthz 2>/dev/null && break
        sleep 0.2
    done
    "$LOADGEN_BIN" push --transport "$transport" --subscribers "$subs" --channels 1 \
        --messages "$msgs" --size 100 --rate "$rate" --ramp-rate 200 --settle 2 \
        --connect-timeout 120 --drain-max 120 --max-seconds 600 \
        --sub-url http://127.0.0.1:18080/live/cg --pub-url http://127.0.0.1:18081/pub/cg \
        --before-publish "callgrind_control -z $pid >/dev/null" \
        --after-delivery "callgrind_control -d $pid >/dev/null" \
        --tag server="$label" --tag workload="cg-$case" >"$dir/loadgen.json" 2>"$dir/loadgen.log"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # The dump taken by the hook is the first numbered one (cg.out.1); the exit's is cg.out.
    local ir
    # No dump: the generator stopped before every subscriber had everything (see its log).
    ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dir/cg.out.1" 2>/dev/null || true)
    [[ -n $ir ]] || { echo "callgrind: no dump for $label $case (see $dir/loadgen.log)" >&2; ir=0; }
    local delivered published
    delivered=$(jq -r '.delivery.deliveries // 0' "$dir/loadgen.json")
    published=$(jq -r '.publish.ok // 0' "$dir/loadgen.json")
    echo "$ir $delivered $published"
}

declare -A IR DEL PUB
labels=()
[[ -n $CRIER_BASE_BIN ]] && labels+=(crier-base)
labels+=(crier)
for case in $CASES; do
    for label in "${labels[@]}"; do
        bin=$CRIER_BIN
        [[ $label == crier-base ]] && bin=$CRIER_BASE_BIN
        echo "callgrind: $label $case ..." >&2
        read -r ir d p < <(run_case "$label" "$bin" "$case")
        IR[$label.$case]=$ir DEL[$label.$case]=$d PUB[$label.$case]=$p
        echo "  $ir instructions, $d deliveries, $p publishes" >&2
    done
done

per() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f", a / b; else print "–" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "–") printf "%.2f×", a / b; else print "–" }'; }
{
    echo "# Instructions per delivery (callgrind)"
    echo
    echo "- **Date:** $(date -u +%FT%TZ); machine: $(nproc) cores, $(uname -r)"
    echo "- **Command:** \`CG_SUBS=$CG_SUBS CG_MSGS=$CG_MSGS CG_RATE=$CG_RATE CG_PUB_MSGS=$CG_PUB_MSGS CG_PUB_RATE=$CG_PUB_RATE CASES=\"$CASES\" CRIER_BIN=$CRIER_BIN${CRIER_BASE_BIN:+ CRIER_BASE_BIN=$CRIER_BASE_BIN} benches/callgrind.sh\`"
    echo "- **Versions:** crier: $("$CRIER_BIN" --version 2>/dev/null | head -1)${CRIER_BASE_BIN:+; crier-base: $("$CRIER_BASE_BIN" --version 2>/dev/null | head -1)}"
    echo
    echo "Instructions counted from the first publish to the moment every subscriber had every message (the whole process: publishes, deliveries, the runtime). Per delivery = instructions / deliveries; per publish = instructions / publishes."
    echo
    echo "| case | server | instructions | deliveries | publishes | per delivery | per publish | vs crier-base |"
    echo "|---|---|---|---|---|---|---|---|"
    for case in $CASES; do
        for label in "${labels[@]}"; do
            k=$label.$case
            if [[ $case == publish ]]; then unit=$(per "${IR[$k]}" "${PUB[$k]}"); base=crier-base.$case; b=$(per "${IR[$base]:-0}" "${PUB[$base]:-0}")
            else unit=$(per "${IR[$k]}" "${DEL[$k]}"); base=crier-base.$case; b=$(per "${IR[$base]:-0}" "${DEL[$base]:-0}"); fi
            vs="–"; [[ $label == crier && -n $CRIER_BASE_BIN ]] && vs=$(ratio "$unit" "$b")
            echo "| $case | $label | ${IR[$k]} | ${DEL[$k]} | ${PUB[$k]} | $(per "${IR[$k]}" "${DEL[$k]}") | $(per "${IR[$k]}" "${PUB[$k]}") | $vs |"
        done
    done
} >"$OUT/RESULTS.md"
cat "$OUT/RESULTS.md"
