#!/usr/bin/env bash
# Soak run of the torture test (tests/api/torture.rs): many seeds, many cycles and
# more data than CI uses. Each seed runs in its own test process, so one failure does
# not stop the others. Every seed's output is kept in a log directory, and a table at
# the end gives each seed's result, how many cycles it ran and its first violation.
#
#   scripts/soak.sh                                     # the regression seeds, 150 cycles, 256 MiB
#   SEEDS="7 42 1001" CYCLES=500 MAX_MIB=384 scripts/soak.sh
#   SEEDS=$(seq 200 299) FULL_READ=1 scripts/soak.sh
#   KIND=live SEEDS="1 2 3" CYCLES=40 scripts/soak.sh   # the live torture test
#
# Environment:
#   KIND        offline (default): tests/api/torture.rs; live: tests/api/live_torture.rs
#               (a running VM; MAX_MIB and FULL_READ do not apply)
#   SEEDS       seeds, separated by spaces or commas (default: the regression seeds
#               of docs/reliability.md: 101..106, 201, 206, 208, 213, 227, 228)
#   CYCLES      cycles per seed (default: 150)
#   MAX_MIB     largest single guest write, in MiB (default: 256)
#   FULL_READ   1: also read every unwritten MiB with `read -P 0` (slower)
#   LOG_DIR     where the logs go (default: target/soak/<date>)
#   CARGO_FLAGS extra cargo flags, e.g. "--release"
# A failed seed keeps its data directory (the log names it), as the test does.
# Exit status: 0 if every seed held, 1 if any failed, 2 if the build failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SEEDS=${SEEDS:-"$(seq 101 106) 201 206 208 213 227 228 301"}
SEEDS=${SEEDS//,/ }
CYCLES=${CYCLES:-150}
MAX_MIB=${MAX_MIB:-256}
FULL_READ=${FULL_READ:-0}
LOG_DIR=${LOG_DIR:-target/soak/$(date +%Y%m%d-%H%M%S)}
CARGO_FLAGS=${CARGO_FLAGS:-}
KIND=${KIND:-offline}
case "$KIND" in
    offline) filter="torture::random_operations" ;;
    live) filter="live_torture::" ;;
    *)
        echo "KIND must be offline or live" >&2
        exit 2
        ;;
esac
mkdir -p "$LOG_DIR"

echo "==> building the test binary"
# shellcheck disable=SC2086 # CARGO_FLAGS is a list of flags
if ! cargo test $CARGO_FLAGS --test api --no-run; then
    echo "build failed" >&2
    exit 2
fi

started=$(date +%s)
rows=()
failed=0
count=0
for seed in $SEEDS; do
    count=$((count + 1))
    log="$LOG_DIR/seed-$seed.log"
    echo "==> seed $seed: $CYCLES cycles, writes up to $MAX_MIB MiB (log: $log)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    STRATA_TORTURE_SEED=$seed STRATA_TORTURE_CYCLES=$CYCLES STRATA_TORTURE_MAX_MIB=$MAX_MIB \
        STRATA_TORTURE_FULL_READ=$FULL_READ \
        STRATA_LIVE_TORTURE_SEED=$seed STRATA_LIVE_TORTURE_CYCLES=$CYCLES \
        cargo test $CARGO_FLAGS --test api "$filter" -- --nocapture >"$log" 2>&1
    status=$?
    seconds=$(($(date +%s) - t0))
    ran=$(sed -n "s/^torture seed $seed: \([0-9]*\) of [0-9]* cycles.*/\1/p" "$log" | head -n 1)
    if [ "$status" -eq 0 ]; then
        result=ok
        first=""
    else
        result=FAILED
        failed=$((failed + 1))
        at=$(sed -n "s/^===== TORTURE FAILURE: seed $seed, cycle \([0-9]*\).*/\1/p" "$log" | head -n 1)
        [ -n "$at" ] && result="FAILED@$at"
        first=$(grep -m 1 -oE '\[(1 content|2 check|3 chain|4 files|5 state|5 jobs|model)\].*' "$log" | cut -c 1-160)
        [ -z "$first" ] && first=$(grep -m 1 -E 'panicked|error' "$log" | cut -c 1-160)
    fi
    echo "    $result after ${ran:-?} cycle(s) in ${seconds} s ${first:+- $first}"
    rows+=("$(printf '%-10s %-12s %7s %7s  %s' "$seed" "$result" "${ran:-?}" "${seconds}s" "$first")")
done

echo
echo "==> soak summary: $count seed(s) x $CYCLES cycles, writes up to $MAX_MIB MiB, $(($(date +%s) - started)) s; logs in $LOG_DIR"
printf '%-10s %-12s %7s %7s  %s\n' seed result cycles time "first violation"
for row in "${rows[@]}"; do
    echo "$row"
done
echo "$failed of $count seed(s) failed"
[ "$failed" -eq 0 ]
