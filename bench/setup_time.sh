#!/usr/bin/env bash
# Times a fresh `bash scripts/setup.sh` (no .venv, empty pip and uv caches) of each
# given git revision, in a checkout of its own, RUNS times each, interleaved, and
# prints every run and the medians. npm keeps its cache (the Node.js client is a few
# MB); the registries are reached as usual.
#
#   bash bench/setup_time.sh HEAD~1 HEAD          # RUNS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
[ $# -gt 0 ] || set -- HEAD
scratch=$(mktemp -d)
trap 'for d in "$scratch"/checkout-*; do git worktree remove --force "$d" 2>/dev/null || true; done; rm -rf "$scratch"' EXIT
declare -A times
for rev in "$@"; do
    git worktree add --quiet --detach "$scratch/checkout-$(git rev-parse --short "$rev")" "$rev"
done
for run in $(seq "$runs"); do
    for rev in "$@"; do
        dir="$scratch/checkout-$(git rev-parse --short "$rev")"
        rm -rf "$dir/.venv" "$scratch/pip-cache" "$scratch/uv-cache"
        start=$(date +%s.%N)
        (cd "$dir" && PIP_NO_CACHE_DIR=1 UV_CACHE_DIR="$scratch/uv-cache" bash scripts/setup.sh >/dev/null)
        seconds=$(echo "$(date +%s.%N) - $start" | bc)
        printf '%s run %d: %.1f s\n' "$rev" "$run" "$seconds"
        times[$rev]="${times[$rev]:-} $seconds"
    done
done
for rev in "$@"; do
    printf '%s median: %s s\n' "$rev" "$(echo "${times[$rev]}" | tr ' ' '\n' | sed '/^$/d' | sort -n \
        | awk '{a[NR]=$1} END {printf "%.1f", (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')"
done
