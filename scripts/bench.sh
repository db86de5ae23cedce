#!/usr/bin/env bash
# Benchmarks: fio on a loop device against the raw device, nbdkit and blockrepd, side by side
# in one run. Prints a Markdown table and writes JSON + Markdown under benches/results/.
#   scripts/bench.sh            quick (3 × 4 s per row, 1 GiB device)
#   scripts/bench.sh --full     5 × 15 s per row, 4 GiB device
#   scripts/bench.sh --help     every option (targets, workloads, repeats, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --locked --release --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
exec "$bin/blockrep-bench" --bin "$bin" "$@"
