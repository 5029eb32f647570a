#!/usr/bin/env bash
# Long mutation-fuzzing campaigns over qemu-img images (tests/fuzz_images.rs), several
# seeds, stopping at the first failure (its seed and mutant are printed). Counts go to
# target/fuzz-images.log.
#
#   scripts/fuzz-images.sh [MUTANTS_PER_RUN [RUNS]]     (defaults: 5000 and 4)
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-5000}
runs=${2:-4}
log=target/fuzz-images.log
[[ $iters =~ ^[0-9]+$ && $runs =~ ^[0-9]+$ ]] || { echo "usage: $0 [MUTANTS [RUNS]]" >&2; exit 2; }
cargo test --release --test fuzz_images --no-run
: >"$log"
for ((r = 1; r <= runs; r++)); do
    seed=${STREAMFS_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
    echo "=== fuzz run $r/$runs: $iters mutants, seed $seed"
    if ! STREAMFS_SEED=$seed STREAMFS_FUZZ_ITERS=$iters cargo test --release --test fuzz_images -- --nocapture \
        2>&1 | tee -a "$log" | grep -E "^fuzz:|panicked|mutant [0-9]+ of"; then
        :
    fi
    tail -5 "$log" | grep -q "test result: ok" || { echo "=== fuzz run $r FAILED (seed $seed); see $log" >&2; exit 1; }
done
echo "=== all $runs runs passed ($iters mutants each)"
