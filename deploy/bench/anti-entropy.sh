#!/bin/bash
# Anti-entropy cost on bench throughput: release pairdb dev (periodic sync), 100k x 1 KiB at RF 3,
# workload A for 30 s with anti-entropy off, every 60 s and every 10 s.
# Run from the repository root after
#   cargo build --release -p pairdb-cli -p pairdb-storage -p pairdb-meta -p pairdb-router
# (PAIRDB_BIN overrides target/release). Uses the dev ports 7000, 7100, 7201-7205; numbers and how
# they were read are in docs/benchmarks.md.
set -u
B=${PAIRDB_BIN:-target/release}; B=$(cd "$B" && pwd)
for P in 0 60 10 0 60 10; do
  W=${PAIRDB_BENCH_DIR:-/tmp/pairdb-bench}/ae-$P
  rm -rf $W; mkdir -p $W; cd $W
  $B/pairdb dev --sync periodic --data-dir $W/data --anti-entropy-period-secs $P > $W/dev.log 2>&1 &
  DEV=$!
  for i in $(seq 1 60); do grep -q "pairdb dev: ready" $W/dev.log && break; sleep 1; done
  $B/pairdb bench --workload A --records 100000 --duration 1s --consistency quorum > $W/load.txt 2>&1
  sleep 5
  m() { curl -s 127.0.0.1:7201/metrics | awk -v n="$1" '$1==n || index($1, n"{")==1 {s+=$2} END {printf "%d", s}'; }
  c0=$(m pairdb_storage_anti_entropy_keys_compared_total); r0=$(m pairdb_storage_anti_entropy_keys_repaired_total); cy0=$(m pairdb_storage_anti_entropy_cycles_total)
  $B/pairdb bench --workload A --records 100000 --skip-load --duration 30s --consistency quorum > $W/bench.txt 2>&1
  c1=$(m pairdb_storage_anti_entropy_keys_compared_total); r1=$(m pairdb_storage_anti_entropy_keys_repaired_total); cy1=$(m pairdb_storage_anti_entropy_cycles_total)
  echo "period=$P: $(grep '^run:' $W/bench.txt) | AE during run: compared $((c1-c0)) repaired $((r1-r0)) cycles $((cy1-cy0))"
  grep -E "^(read|update) " $W/bench.txt
  kill -INT $DEV; wait $DEV
done
