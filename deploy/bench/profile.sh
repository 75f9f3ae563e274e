#!/bin/bash
# Where the CPU goes under one workload: runs deploy/bench/cluster.sh (no floor) with BIN_DIR's
# build and, 12 s into the workload, records `perf` (user and kernel stacks, 499 Hz, 10 s) of the
# router, the storage nodes and the bench client; prints the share of samples per process and the
# hottest symbols.
#   deploy/bench/profile.sh BIN_DIR WORKLOAD [RECORDS]
# Needs perf (kernel.perf_event_paranoid <= 2 for processes of one's own). Writes perf.data in a
# temporary directory and prints its path.
set -u
B=$1; WL=$2; RECORDS=${3:-20000}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
FLOOR=0 WORKLOADS=$WL bash "$here/cluster.sh" "$B" 30 "$RECORDS" > "$out/run.log" 2>&1 &
run=$!
for _ in $(seq 1 600); do pgrep -f "bench --workload $WL" > /dev/null && break; sleep 0.2; done
sleep 12
pids=$(pgrep -f "pairdb-(storage|router)|bench --workload $WL" | paste -sd,)
declare -A names
for pid in ${pids//,/ }; do names[$pid]=$(ps -o args= -p "$pid" | cut -c1-60); done
perf record -F 499 -g -p "$pids" -o "$out/perf.data" -- sleep 10 > /dev/null 2>&1
wait $run
cat "$out/run.log"
for pid in ${pids//,/ }; do
  share=$(perf report -i "$out/perf.data" --no-children --pid "$pid" --sort pid -q -g none 2>/dev/null \
    | awk '{s+=$1} END {printf "%.1f", s}')
  echo "$share % of samples: ${names[$pid]}"
done
perf report -i "$out/perf.data" --no-children --sort dso,sym -q -g none 2>/dev/null | head -25
echo "perf data: $out/perf.data"
