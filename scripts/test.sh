#!/usr/bin/env bash
# Runs every test: unit, property and simulation tests, and the process tests (real daemons,
# fio, qemu-io, libnbd tools, kill -9, loop devices and nbdfuse; these need root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The process tests run the daemon and CLI binaries.
cargo build --locked --workspace --bins
cargo nextest run --locked --workspace --no-fail-fast "$@"
