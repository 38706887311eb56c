#!/usr/bin/env bash
# Peak RSS around a periodic snapshot of 50,000 cached entries. Release builds
# of keyapi-proxy and examples/bench-fake-upstream must exist.
set -u
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release KEY=bench-key P=http://127.0.0.1:18951 N=50000
W=$(mktemp -d)
taskset -c 0 "$T/examples/bench-fake-upstream" 0 $KEY >"$W/up.out" 2>/dev/null &
UP=$!
sleep 0.5
UPURL=$(head -n1 "$W/up.out")
taskset -c 0 env RUST_LOG=info KEYAPI_API_KEY=$KEY KEYAPI_PROXY__UPSTREAM__BASE_URL="$UPURL" \
  KEYAPI_PROXY__SERVER__LISTEN=${P#http://} KEYAPI_PROXY__CACHE__MAX_BYTES=1073741824 \
  KEYAPI_PROXY__CACHE__SNAPSHOT_PATH="$W/cache.snap" KEYAPI_PROXY__CACHE__SNAPSHOT_INTERVAL=20s \
  "$T/keyapi-proxy" serve >"$W/proxy.log" 2>&1 &
PX=$!
sleep 0.5
taskset -c 1 wrk -t1 -c32 -d300s --timeout 10s -s bench/keys.lua $P -- seq f $N 1 >/dev/null 2>&1 &
FILL=$!
for _ in $(seq 3000); do [ "$(curl -s "$UPURL/__fake/calls")" -ge $N ] && break; sleep 0.1; done
kill -INT $FILL; wait $FILL 2>/dev/null
mem() { grep -E 'VmRSS|VmHWM' "/proc/$PX/status" | tr -s ' \t\n' ' '; }
echo "after the fill: $(mem)"
n0=$(grep -c 'snapshot written' "$W/proxy.log")
for _ in $(seq 400); do [ "$(grep -c 'snapshot written' "$W/proxy.log")" -gt "$n0" ] && break; sleep 0.1; done
echo "after a periodic snapshot: $(mem) file $(stat -c %s "$W/cache.snap") bytes"
kill -TERM $PX; wait $PX
kill $UP; wait $UP 2>/dev/null
rm -rf "$W"
