#!/bin/bash
# PutMany against single puts (issue 19), one `pairdb` build in one sitting: `pairdb dev --sync
# periodic` (RF 3, QUORUM, 1 KiB values, 100,000 records).
#  1. single puts (workload W) at CONC clients;
#  2. PutMany of 100 items (workload P) at the same CONC clients: items/s against 1;
#  3. single puts at 16 clients alone, then again while 16 clients send 100-item PutMany batches:
#     the p99 of single puts with batches running.
#   deploy/bench/batches.sh PAIRDB [SECS] [CONC]
# Uses the dev ports 7000, 7100, 7201-7203. Numbers and how they were read: docs/benchmarks.md.
set -u
BIN=$1; SECS=${2:-20}; CONC=${3:-64}
summary() {
  python3 -c '
import json,sys
r=json.load(open(sys.argv[1]))["run"]; o=r["per_operation"]
for op,v in o.items():
    l=v["latency_ms"]; print(sys.argv[2], op, r["throughput_ops_per_sec"], "ops/s", "items/s", r.get("batched_items_per_sec") or r["throughput_ops_per_sec"], "p50", l["p50"], "p99", l["p99"], "ms", "errors", r["errors"])
' "$1" "$2"
}
bench() { # name, workload, concurrency, extra...
  local name=$1 workload=$2 conc=$3; shift 3
  "$BIN" --output json bench --workload "$workload" --skip-load --records 100000 --concurrency "$conc" \
    --duration "${SECS}s" --consistency quorum --distribution uniform "$@" > "$dir/$name.json"
}
dir=$(mktemp -d)
(cd "$dir" && exec "$BIN" dev --sync periodic > dev.log 2>&1) &
dev=$!
for _ in $(seq 1 100); do grep -q "ready in" "$dir/dev.log" 2>/dev/null && break; sleep 0.2; done
"$BIN" --output json bench --workload W --records 100000 --operations 1 --concurrency 64 > "$dir/load.json"
bench single W "$CONC"; summary "$dir/single.json" "single-puts-$CONC"
bench batched P "$CONC" --batch-size 100; summary "$dir/batched.json" "putmany100-$CONC"
python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["run"]; b=json.load(open(sys.argv[2]))["run"]; print("PutMany items/s over single puts: %.2fx" % (b["batched_items_per_sec"]/a["throughput_ops_per_sec"]))' "$dir/single.json" "$dir/batched.json"
bench alone W 16; summary "$dir/alone.json" "single-puts-16-alone"
bench beside W 16 & single=$!
bench background P 16 --batch-size 100 --seed 7
wait $single
summary "$dir/beside.json" "single-puts-16-beside-batches"; summary "$dir/background.json" "putmany100-16-beside"
kill -INT $dev; wait $dev
rm -rf "$dir"
