#!/bin/bash
# Rebuild throughput: release meta + 3 storage (periodic sync, anti-entropy off) + router as separate
# processes, 100k x 1 KiB at RF 3; wipe node 3, restart it, `pairdb node rebuild 3`.
# Run from the repository root after
#   cargo build --release -p pairdb-cli -p pairdb-storage -p pairdb-meta -p pairdb-router
# (PAIRDB_BIN overrides target/release). Uses the dev ports 7000, 7100, 7201-7205; numbers and how
# they were read are in docs/benchmarks.md.
set -u
B=${PAIRDB_BIN:-target/release}; B=$(cd "$B" && pwd)
W=${PAIRDB_BENCH_DIR:-/tmp/pairdb-bench}/rebuild
rm -rf $W; mkdir -p $W; cd $W
$B/pairdb-meta --listen-addr 127.0.0.1:7100 --data-dir $W/meta --no-auth --auto-add-nodes > $W/meta.log 2>&1 &
sleep 1
start_node() {
  $B/pairdb-storage --node-id $1 --meta-addr 127.0.0.1:7100 --listen-addr 127.0.0.1:720$1 --data-dir $W/n$1 --sync periodic --anti-entropy-period-secs 0 >> $W/n$1.log 2>&1 &
  eval "N$1=$!"
}
start_node 1; start_node 2; start_node 3
sleep 2
$B/pairdb-router --listen-addr 127.0.0.1:7000 --meta-addr 127.0.0.1:7100 --no-auth > $W/router.log 2>&1 &
R=$!
$B/pairdb tenant create demo --replication-factor 3 > /dev/null
sleep 2
$B/pairdb bench --workload A --records 100000 --duration 1s --consistency quorum | grep "^load:"
kill -9 $N3; rm -rf $W/n3; start_node 3
sleep 3
$B/pairdb node list
/usr/bin/time -f "rebuild wall %e s" $B/pairdb node rebuild 3 --output json
$B/pairdb node list
kill -INT $N1 $N2 $N3 $R; sleep 1; kill -INT %1; wait
