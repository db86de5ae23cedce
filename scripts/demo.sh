#!/usr/bin/env bash
# The demo: blockrepd serving a file-backed volume over NBD. It writes through fio and
# qemu-io, reads everything back and compares checksums, shows the dirty bytes the agent
# tracked, restarts the daemon and shows the volume and its dirty map survived.
# Needs no setup: it builds the binaries and works in a temporary directory it removes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --locked --release --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

work=$(mktemp -d /tmp/blockrep-demo.XXXXXX)
daemon_pid=""
cleanup() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"; wait "$daemon_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

cat >"$work/blockrepd.toml" <<TOML
node_name = "demo-host"
availability_zone = "az1"
state_dir = "$work/state"
runtime_dir = "$work/run"
TOML
blockrep() { "$bin/blockrep" --socket "$work/run/control.sock" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start_daemon() {
    "$bin/blockrepd" --config "$work/blockrepd.toml" 2>>"$work/blockrepd.log" &
    daemon_pid=$!
    for _ in $(seq 100); do
        blockrep status >/dev/null 2>&1 && return 0
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/blockrepd.log"; return 1; }
        sleep 0.1
    done
    echo "blockrepd did not come up; log:" >&2; cat "$work/blockrepd.log" >&2; return 1
}

step "start blockrepd (config: $work/blockrepd.toml)"
start_daemon
blockrep status

step "register a 1 GiB file as volume 'demo'"
fallocate -l 1G "$work/demo.img"
blockrep volume add --name demo --path "$work/demo.img"
uri="nbd+unix:///demo?socket=$work/run/nbd/demo.sock"

step "write 64 MiB of random 4k blocks with fio (nbd engine), verified with crc32c"
(cd "$work" && fio --name=demo --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
    --offset=128M --size=64M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting) \
    | grep -E 'write:|read:|IOPS|err='

step "write and read back patterns with qemu-io (aligned, unaligned, zeroes)"
qemu-io -f raw -c 'write -P 0xa5 0 1M' -c 'write -P 0x5a 300000001 4000' -c 'write -z 512M 1M' \
    -c 'read -P 0xa5 0 1M' -c 'read -P 0x5a 300000001 4000' -c 'read -P 0 512M 1M' "$uri" \
    | grep -E '^(wrote|read)'

step "read the whole export back with nbdcopy and compare with the backing file"
nbdcopy "$uri" "$work/copy.img"
sha256sum "$work/demo.img" "$work/copy.img" | sed "s|$work/||"
cmp "$work/demo.img" "$work/copy.img" && echo "checksums match"
rm -f "$work/copy.img"

step "dirty bytes tracked by the agent"
blockrep status
blockrep volume dirty demo

step "restart the daemon (SIGTERM: drain, flush bitmap) and find the volume again"
kill -TERM "$daemon_pid"; wait "$daemon_pid"
start_daemon
blockrep volume show demo
