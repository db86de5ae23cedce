#!/usr/bin/env bash
# Runs every test: unit, property and simulation tests, and the process tests (real daemons,
# fio, qemu-io, libnbd tools, kill -9, loop devices and nbdfuse; these need root).
# Fails, too, if the run left the checkout modified (a stray file written by a tool).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/sdk-venv.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

checkout_state() {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git status --porcelain --untracked-files=all
    fi
}
before=$(checkout_state)

# The process tests run the daemon and CLI binaries; this build carries the test-only
# fault hooks (a corrupted extent in flight), which release builds never have.
cargo build --locked --workspace --bins --features blockrepd/fault-injection
cargo nextest run --locked --workspace --no-fail-fast "$@"
# The group tests again with the coordinator's records in etcd (a one-member etcd each
# cluster starts), fewer failover rounds. group_trip is not among them: its daemons run in
# network namespaces, which do not reach the test's etcd.
BLOCKREP_TEST_COORDINATOR_STORE=etcd BLOCKREP_ROUNDS=5 cargo nextest run --locked \
    -p blockrep-tests --no-fail-fast \
    --test groups --test group_failover --test group_reverse --test group_order \
    --test group_extend --test group_points --test group_ext4 "$@"

after=$(checkout_state)
if [[ "$before" != "$after" ]]; then
    echo "test.sh: the test run modified the checkout:" >&2
    diff <(echo "$before") <(echo "$after") >&2 || true
    exit 1
fi
