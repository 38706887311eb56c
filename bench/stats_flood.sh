#!/usr/bin/env bash
# Hit latency while 16 connections flood /stats, against a control flood of
# /healthz, three rounds, with 50,000 cached entries. Release builds of
# keyapi-proxy and examples/bench-fake-upstream must exist; proxy and upstream
# run on CPU 0, wrk on CPU 1 (as in bench/run.sh). Prints wrk's BENCH lines.
set -u
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release KEY=bench-key P=http://127.0.0.1:18950 N=50000
W=$(mktemp -d)
taskset -c 0 "$T/examples/bench-fake-upstream" 0 $KEY >"$W/up.out" 2>/dev/null &
UP=$!
sleep 0.5
UPURL=$(head -n1 "$W/up.out")
taskset -c 0 env RUST_LOG=warn KEYAPI_API_KEY=$KEY KEYAPI_PROXY__UPSTREAM__BASE_URL="$UPURL" \
  KEYAPI_PROXY__SERVER__LISTEN=${P#http://} KEYAPI_PROXY__CACHE__MAX_BYTES=1073741824 \
  "$T/keyapi-proxy" serve >"$W/proxy.log" 2>&1 &
PX=$!
sleep 0.5
taskset -c 1 wrk -t1 -c32 -d300s --timeout 10s -s bench/keys.lua $P -- seq f $N 1 >/dev/null 2>&1 &
FILL=$!
for _ in $(seq 3000); do [ "$(curl -s "$UPURL/__fake/calls")" -ge $N ] && break; sleep 0.1; done
kill -INT $FILL; wait $FILL 2>/dev/null
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
kill -TERM $PX; wait $PX
kill $UP; wait $UP 2>/dev/null
rm -rf "$W"
