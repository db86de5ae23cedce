#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), one after the other, on one core:
#   scripts/fuzz.sh 600
# Each target starts from its checked-in seeds (fuzz/corpus/TARGET) and from what earlier
# runs found (fuzz/grown/TARGET, git-ignored). A crash stops the run with the input in
# fuzz/artifacts/TARGET and a non-zero exit. Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
targets=$(cargo +nightly fuzz list)
for target in $targets; do
    mkdir -p "fuzz/grown/$target" "fuzz/corpus/$target"
    echo "fuzz.sh: $target for ${seconds}s" >&2
    cargo +nightly fuzz run "$target" "fuzz/grown/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1
done
