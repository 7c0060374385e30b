#!/bin/bash
# Measures the agent -> server path on this machine (numbers for issue notes):
# `promgate run` (agent + in-process server), two 20 s loads on the same 128k series,
# time until everything is shipped and stored, ship bytes per sample, server commit
# time, store size, then a large remote_read in both response types.
#   cargo build --release --workspace --examples && bash scripts/measure_ship.sh
# Uses ports 38086, 30033, 20416 on 127.0.0.1 and /tmp/promgate-measure.
set -euo pipefail
B="$(cd "$(dirname "$0")/.." && pwd)/target/release"
DIR=/tmp/promgate-measure
rm -rf "$DIR"
"$B/promgate" run --data-dir "$DIR" --listen 127.0.0.1:38086 \
  --server-listen 127.0.0.1:30033 --query-listen 127.0.0.1:20416 >"$DIR.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
sleep 2
sum() { curl -s "127.0.0.1:$1/metrics" | awk -v m="^$2" '$0 ~ m {s+=$2} END {printf "%.0f", s}'; }
drain() {
  while [ "$(sum 38086 promgate_agent_wal_appended_records_total)" != "$(sum 38086 promgate_agent_ship_records_total)" ]; do
    sleep 0.2
  done
}
START=$(( $(date +%s) * 1000 - 3600000 ))
for round in 1 2; do
  T0=$(date +%s.%N)
  "$B/promgate-loadtest" --url http://127.0.0.1:38086/api/v1/prometheus --connections 32 \
    --duration 20 --series 128000 --labels 10 --start-ms "$START" 2>&1 | grep -E "samples acked|latency|compressed"
  T1=$(date +%s.%N); drain; T2=$(date +%s.%N)
  echo "round $round: load $(echo "$T1 - $T0" | bc) s; everything stored $(echo "$T2 - $T0" | bc) s after the start"
  echo "  agent: ship bytes $(sum 38086 promgate_agent_ship_bytes_total), ship samples $(sum 38086 promgate_agent_ship_samples_total), cpu s $(sum 38086 process_cpu_seconds_total), peak rss $(sum 38086 process_max_resident_memory_bytes)"
  echo "  server: samples $(sum 20416 promgate_server_samples_appended_total), commit s $(curl -s 127.0.0.1:20416/metrics | awk '/^promgate_server_commit_seconds_total/ {print $2}'), store on disk $(du -k "$DIR/server/prometheus.redb" | cut -f1) KiB"
  START=$(( START + 400000 ))
done
"$B/examples/remote_read" 127.0.0.1:20416 '.+'
