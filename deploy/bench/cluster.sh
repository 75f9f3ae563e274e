#!/bin/bash
# The performance issue's shape, one build in one sitting: meta (SQLite) + 3 storage nodes + 1 router
# as separate release processes with cluster authentication on, `--sync SYNC` (periodic by default),
# RF 3, QUORUM, 1 KiB values, 64 clients, closed loop; the gRPC floor before and after each workload
# (`pairdb bench --ratio-to-floor`). Prints one JSON summary line per workload.
#   deploy/bench/cluster.sh BIN_DIR [SECS] [RECORDS]
# BIN_DIR holds pairdb, pairdb-meta, pairdb-storage, pairdb-router (e.g. target/release).
# ROUTER_ARGS adds router flags (e.g. --coalesce-after-in-flight 0); WORKLOADS (default "W C") the
# run workloads after the load phase; SYNC=always for fsync per group commit; RATE=N runs each
# workload open loop at N ops/s instead; CONC (default 64) sets the clients; WARM=SECS runs
# unreported closed-loop updates before the workloads. Uses ports 7000, 7100, 7201-7203.
set -u
B=$(cd "$1" && pwd); SECS=${2:-20}; RECORDS=${3:-100000}
# The bench client (PAIRDB_CLI): another build's `pairdb` may drive an older server build.
CLI=${PAIRDB_CLI:-$B/pairdb}
SYNC=${SYNC:-periodic}; WORKLOADS=${WORKLOADS:-W C}
here=$(cd "$(dirname "$0")" && pwd)
floor_sh=$(cd "$here/../../.." && pwd)/shared/bench/floor.sh
W=$(mktemp -d)
trap 'kill -INT $(jobs -p) 2>/dev/null; wait; rm -rf "$W"' EXIT
export PAIRDB_ADMIN_TOKEN=bench-admin-token
$B/pairdb cluster init --out $W/cluster --storage-nodes 3 > /dev/null
$B/pairdb-meta --listen-addr 127.0.0.1:7100 --data-dir $W/meta --auto-add-nodes \
  --cluster-secret-file $W/cluster/cluster-secret > $W/meta.log 2>&1 &
for _ in $(seq 1 100); do $B/pairdb health 127.0.0.1:7100 > /dev/null 2>&1 && break; sleep 0.2; done
for i in 1 2 3; do
  $B/pairdb-storage --node-id $i --meta-addr 127.0.0.1:7100 --listen-addr 127.0.0.1:720$i \
    --data-dir $W/n$i --sync $SYNC --cluster-credential-file $W/cluster/node-$i.credential > $W/n$i.log 2>&1 &
done
$B/pairdb-router --listen-addr 127.0.0.1:7000 --meta-addr 127.0.0.1:7100 --no-auth \
  --cluster-credential-file $W/cluster/router.credential ${ROUTER_ARGS:-} > $W/router.log 2>&1 &
for _ in $(seq 1 100); do
  $B/pairdb health 127.0.0.1:7201 127.0.0.1:7202 127.0.0.1:7203 127.0.0.1:7000 > /dev/null 2>&1 && break; sleep 0.2
done
# The nodes answer health before meta has put all three in the ring: retry until RF 3 is allowed.
for _ in $(seq 1 100); do $B/pairdb tenant create demo --replication-factor 3 > /dev/null 2>&1 && break; sleep 0.2; done
sleep 2
summary() {
  python3 -c '
import json,sys
r=json.load(open(sys.argv[1])); f=r.get("floor") or {}
for phase in ("load","run"):
    p=r.get(phase)
    if not p: continue
    lat={k: (v["latency_ms"]["p50"], v["latency_ms"]["p99"]) for k,v in p["per_operation"].items()}
    print(json.dumps({"workload": sys.argv[2], "phase": phase, "ops_per_sec": p["throughput_ops_per_sec"],
      "ratio_to_floor": (f.get("ratio") or {}).get(phase), "echo_rpc_per_sec": f.get("echo_rpc_per_sec"),
      "p50_p99_ms": lat, "errors": p["errors"]}))
' "$1" "$2"
}
rate=${RATE:+--target-rate $RATE}
# FLOOR=0 leaves the floor out (e.g. while profiling).
floor_arg="--ratio-to-floor $floor_sh"; [ "${FLOOR:-1}" = 0 ] && floor_arg=""
$CLI --output json bench --workload W --records $RECORDS --operations 1 --consistency quorum \
  --distribution uniform $floor_arg > $W/load.json
summary $W/load.json load
# WARM=SECS first runs closed-loop updates for SECS (unreported), so the workloads meet nodes that
# have been taking writes for a while (full memtables, flushes and compactions under way).
if [ "${WARM:-0}" != 0 ]; then
  $CLI --output json bench --workload W --records $RECORDS --skip-load --duration ${WARM}s \
    --concurrency ${CONC:-64} --consistency quorum --distribution uniform > /dev/null
fi
for w in $WORKLOADS; do
  $CLI --output json bench --workload $w --records $RECORDS --skip-load --duration ${SECS}s \
    --concurrency ${CONC:-64} --consistency quorum --distribution uniform $floor_arg $rate > $W/$w.json
  summary $W/$w.json $w
done
