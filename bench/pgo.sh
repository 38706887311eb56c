#!/usr/bin/env bash
# Profile-guided builds (PGO) of the proxy and of the bare hyper reference
# (bench/bare_hyper.rs), for bench/run.sh (BENCH_PGO=1) and for operators who
# want the faster binary. A hit runs through more code than fits the CPU's
# instruction cache; PGO lays the hot path out together (docs/performance.md,
# "Profile-guided builds").
#
#   bash bench/pgo.sh      → target/pgo/keyapi-proxy, target/pgo/bench-bare-hyper
#   PGO_ONLY=proxy bash bench/pgo.sh   → the proxy only (the Dockerfile's PGO=1)
#
# Steps: an instrumented build of both, a training load on each (the proxy:
# 2,000 misses against bench/fake_upstream.rs, then Zipf and one-hot-key hits,
# fresh keys, a few conditional and gzip requests and bad queries; the bare
# server: hits, on one body and on 10,000 copies), their profiles merged with
# llvm-profdata, then a build that uses them. Both binaries get the same
# treatment so that bench/run.sh still compares like with like. Needs: cargo,
# curl, python3, wrk, and rustup's llvm-tools component (installed when
# missing). Takes ~8 min from a fresh clone on 2 cores (~13 min on a slow VM).

set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

TARGET_ROOT=${CARGO_TARGET_DIR:-target}
PGO=$TARGET_ROOT/pgo
# Absolute: the instrumented servers write here from wherever they run.
case $PGO in
  /*) PROFILES=$PGO/profiles ;;
  *) PROFILES=$PWD/$PGO/profiles ;;
esac
KEY=bench-key-not-a-secret
HASHTAG_PATH=/v1/tiktok/trending/hashtag/detail
PIDS=()

log() { printf '[pgo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

profdata() {
  find "$(rustc --print sysroot)" -name llvm-profdata -type f 2>/dev/null | head -n1
}
if [ -z "$(profdata)" ]; then
  log "installing rustup's llvm-tools (llvm-profdata)"
  rustup component add llvm-tools >/dev/null
fi
LLVM_PROFDATA=$(profdata)
[ -n "$LLVM_PROFDATA" ] || { log "llvm-profdata not found"; exit 1; }

# build RUSTFLAGS TARGET_DIR: the proxy on its own (the binary that ships
# must not see the examples' dev-dependency features), then the reference.
build() {
  RUSTFLAGS=$1 CARGO_TARGET_DIR=$2 cargo build --release --locked --quiet --bin keyapi-proxy
  [ "${PGO_ONLY:-}" = proxy ] ||
    RUSTFLAGS=$1 CARGO_TARGET_DIR=$2 cargo build --release --locked --quiet --example bench-bare-hyper
}

# stop PID SIGNAL: ends a server cleanly, which is when it writes its profile.
stop() {
  kill "-$2" "$1"
  wait "$1" || true
}

log "instrumented build"
rm -rf "$PROFILES"
mkdir -p "$PROFILES"
build "-Cprofile-generate=$PROFILES" "$PGO/generate"
cargo build --release --locked --quiet --example bench-fake-upstream
GEN=$PGO/generate/release

log "training the proxy"
# No CPU pinning: a profile counts what ran, not how fast.
"$TARGET_ROOT/release/examples/bench-fake-upstream" 0 "$KEY" >"$PROFILES/upstream.out" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$PROFILES/upstream.out" ] && break; sleep 0.1; done
port=$(free_port)
proxy_url=http://127.0.0.1:$port
LLVM_PROFILE_FILE="$PROFILES/proxy-%p.profraw" RUST_LOG=warn KEYAPI_API_KEY=$KEY \
  KEYAPI_PROXY__UPSTREAM__BASE_URL="$(head -n1 "$PROFILES/upstream.out")" \
  KEYAPI_PROXY__SERVER__LISTEN=127.0.0.1:$port \
  "$GEN/keyapi-proxy" serve >/dev/null 2>&1 &
proxy=$!
PIDS+=("$proxy")
wait_ok "$proxy_url/healthz"
wrk -t1 -c16 -d5s -s bench/keys.lua "$proxy_url" -- seq z 2000 1 >/dev/null
wrk -t1 -c64 -d5s -s bench/keys.lua "$proxy_url" -- zipf z 2000 >/dev/null
wrk -t1 -c64 -d5s "$proxy_url$HASHTAG_PATH?hashtag_name=z0" >/dev/null
wrk -t1 -c16 -d2s -s bench/keys.lua "$proxy_url" -- unique u >/dev/null
for _ in $(seq 50); do
  curl -s -o /dev/null -H 'Accept-Encoding: gzip' -H 'If-None-Match: "x"' \
    "$proxy_url$HASHTAG_PATH?hashtag_name=z1"
  curl -s -o /dev/null "$proxy_url$HASHTAG_PATH?period=9"
done
stop "$proxy" TERM

if [ "${PGO_ONLY:-}" != proxy ]; then
  log "training the bare hyper server"
  # One body for every path, then 10,000 copies picked by key (bench/run.sh's two references).
  for copies in "" 10000; do
    bare_url=http://127.0.0.1:$(free_port)
    LLVM_PROFILE_FILE="$PROFILES/bare-%p.profraw" \
      "$GEN/examples/bench-bare-hyper" "${bare_url#http://}" ${copies:+"$copies"} >/dev/null &
    bare=$!
    PIDS+=("$bare")
    wait_ok "$bare_url/"
    if [ -z "$copies" ]; then
      wrk -t1 -c64 -d5s "$bare_url$HASHTAG_PATH" >/dev/null
    else
      wrk -t1 -c64 -d3s -s bench/keys.lua "$bare_url" -- zipf z 10000 >/dev/null
    fi
    stop "$bare" INT
  done
fi

# One merged profile: the two programs share only hyper and tokio, which
# both trainings exercise the same way.
"$LLVM_PROFDATA" merge -o "$PROFILES/merged.profdata" "$PROFILES"/*.profraw

log "optimized build"
# Cargo does not track the profile's contents: start clean so that nothing is
# built from an older profile.
rm -rf "$PGO/use"
build "-Cprofile-use=$PROFILES/merged.profdata" "$PGO/use"
cp "$PGO/use/release/keyapi-proxy" "$PGO/"
[ "${PGO_ONLY:-}" = proxy ] || cp "$PGO/use/release/examples/bench-bare-hyper" "$PGO/"
log "done: the binaries are in $PGO/"
