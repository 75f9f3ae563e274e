#!/bin/bash
# Isolation of a listing from other tenants' data (issue 18), one `pairdb` build in one sitting:
# `pairdb dev --sync periodic` (RF 3); tenant `small` of 1,000 keys listed whole (workload L, one page
# of 1,000 keys, 1 worker, ONE) with no other data, then again after tenant `others` got OTHER_KEYS
# keys (default 1,000,000 x 100 B). Prints both runs and the ratio of their mean page times.
#   deploy/bench/neighbours.sh PAIRDB [OTHER_KEYS] [SECS]
# Uses the dev ports 7000, 7100, 7201-7203. Numbers and how they were read: docs/benchmarks.md.
set -u
BIN=$1; OTHERS=${2:-1000000}; SECS=${3:-15}
summary() {
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["run"]; o=r["per_operation"]; l=next(iter(o.values()))["latency_ms"]; print(sys.argv[2], r["throughput_ops_per_sec"], "pages/s", "p50", l["p50"], "p99", l["p99"], "ms", "errors", r["errors"])' "$1" "$2"
}
list_small() {
  "$BIN" --tenant small --output json bench --workload L --skip-load --records 1000 --concurrency 1 \
    --duration "${SECS}s" --consistency one > "$dir/$1.json"
  summary "$dir/$1.json" "$1"
}
dir=$(mktemp -d)
(cd "$dir" && exec "$BIN" dev --sync periodic > dev.log 2>&1) &
dev=$!
for _ in $(seq 1 100); do grep -q "ready in" "$dir/dev.log" 2>/dev/null && break; sleep 0.2; done
"$BIN" tenant create small > /dev/null
"$BIN" tenant create others > /dev/null
"$BIN" --tenant small --output json bench --workload W --records 1000 --operations 1 > /dev/null
list_small alone
started=$(date +%s)
"$BIN" --tenant others --output json bench --workload W --records "$OTHERS" --value-size 100 \
  --operations 1 > "$dir/load.json"
echo "loaded $OTHERS keys of tenant others in $(( $(date +%s) - started )) s"
list_small beside-others
python3 -c 'import json,sys; a,b=(json.load(open(f))["run"]["throughput_ops_per_sec"] for f in sys.argv[1:]); print("mean page time ratio (beside others / alone): %.2f" % (a/b))' \
  "$dir/alone.json" "$dir/beside-others.json"
kill -INT $dev; wait $dev
rm -rf "$dir"
