#!/bin/bash
# Migration throughput: release pairdb dev (periodic sync), 100k x 1 KiB records at RF 3, then add
# node 4 idle and node 5 under bench A load.
# Run from the repository root after
#   cargo build --release -p pairdb-cli -p pairdb-storage -p pairdb-meta -p pairdb-router
# (PAIRDB_BIN overrides target/release). Uses the dev ports 7000, 7100, 7201-7205; numbers and how
# they were read are in docs/benchmarks.md.
set -u
B=${PAIRDB_BIN:-target/release}; B=$(cd "$B" && pwd)
W=${PAIRDB_BENCH_DIR:-/tmp/pairdb-bench}/mig
rm -rf $W; mkdir -p $W; cd $W
$B/pairdb dev --sync periodic --data-dir $W/data > $W/dev.log 2>&1 &
DEV=$!
for i in $(seq 1 60); do grep -q "pairdb dev: ready" $W/dev.log && break; sleep 1; done
echo "== load"
$B/pairdb bench --workload A --records 100000 --duration 1s --consistency quorum > $W/load.txt 2>&1
cat $W/load.txt
watch_migration() {
  local id=""
  for i in $(seq 1 60); do
    id=$($B/pairdb migration list --output json | python3 -c "import json,sys; m=[x for x in json.load(sys.stdin)['migrations'] if x['node_id']==$1]; print(m[-1]['migration_id'] if m else '')")
    [ -n "$id" ] && break; sleep 0.5
  done
  $B/pairdb migration watch $id --output json > $W/migration-$1.json 2>&1
  python3 - $W/migration-$1.json <<'PY'
import json,sys
m=json.load(open(sys.argv[1]))
p=m['progress']; secs=(m['updated_at_ms']-m['created_at_ms'])/1000
print(f"node {m['node_id']}: {m['state']} partitions {p['partitions_done']}/{p['partitions_total']} keys {p['keys_done']} bytes {p['bytes_done']} in {secs:.1f}s -> {p['keys_done']/secs:.0f} keys/s, {p['bytes_done']/secs/1e6:.1f} MB/s")
PY
}
echo "== add node 4, idle"
$B/pairdb-storage --node-id 4 --meta-addr 127.0.0.1:7100 --listen-addr 127.0.0.1:7204 --data-dir $W/n4 --sync periodic > $W/n4.log 2>&1 &
N4=$!
watch_migration 4
sleep 5
echo "== add node 5 under bench A"
$B/pairdb bench --workload A --records 100000 --skip-load --duration 60s --consistency quorum > $W/bench-during.txt 2>&1 &
BENCH=$!
sleep 10
$B/pairdb-storage --node-id 5 --meta-addr 127.0.0.1:7100 --listen-addr 127.0.0.1:7205 --data-dir $W/n5 --sync periodic > $W/n5.log 2>&1 &
N5=$!
watch_migration 5
wait $BENCH
cat $W/bench-during.txt
$B/pairdb node list
kill -INT $N4 $N5 $DEV; wait
