#!/usr/bin/env bash
# Crash soak: runs the kill -9 loop of tests/crash.rs with many more iterations, several
# times with fresh seeds, and stops at the first failure (its seed is printed so the run
# can be reproduced with STREAMFS_SEED=... STREAMFS_CRASH_ITERS=...).
#
#   scripts/soak-crash.sh [ITERATIONS_PER_RUN [RUNS]]     (defaults: 500 and 4)
#
# Needs root and /dev/fuse, like the tests. Extra environment is passed through
# (STREAMFS_SEED to replay one run).
set -euo pipefail
cd "$(dirname "$0")/.."

iters=${1:-500}
runs=${2:-4}
log=target/soak-crash.log
[[ $iters =~ ^[0-9]+$ && $runs =~ ^[0-9]+$ ]] || {
    echo "usage: $0 [ITERATIONS_PER_RUN [RUNS]]" >&2
    exit 2
}

cargo test --release --test crash --no-run
for ((r = 1; r <= runs; r++)); do
    echo "=== soak run $r/$runs: $iters iterations"
    start=$SECONDS
    if ! STREAMFS_CRASH_ITERS=$iters cargo test --release --test crash -- --nocapture --test-threads=1 \
        2>&1 | tee "$log" | grep -E "seed|iterations in|leaks|panicked|FAILED|test result"; then
        :
    fi
    if ! grep -q "test result: ok" "$log"; then
        echo "=== soak run $r FAILED after $((SECONDS - start)) s; full log: $log" >&2
        exit 1
    fi
    echo "=== soak run $r passed in $((SECONDS - start)) s"
done
echo "=== all $runs soak runs passed ($iters iterations each)"
