#!/usr/bin/env bash
# Peak memory of one pod as deploy/kubernetes/base configures it (cache.max_bytes
# = 128 MiB, snapshots on): a release proxy with that config.toml (Redis left
# out) in front of a 0 ms fake KeyAPI, filled past its capacity with distinct
# questions, each asked again with `Accept-Encoding: gzip` (the entry's gzip form
# is made then), and stopped with SIGTERM (the final snapshot is written). Prints
# VmRSS and VmHWM (the peak) beside the container's limit, 192 MiB.
#
#   bash bench/pod_memory.sh [KEYS]        KEYS distinct questions (default 40000)
#
# Needs release builds of keyapi-proxy and examples/bench-fake-upstream, wrk, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
n=${1:-40000}
target=${CARGO_TARGET_DIR:-target}/release
key=bench-key-not-a-secret
W=$(mktemp -d)
trap 'kill $UP $PX 2>/dev/null || true; rm -rf "$W"' EXIT
taskset -c 0 "$target/examples/bench-fake-upstream" 0 $key >"$W/up.out" 2>/dev/null &
UP=$!
for _ in $(seq 50); do [ -s "$W/up.out" ] && break; sleep 0.1; done
upurl=$(head -n1 "$W/up.out")
# The pod's config.toml without its Redis address and log format, the snapshot in $W.
sed -e '/^\[cache.redis\]/,/^url/d' -e '/^\[log\]/,$d' \
  -e "s|^snapshot_path = .*|snapshot_path = \"$W/cache.snap\"|" \
  deploy/kubernetes/base/config.toml >"$W/config.toml"
port=$(free_port)
taskset -c 0 env RUST_LOG=warn KEYAPI_API_KEY=$key KEYAPI_PROXY__UPSTREAM__BASE_URL="$upurl" \
  KEYAPI_PROXY__SERVER__LISTEN=127.0.0.1:$port KEYAPI_PROXY__SERVER__DRAIN_DELAY=0s \
  "$target/keyapi-proxy" --config "$W/config.toml" serve >"$W/proxy.log" 2>&1 &
PX=$!
P=http://127.0.0.1:$port
for _ in $(seq 100); do curl -fsS -o /dev/null "$P/healthz" 2>/dev/null && break; sleep 0.1; done
mem() { grep -E 'VmRSS|VmHWM' "/proc/$PX/status" | tr -s ' \t\n' ' '; }
echo "idle: $(mem)"
served() { curl -fsS "$P/metrics" | awk '/^keyapi_proxy_requests_total/ { n += $2 } END { print n + 0 }'; }
# fill [WRK_ARGS...]: every question once (wrk's `seq` stops asking but not
# running), until the proxy has answered n more requests.
fill() {
  local want=$(($(served) + n))
  taskset -c 1 wrk -t1 -c32 -d600s --timeout 10s "$@" -s bench/keys.lua "$P" -- seq p "$n" 1 >"$W/wrk.txt" 2>&1 &
  local wrk_pid=$!
  while [ "$(served)" -lt "$want" ]; do sleep 0.2; done
  kill -INT $wrk_pid
  wait $wrk_pid 2>/dev/null || true
}
fill
echo "after $n questions: $(mem)"
fill -H "Accept-Encoding: gzip"
echo "after each asked again with gzip: $(mem)"
echo "upstream calls: $(curl -fsS "$upurl/__fake/calls"); cache: $(curl -fsS "$P/metrics" | grep -E '^keyapi_proxy_cache_(entries|bytes)' | tr '\n' ' ')"
hwm_before=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PX/status")
kill -TERM $PX
# VmHWM of the exiting process: sampled until it is gone (the snapshot is written on the way out).
peak=$hwm_before
while kill -0 $PX 2>/dev/null; do
  v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PX/status" 2>/dev/null || true)
  [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v
  sleep 0.05
done
echo "peak RSS (VmHWM) through the final snapshot: $((peak / 1024)) MiB of the 192 MiB limit; snapshot $(stat -c %s "$W/cache.snap" 2>/dev/null || echo 0) bytes"
