#!/usr/bin/env bash
# benches/build-base.sh REV — builds crier at git revision REV (a commit, tag or branch of this
# repository) in a detached worktree under /tmp, and prints the path of the binary, for
# CRIER_BASE_BIN (the `crier-base` server of benches/run.sh: issue 15's before/after in one run).
#
#   CRIER_BASE_BIN=$(benches/build-base.sh main) SERVERS="crier-base crier nchan" \
#       WORKLOADS="fanout-sse-max fanout-ws-max proxy" benches/run.sh
#
# The worktree is /tmp/crier-base-<commit>; builds share one target directory
# (/tmp/crier-base-target, CARGO_TARGET_DIR to change it), never this tree's target/, so a base
# build does not overwrite the crier under test; the binary is copied out of it to
# /tmp/crier-base-<commit>.bin (next to it <commit>.bin.rev says what it is). A binary already
# built for that commit is reused. Build output goes to stderr; stdout is the path alone.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: benches/build-base.sh REV" >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
rev=$(git -C "$ROOT" rev-parse --verify "$1^{commit}")
short=${rev:0:12}
bin=/tmp/crier-base-$short.bin
if [[ -x $bin ]]; then
    echo "crier-base: reusing $bin" >&2
    echo "$bin"
    exit 0
fi
wt=/tmp/crier-base-$short
if [[ ! -d $wt ]]; then
    git -C "$ROOT" worktree add --detach "$wt" "$rev" >&2
fi
target=${CARGO_TARGET_DIR:-/tmp/crier-base-target}
echo "crier-base: building $short ($(git -C "$ROOT" log -1 --format=%s "$rev" | cut -c1-70)) in $wt" >&2
(cd "$wt" && CARGO_TARGET_DIR=$target cargo build --release --bin crier >&2)
cp "$target/release/crier" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$rev $(git -C "$ROOT" log -1 --format='%cs %s' "$rev")" >"$bin.rev"
echo "$bin"
