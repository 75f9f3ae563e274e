#!/bin/bash
# Listing benchmarks of one `pairdb` build in one sitting (issue 18): `pairdb dev --sync periodic`
# (RF 3), a tenant `big` of 100,000 x 1 KiB keys; listing throughput (workload L, pages of 1,000
# keys) at ONE and at QUORUM; workload A on tenant `demo` (10,000 keys, 64 clients, QUORUM) alone
# and while 2 workers scan `big` over and over (workload S). The gRPC floor before and after.
#   deploy/bench/listing.sh PAIRDB [SECS]
# Uses the dev ports 7000, 7100, 7201-7203. Numbers and how they were read: docs/benchmarks.md.
set -u
BIN=$1; SECS=${2:-20}
here=$(cd "$(dirname "$0")" && pwd)
floor() { SECS=10 bash "$here/../../../shared/bench/floor.sh" | grep '"channels":4'; }
summary() {
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["run"]; print(sys.argv[2], r["throughput_ops_per_sec"], "ops/s", r["listed_keys_per_sec"], "keys/s", "errors", r["errors"], {k: v["latency_ms"]["p99"] for k, v in r["per_operation"].items()})' "$1" "$2"
}
echo "floor before: $(floor)"
dir=$(mktemp -d)
(cd "$dir" && exec "$BIN" dev --sync periodic > dev.log 2>&1) &
dev=$!
for _ in $(seq 1 100); do grep -q "ready in" "$dir/dev.log" 2>/dev/null && break; sleep 0.2; done
"$BIN" tenant create big > /dev/null
"$BIN" --tenant big --output json bench --workload W --records 100000 --operations 1 > "$dir/load.json"
for level in one quorum; do
  "$BIN" --tenant big --output json bench --workload L --skip-load --records 100000 --concurrency 4 \
    --duration "${SECS}s" --consistency "$level" > "$dir/l-$level.json"
  summary "$dir/l-$level.json" "list-$level"
done
"$BIN" --output json bench --workload A --records 10000 --duration "${SECS}s" --consistency quorum > "$dir/a-alone.json"
summary "$dir/a-alone.json" "A-alone"
"$BIN" --tenant big --output json bench --workload S --skip-load --records 100000 --concurrency 2 \
  --duration "$((SECS + 5))s" > "$dir/scan.json" &
scan=$!
sleep 2
"$BIN" --output json bench --workload A --records 10000 --skip-load --duration "${SECS}s" --consistency quorum > "$dir/a-scan.json"
wait $scan
summary "$dir/a-scan.json" "A-during-scan"
summary "$dir/scan.json" "scan"
kill -INT $dev; wait $dev
rm -rf "$dir"
echo "floor after: $(floor)"
