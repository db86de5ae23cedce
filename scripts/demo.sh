#!/usr/bin/env bash
# The demo: two availability zones on this machine, and a consistency group across them.
# A coordinator on a witness node (az3), production agents node-a1 and node-a2 (az1, a
# volume each: db and logs), the DR agent node-b (az2), certificates made on the fly. The two
# pairs form an async group; the write-order checker writes numbered records across both
# volumes while fio writes beside them. Then az1 fails (its agents killed with kill -9), the
# group fails over, the DR volumes pass the write-order check and take writes; az1 comes
# back fenced, reprotect copies back only what differs, a planned reverse moves production
# home, and the volumes' checksums match at the end.
# Needs no setup: it builds the binaries and works in a temporary directory it removes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --locked --release --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

work=$(mktemp -d /tmp/blockrep-demo.XXXXXX)
declare -A pid_of port_of
writer_pid=""
cleanup() {
    [[ -n $writer_pid ]] && kill -TERM "$writer_pid" 2>/dev/null && wait "$writer_pid" 2>/dev/null
    for pid in "${pid_of[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cli() { "$bin/blockrep" "$@"; }
on() { local node=$1; shift; cli --socket "$work/$node/run/control.sock" "$@"; }
co() { on node-w "$@"; }
json() { on "$1" --output json "${@:2}"; }
# A field of a JSON document on stdin, as a Python expression of `v`.
get() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
sock() { echo "$work/$1/run/nbd/$2.sock"; }
wait_for() { # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 10))); do "$@" && return; sleep 0.1; done
    echo "timed out after ${seconds}s waiting for $what" >&2; exit 1
}
group_field() { co --output json group show app | get "$1"; }
job_of() { get 'v["job_id"]'; }

step "a cluster CA and a certificate per node (blockrep cluster init-ca / issue-cert)"
cli cluster init-ca --dir "$work/ca"
nodes=(node-w node-a1 node-a2 node-b)
declare -A zone_of=([node-w]=az3 [node-a1]=az1 [node-a2]=az1 [node-b]=az2)
for node in "${nodes[@]}"; do
    role=()
    [[ $node == node-w ]] && role=(--coordinator)   # the witness runs the coordinator
    cli cluster issue-cert --ca-dir "$work/ca" --node "$node" --out-dir "$work/$node/tls" "${role[@]}" >/dev/null
    port_of[$node]=$(free_port)
done
echo "certificates for ${nodes[*]}"

start_node() {
    local node=$1
    cat >"$work/$node.toml" <<TOML
node_name = "$node"
availability_zone = "${zone_of[$node]}"
state_dir = "$work/$node/state"
runtime_dir = "$work/$node/run"

[replication]
epoch_interval_ms = 500

[cluster]
listen = "127.0.0.1:${port_of[$node]}"
coordinator = "127.0.0.1:${port_of[node-w]}"
ca_cert = "$work/$node/tls/ca.pem"
cert = "$work/$node/tls/node.pem"
key = "$work/$node/tls/node.key"
coordinator_role = $([[ $node == node-w ]] && echo true || echo false)
TOML
    "$bin/blockrepd" --config "$work/$node.toml" 2>>"$work/$node.log" >/dev/null &
    pid_of[$node]=$!
    wait_for 10 "$node to start" on "$node" status >/dev/null 2>&1
}

step "start the witness node-w (az3, runs the coordinator), node-a1 and node-a2 (az1), node-b (az2)"
for node in "${nodes[@]}"; do start_node "$node"; done
wait_for 10 "every node to register" bash -c "[[ \$('$bin/blockrep' --socket '$work/node-w/run/control.sock' --output json node list | grep -c '\"alive\": true') == 4 ]]"
co node list

step "volumes: db on node-a1 and logs on node-a2, their DR twins on node-b (256 MiB files)"
for v in db logs db-dr logs-dr; do fallocate -l 256M "$work/$v.img"; done
on node-a1 volume add --name db --path "$work/db.img" >/dev/null
on node-a2 volume add --name logs --path "$work/logs.img" >/dev/null
on node-b volume add --name db-dr --path "$work/db-dr.img" >/dev/null
on node-b volume add --name logs-dr --path "$work/logs-dr.img" >/dev/null
wait_for 10 "the coordinator to see the volumes" bash -c "[[ \$('$bin/blockrep' --socket '$work/node-w/run/control.sock' --output json node list | grep -c '\"volumes\": [12]') == 3 ]]"

# The records take the first 64 MiB of each volume; fio writes past them.
records=32768

step "two async pairs, then a consistency group of both"
job1=$(co --output json pair create --name db-pair --volumes db,db-dr --priority-station az1 --model async | job_of)
job2=$(co --output json pair create --name logs-pair --volumes logs,logs-dr --priority-station az1 --model async | job_of)
co job wait "$job1"
co job wait "$job2"
co group create --name app --pairs db-pair,logs-pair --priority-station az1 --model async
wait_for 30 "the group's first consistent point" bash -c "[[ \$('$bin/blockrep' --socket '$work/node-w/run/control.sock' --output json group show app | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v[\"replication_status\"]==\"active\" and v[\"consistent_epoch\"]>0)') == True ]]"

step "writes: the write-order checker puts numbered records on db and logs in turn (each once the one before was answered), fio writes beside it"
"$bin/write-order" write --max "$records" "$(sock node-a1 db):db" "$(sock node-a2 logs):logs" >"$work/answered" 2>"$work/writer.log" &
writer_pid=$!
(cd "$work" && fio --name=beside --ioengine=nbd --uri="nbd+unix:///db?socket=$(sock node-a1 db)" \
    --rw=randwrite --bs=4k --iodepth=16 --offset=128M --size=64M --time_based --runtime=4 \
    --rate_iops=2000 --group_reporting) | grep -E 'write:|err='
co group show app
on node-a1 status

step "az1 fails: node-a1 and node-a2 killed with kill -9 in the middle of the writes"
kill -KILL "${pid_of[node-a1]}" "${pid_of[node-a2]}"
wait "${pid_of[node-a1]}" "${pid_of[node-a2]}" 2>/dev/null || true
unset 'pid_of[node-a1]' 'pid_of[node-a2]'
wait "$writer_pid" || true
writer_pid=""
answered=$(cat "$work/answered")
echo "the writer had $answered records answered when az1 went down"
wait_for 10 "the coordinator to see az1 gone" bash -c "[[ \$('$bin/blockrep' --socket '$work/node-w/run/control.sock' --output json group show app | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"fault_level\"])') == 2 ]]"
co group show app

step "group failover: the DR volumes roll to the group's consistent point and take writes"
started=$(date +%s.%N)
job=$(co --output json group failover app | job_of)
until qemu-io -f raw -c 'write -P 9 255M 4k' "nbd+unix:///db-dr?socket=$(sock node-b db-dr)" 2>/dev/null | grep -q '^wrote' &&
      qemu-io -f raw -c 'write -P 9 255M 4k' "nbd+unix:///logs-dr?socket=$(sock node-b logs-dr)" 2>/dev/null | grep -q '^wrote'; do
    sleep 0.02
done
echo "both DR exports took a write $(python3 -c "import time; print(f'{time.time() - $started:.2f}')") s after the failover call"
co job wait "$job"
co job show "$job"
co group show app

step "the write-order check on the DR volumes: exactly a prefix of the records, across both"
held=$("$bin/write-order" check --max "$records" "$work/db-dr.img" "$work/logs-dr.img")
echo "db-dr and logs-dr hold records 0..$held of the $answered answered: a state the application had"

step "writes go on in az2 (the writer carries on from record $held)"
timeout 3 "$bin/write-order" write --max "$records" --from "$held" "$(sock node-b db-dr):db-dr" "$(sock node-b logs-dr):logs-dr" >"$work/answered" || true
answered=$(cat "$work/answered")

step "az1 comes back: its volumes are fenced (demoted) and refuse writes"
start_node node-a1
start_node node-a2
wait_for 20 "node-a1's pair to be demoted" bash -c "'$bin/blockrep' --socket '$work/node-a1/run/control.sock' status | grep -q 'fenced:demoted'"
on node-a1 status
echo "a client opening db for writing: $(qemu-io -f raw -c 'write -P 1 0 4k' "nbd+unix:///db?socket=$(sock node-a1 db)" 2>&1 | head -n 1 | sed 's/.*: //')"
echo "(the export says read-only; a write sent anyway is answered EPERM)"

step "group reprotect: az1's volumes become the DR side and receive only the blocks that differ"
job=$(co --output json group reprotect app | job_of)
co job wait "$job"
co job show "$job"

step "group reverse: a planned move home to az1, with nothing lost (writes in az2 are refused while it drains)"
"$bin/write-order" write --max "$records" --from "$answered" "$(sock node-b db-dr):db-dr" "$(sock node-b logs-dr):logs-dr" >"$work/answered" 2>/dev/null &
writer_pid=$!
sleep 1
job=$(co --output json group reverse app | job_of)
co job wait "$job"
wait "$writer_pid" || true
writer_pid=""
answered=$(cat "$work/answered")
co group show app
held=$("$bin/write-order" check --max "$records" "$work/db.img" "$work/logs.img")
echo "db and logs (production again) hold records 0..$held; $answered were answered in az2: none lost"
[[ $held -ge $answered ]]

step "writes go on at home, replicated to az2; then every agent stops and the volumes are compared"
timeout 2 "$bin/write-order" write --max "$records" --from "$held" "$(sock node-a1 db):db" "$(sock node-a2 logs):logs" >"$work/answered" || true
current=$(json node-a1 status | get 'v["pairs"][0]["current_epoch"]')
wait_for 30 "the DR side to apply the last writes" bash -c "[[ \$('$bin/blockrep' --socket '$work/node-b/run/control.sock' --output json status | python3 -c 'import json,sys; print(min(p[\"consistent_epoch\"] for p in json.load(sys.stdin)[\"pairs\"]) > $current)') == True ]]"
for node in node-b node-a1 node-a2 node-w; do kill -TERM "${pid_of[$node]}"; wait "${pid_of[$node]}" || true; done
pid_of=()
(cd "$work" && sha256sum db.img db-dr.img logs.img logs-dr.img)
cmp "$work/db.img" "$work/db-dr.img" && echo "db and db-dr are identical"
cmp "$work/logs.img" "$work/logs-dr.img" && echo "logs and logs-dr are identical"
"$bin/write-order" check --max "$records" "$work/db-dr.img" "$work/logs-dr.img" >/dev/null
