#!/usr/bin/env bash
# minimize.sh NAME: shrinks corpus/NAME to what is committed: libFuzzer's set-cover merge
# (the fewest files that keep its coverage), then at most 50 of them (largest first, none
# over 8 KiB) so the repository stays small. Needs a built target (cargo +nightly fuzz build).
set -euo pipefail
cd "$(dirname "$0")"
t=$1
B=target/x86_64-unknown-linux-gnu/release
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/$t"
nice -n 19 $B/$t -set_cover_merge=1 -use_counters=0 -use_value_profile=0 -rss_limit_mb=2048 $scratch/$t corpus/$t > "$scratch/$t.log" 2>&1
rm -rf corpus/$t; mkdir -p corpus/$t
find $scratch/$t -type f -size -8193c -printf '%s %p\n' | sort -rn | head -50 | while read -r _ f; do cp "$f" corpus/$t/; done
echo "$t: set cover $(ls $scratch/$t | wc -l) files, kept $(ls corpus/$t | wc -l), $(du -sb corpus/$t | cut -f1) bytes"
