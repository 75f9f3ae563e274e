#!/bin/bash
# Two builds of `pairdb` side by side in one sitting: for each round, `pairdb dev --sync periodic`
# with build OLD then build NEW, workload A (50,000 x 1 KiB loaded, 20 s) then W (20 s), RF 3, QUORUM,
# 64 clients; the gRPC floor (../shared/bench/floor.sh) before and after. Prints one line per run.
#   deploy/bench/side-by-side.sh OLD_PAIRDB NEW_PAIRDB [ROUNDS]
# OLD_DEV_ARGS / NEW_DEV_ARGS add flags to each side's `pairdb dev` (one build against itself, e.g.
# NEW_DEV_ARGS=--insecure-cluster to price cluster authentication).
# Uses the dev ports 7000, 7100, 7201-7203. Numbers and how they were read: docs/benchmarks.md.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
floor() { SECS=10 bash "$here/../../../shared/bench/floor.sh" | grep '"channels":4'; }
one() {
  local bin=$1 label=$2 args=$3 dir
  dir=$(mktemp -d)
  (cd "$dir" && exec "$bin" dev --sync periodic $args > dev.log 2>&1) &
  local dev=$!
  for _ in $(seq 1 100); do grep -q "ready in" "$dir/dev.log" 2>/dev/null && break; sleep 0.2; done
  "$bin" --output json bench --workload A --records 50000 --duration 20s --consistency quorum > "$dir/a.json"
  "$bin" --output json bench --workload W --records 50000 --skip-load --duration 20s --consistency quorum > "$dir/w.json"
  kill -INT $dev; wait $dev
  for w in a w; do
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["run"]; print(sys.argv[2], sys.argv[3], r["throughput_ops_per_sec"], "ops/s", "errors", r["errors"], {k: v["latency_ms"]["p99"] for k, v in r["per_operation"].items()})' "$dir/$w.json" "$label" "$w"
  done
  rm -rf "$dir"
}
echo "floor before: $(floor)"
for _ in $(seq 1 "$ROUNDS"); do one "$NEW" new "${NEW_DEV_ARGS:-}"; one "$OLD" old "${OLD_DEV_ARGS:-}"; done
echo "floor after: $(floor)"
