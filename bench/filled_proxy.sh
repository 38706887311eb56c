# Sourced by bench/stats_flood.sh and bench/snapshot_memory.sh: a release proxy
# on CPU 0 in front of a 0 ms fake KeyAPI, filled with 50,000 cached entries
# by wrk on CPU 1. Release builds of keyapi-proxy and examples/bench-fake-upstream
# must exist.
#
#   start_filled_proxy PORT [VAR=VALUE...]   sets W (work dir), UP, PX (pids), P (proxy URL)
#   stop_filled_proxy

start_filled_proxy() {
  local port=$1 target=${CARGO_TARGET_DIR:-target}/release key=bench-key n=50000 fill upurl
  shift
  W=$(mktemp -d)
  taskset -c 0 "$target/examples/bench-fake-upstream" 0 $key >"$W/up.out" 2>/dev/null &
  UP=$!
  sleep 0.5
  upurl=$(head -n1 "$W/up.out")
  taskset -c 0 env RUST_LOG=info KEYAPI_API_KEY=$key KEYAPI_PROXY__UPSTREAM__BASE_URL="$upurl" \
    KEYAPI_PROXY__SERVER__LISTEN=127.0.0.1:$port KEYAPI_PROXY__CACHE__MAX_BYTES=1073741824 \
    "$@" "$target/keyapi-proxy" serve >"$W/proxy.log" 2>&1 &
  PX=$!
  P=http://127.0.0.1:$port
  sleep 0.5
  taskset -c 1 wrk -t1 -c32 -d300s --timeout 10s -s bench/keys.lua "$P" -- seq f $n 1 >/dev/null 2>&1 &
  fill=$!
  for _ in $(seq 3000); do [ "$(curl -s "$upurl/__fake/calls")" -ge $n ] && break; sleep 0.1; done
  kill -INT $fill
  wait $fill 2>/dev/null
}

stop_filled_proxy() {
  kill -TERM "$PX"
  wait "$PX"
  kill "$UP"
  wait "$UP" 2>/dev/null
  rm -rf "$W"
}
