#!/usr/bin/env bash
# The demo: two availability zones on this machine. A coordinator and an agent in az1, an
# agent in az2, certificates made on the fly. A volume in az1 is written through NBD, then
# paired with a volume in az2 (hypermetro, and an async pair beside it); the initial sync
# is followed with `job wait`, writes go on while the pairs replicate, the DR agent is
# killed with kill -9 and restarted while writes go on (the pairs catch up from their
# bitmaps), and the volumes' checksums match at the end.
# Needs no setup: it builds the binaries and works in a temporary directory it removes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --locked --release --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

work=$(mktemp -d /tmp/blockrep-demo.XXXXXX)
declare -A pid_of
cleanup() {
    for pid in "${pid_of[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cli() { "$bin/blockrep" "$@"; }
a() { cli --socket "$work/node-a/run/control.sock" "$@"; }
b() { cli --socket "$work/node-b/run/control.sock" "$@"; }

step "a cluster CA and a certificate per node (blockrep cluster init-ca / issue-cert)"
cli cluster init-ca --dir "$work/ca"
for node in node-a node-b; do
    cli cluster issue-cert --ca-dir "$work/ca" --node "$node" --out-dir "$work/$node/tls"
done

step "start node-a (az1, runs the coordinator) and node-b (az2)"
port_a=$(free_port); port_b=$(free_port)
start_node() {
    local node=$1 az port role
    if [[ $node == node-a ]]; then az=az1; port=$port_a; role=true; else az=az2; port=$port_b; role=false; fi
    cat >"$work/$node.toml" <<TOML
node_name = "$node"
availability_zone = "$az"
state_dir = "$work/$node/state"
runtime_dir = "$work/$node/run"

[cluster]
listen = "127.0.0.1:$port"
coordinator = "127.0.0.1:$port_a"
ca_cert = "$work/$node/tls/ca.pem"
cert = "$work/$node/tls/node.pem"
key = "$work/$node/tls/node.key"
coordinator_role = $role
TOML
    "$bin/blockrepd" --config "$work/$node.toml" 2>>"$work/$node.log" >/dev/null &
    pid_of[$node]=$!
    for _ in $(seq 100); do
        cli --socket "$work/$node/run/control.sock" status >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "$node did not start; its log:" >&2; tail "$work/$node.log" >&2; exit 1
}
start_node node-a
start_node node-b
for _ in $(seq 50); do
    [[ $(a --output json node list | grep -c '"alive": true') == 2 ]] && break
    sleep 0.2
done
a node list

step "volumes: db and logs on node-a, their DR twins on node-b (1 GiB files)"
for name in db logs; do
    fallocate -l 1G "$work/$name.img"
    fallocate -l 1G "$work/$name-dr.img"
    a volume add --name "$name" --path "$work/$name.img" >/dev/null
    b volume add --name "$name-dr" --path "$work/$name-dr.img" >/dev/null
done
a volume list
b volume list
uri="nbd+unix:///db?socket=$work/node-a/run/nbd/db.sock"
logs_uri="nbd+unix:///logs?socket=$work/node-a/run/nbd/logs.sock"

step "write 64 MiB into db before it is paired (fio, nbd engine, crc32c verify)"
(cd "$work" && fio --name=before --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 \
    --size=64M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting) \
    | grep -E 'write:|err='

step "pair db with db-dr, hypermetro (synchronous); logs with logs-dr, async"
for _ in $(seq 50); do
    [[ $(a --output json node list | grep -c '"volumes": 2') == 2 ]] && break
    sleep 0.2
done
a pair create --name db-pair --volumes db,db-dr --priority-station az1 --model hypermetro
job=$(a --output json job list | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
a pair create --name logs-pair --volumes logs,logs-dr --priority-station az1 --model async
a job wait "$job"

step "blockrep status on each node: roles and replication"
a status
b status

step "writes go on while the pairs replicate (fio on db, qemu-io patterns on logs)"
(cd "$work" && fio --name=during --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
    --offset=256M --size=64M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting) \
    | grep -E 'write:|err='
qemu-io -f raw -c 'write -P 0xa5 0 1M' -c 'write -P 0x5a 300000001 4000' -c 'write -z 512M 1M' \
    "$logs_uri" | grep -E '^wrote'

step "the DR export is read-only while it is the DR side"
qemu-io -f raw -c 'write -P 1 0 4k' "nbd+unix:///db-dr?socket=$work/node-b/run/nbd/db-dr.sock" 2>&1 | head -n 1 || true

step "pair show (from node-b: every daemon forwards pair calls to the coordinator)"
for _ in $(seq 100); do
    [[ $(a --output json status | grep -c '"out_of_sync_bytes": 0') == 2 ]] && break
    sleep 0.1
done
b pair show db-pair
b pair list

step "an outage: node-b (the DR agent) killed with kill -9 while writes go on"
# A field of a pair as its production agent (node-a) sees it now, by production volume.
field() { a --output json status | python3 -c 'import json,sys; v=[p for p in json.load(sys.stdin)["pairs"] if p["volume_name"]==sys.argv[1]][0]; print(eval(sys.argv[2]))' "$1" "$2"; }
kill -KILL "${pid_of[node-b]}"
wait "${pid_of[node-b]}" 2>/dev/null || true
# db is hypermetro: its writes wait for node-b until the peer timeout (5 s) trips the pair,
# then go on locally, each block marked dirty durably before it is answered.
(cd "$work" && fio --name=outage --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 \
    --offset=512M --size=256M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting) \
    | grep -E 'write:|err='
qemu-io -f raw -c 'write -P 0x77 64M 32M' "$logs_uri" | grep -E '^wrote'
for _ in $(seq 100); do
    [[ $(field logs 'v["replication_status"]') != active ]] && break
    sleep 0.1
done
a status
for vol in db logs; do
    echo "$vol-pair: $(field $vol 'v["replication_status"]'), $(field $vol 'v["out_of_sync_bytes"]') bytes out of sync: $(field $vol 'v["status_detail"]')"
done

step "node-b restarts: each pair catches up from its bitmap, sending only what changed"
declare -A dirty resync_before
for vol in db logs; do
    dirty[$vol]=$(field $vol 'v["out_of_sync_bytes"]')
    resync_before[$vol]=$(field $vol 'v["counters"]["resync_bytes_sent"]')
done
start_node node-b
# The production agent's own view, each time it changes.
last=""
for _ in $(seq 1200); do
    now=$(a status | grep -E '^  pair:' | sed -E 's/ lag:[0-9.]+s//' | sort)
    [[ $now != "$last" ]] && printf '%s\n' "$now"
    last=$now
    [[ $now != *copying* && $now != *inactive* && $now != *error* ]] && break
    sleep 0.1
done
# The async pair is clean once its last epoch is staged.
for _ in $(seq 100); do
    [[ $(field db 'v["out_of_sync_bytes"]') == 0 && $(field logs 'v["out_of_sync_bytes"]') == 0 ]] && break
    sleep 0.2
done
for vol in db logs; do
    sent=$(( $(field $vol 'v["counters"]["resync_bytes_sent"]') - ${resync_before[$vol]} ))
    echo "$vol-pair: $(field $vol 'v["replication_status"]'); the catch-up sent $sent bytes for ${dirty[$vol]} dirty"
done

step "stop both agents (the DR side applies what it staged) and compare the volumes"
for node in node-b node-a; do kill -TERM "${pid_of[$node]}"; wait "${pid_of[$node]}" || true; done
pid_of=()
(cd "$work" && sha256sum db.img db-dr.img logs.img logs-dr.img)
cmp "$work/db.img" "$work/db-dr.img" && echo "db and db-dr are identical"
cmp "$work/logs.img" "$work/logs-dr.img" && echo "logs and logs-dr are identical"
