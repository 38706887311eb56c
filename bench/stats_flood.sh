#!/usr/bin/env bash
# Hit latency while 16 connections flood /stats, against a control flood of
# /healthz, three rounds, with 50,000 cached entries (see bench/filled_proxy.sh).
# Prints wrk's BENCH lines.
set -u
cd "$(dirname "$0")/.."
. bench/filled_proxy.sh
start_filled_proxy 18950
H="$P/v1/tiktok/trending/hashtag/detail?hashtag_name=f7"
curl -s -o /dev/null "$H"
for r in 1 2 3; do
  for path in healthz stats; do
    taskset -c 1 wrk -t1 -c16 -d7s "$P/$path" >"$W/flood.txt" 2>&1 &
    F=$!
    sleep 1
    taskset -c 1 wrk -t1 -c64 -d5s -s bench/report.lua "$H" | grep BENCH | sed "s|^|hits during /$path flood $r: |"
    wait $F
    echo "  /$path during the flood: $(awk '/Requests\/sec/ {print $2}' "$W/flood.txt") req/s"
  done
done
stop_filled_proxy
