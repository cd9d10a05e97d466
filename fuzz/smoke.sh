#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on its committed corpus and regressions; exits
# non-zero on the first crash (its input is left in fuzz/artifacts/NAME/). New inputs go to a
# scratch copy, so the committed corpus does not change. Usage: fuzz/smoke.sh [SECONDS] [NAME...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  cp -r "corpus/$t/." "$scratch/$t/" 2>/dev/null || true
  dirs=("$scratch/$t")
  [ -d "regressions/$t" ] && dirs+=("regressions/$t")
  echo "fuzz: $t for ${secs}s"
  rc=0
  cargo +nightly fuzz run "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || rc=$?
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$scratch/$t.log" || true
  if [ "$rc" != 0 ]; then
    tail -n 60 "$scratch/$t.log" >&2
    echo "fuzz: $t failed (exit $rc); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
