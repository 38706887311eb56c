#!/usr/bin/env bash
# Repeatable cost of one cache hit: user-space instructions and heap
# allocations per request, proxy vs the bare hyper server (bench/bare_hyper.rs)
# and the axum baseline (bench/baseline.rs), counted by valgrind's callgrind
# (so the figures do not depend on machine load, unlike bench/run.sh). Use it
# to check a hit-path change; see docs/performance.md. Targets (issue 14): at most
# 2.5x the bare server's instructions and 10 allocations per hit.
#
#   bash bench/profile.sh
#
# Needs valgrind, wrk, curl, python3 (and the release binaries bench/run.sh
# builds). The callgrind files stay in target/bench-profile/ for
#   callgrind_annotate --inclusive=yes target/bench-profile/proxy.out | less
# Environment: PROFILE_SECONDS (load per server, default 10),
# PROFILE_MALLOC (an allocator library to LD_PRELOAD into the proxy, e.g.
# /usr/lib/x86_64-linux-gnu/libmimalloc.so.2, to see what it would save),
# PROFILE_FIGURES (a file to append name=value figures to, for bench/run.sh),
# PROFILE_ONLY=proxy (skip the two references, whose counts do not change
# with the proxy's code: for quick before/after checks), PROFILE_PROXY_BIN
# (count another build of the proxy, e.g. target/pgo/keyapi-proxy from
# bench/pgo.sh), PROFILE_BARE_BIN (likewise for bare hyper),
# PROFILE_CACHE_SIM=1 (simulate the caches too and print the first-level
# instruction-cache misses per request: a hit's code that does not fit),
# PROFILE_TRACES=1 (the proxy with [telemetry] on, sample_ratio 1.0, exporting
# every hit's span to bench/otlp_sink.py: what tracing costs a hit).

set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

SECONDS_PER_RUN=${PROFILE_SECONDS:-10}
KEY=bench-key-not-a-secret
HIT=/v1/tiktok/trending/hashtag/detail?hashtag_name=ufc324
OUT=${CARGO_TARGET_DIR:-target}/bench-profile
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in cargo curl python3 valgrind callgrind_control wrk; do
  command -v "$tool" >/dev/null || { echo "profile.sh: $tool is required" >&2; exit 1; }
done

cargo build --release --quiet --bin keyapi-proxy
cargo build --release --quiet --example bench-baseline --example bench-bare-hyper \
  --example bench-fake-upstream
TARGET=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$OUT" "$WORK/bin"
cp "$TARGET/keyapi-proxy" "$TARGET/examples/bench-baseline" "$TARGET/examples/bench-bare-hyper" \
  "$TARGET/examples/bench-fake-upstream" "$WORK/bin/"

taskset -c 0 "$WORK/bin/bench-fake-upstream" 0 "$KEY" >"$WORK/upstream.out" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$WORK/upstream.out" ] && break; sleep 0.1; done
UPSTREAM_URL=$(head -n1 "$WORK/upstream.out")

# profile NAME PORT [VAR=VALUE...] -- COMMAND...: runs COMMAND under callgrind
# (instrumentation off until the load starts) with the given environment,
# puts $SECONDS_PER_RUN s of hits on it, and prints "NAME requests
# instructions allocations".
profile() {
  local name=$1 port=$2 pid requests vars=()
  shift 2
  while [ "$1" != -- ]; do
    vars+=("$1")
    shift
  done
  shift
  local cache_sim=no
  [ "${PROFILE_CACHE_SIM:-0}" = 1 ] && cache_sim=yes
  env ${vars[@]+"${vars[@]}"} taskset -c 0 valgrind --tool=callgrind --instr-atstart=no \
    --cache-sim=$cache_sim \
    --callgrind-out-file="$OUT/$name.out" "$@" >/dev/null 2>"$WORK/$name.err" &
  pid=$!
  PIDS+=("$pid")
  wait_ok "http://127.0.0.1:$port$HIT"
  curl -fsS -o /dev/null "http://127.0.0.1:$port$HIT" # now a hit for the proxy
  rm -f "$OUT/$name.out.1"
  # Valgrind reads these commands when the server next runs: the requests
  # themselves wake it up, and a last probe makes it take the dump.
  callgrind_control -i on "$pid" >/dev/null 2>&1
  taskset -c 1 wrk -t1 -c8 -d"${SECONDS_PER_RUN}s" -s bench/report.lua \
    "http://127.0.0.1:$port$HIT" >"$WORK/$name.wrk"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  for _ in $(seq 300); do
    [ -s "$OUT/$name.out.1" ] && grep -q '^totals:' "$OUT/$name.out.1" && break
    curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null || true
    sleep 0.1
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  requests=$(sed -n 's/^BENCH requests=\([0-9]*\).*/\1/p' "$WORK/$name.wrk")
  python3 - "$OUT/$name.out.1" "$name" "$requests" <<'EOF'
import re, sys
path, name, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Entry points of glibc and of mimalloc (the crate calls the *_aligned ones);
# calls between them (a preloaded malloc calling mi_malloc) are not counted twice.
ALLOC = {"malloc", "calloc", "realloc", "mi_malloc", "mi_calloc", "mi_zalloc", "mi_realloc",
         "mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"}
names, total, i1_misses, allocs, caller, callee = {}, 0, "-", 0, None, None
for line in open(path):
    if line.startswith("events:"):
        events = line.split()[1:]
    if line.startswith("totals:"):
        totals = dict(zip(events, map(int, line.split()[1:])))
        total = totals["Ir"]
        if "I1mr" in totals:
            i1_misses = f"{totals['I1mr'] / requests:.1f}"
    m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3)
        if m.group(1):
            callee = names.get(m.group(2))
        else:
            caller, callee = names.get(m.group(2)), None
        continue
    m = re.match(r"calls=(\d+)", line)
    if m and callee in ALLOC and caller not in ALLOC and not (caller or "").startswith(("mi_", "_mi_")):
        allocs += int(m.group(1))
print(f"{name} {requests} {total} {allocs} {i1_misses}")
EOF
}

port=$(free_port)
proxy_env=(RUST_LOG=warn KEYAPI_API_KEY="$KEY" KEYAPI_PROXY__UPSTREAM__BASE_URL="$UPSTREAM_URL"
  KEYAPI_PROXY__SERVER__LISTEN="127.0.0.1:$port")
[ -z "${PROFILE_MALLOC:-}" ] || proxy_env+=(LD_PRELOAD="$PROFILE_MALLOC")
if [ "${PROFILE_TRACES:-0}" = 1 ]; then
  sink_port=$(free_port)
  python3 bench/otlp_sink.py "$sink_port" >"$WORK/otlp_sink.out" &
  PIDS+=($!)
  proxy_env+=(KEYAPI_PROXY__TELEMETRY__OTLP_ENDPOINT="http://127.0.0.1:$sink_port/v1/traces"
    KEYAPI_PROXY__TELEMETRY__SAMPLE_RATIO=1.0)
fi
profile proxy "$port" "${proxy_env[@]}" -- "${PROFILE_PROXY_BIN:-$WORK/bin/keyapi-proxy}" serve >"$WORK/proxy.row"
ROWS=("$(cat "$WORK/proxy.row")")
if [ "${PROFILE_ONLY:-}" != proxy ]; then
  port=$(free_port)
  profile bare "$port" -- "${PROFILE_BARE_BIN:-$WORK/bin/bench-bare-hyper}" "127.0.0.1:$port" >"$WORK/bare.row"
  port=$(free_port)
  profile baseline "$port" -- "$WORK/bin/bench-baseline" "127.0.0.1:$port" >"$WORK/baseline.row"
  ROWS+=("$(cat "$WORK/bare.row")" "$(cat "$WORK/baseline.row")")
fi

python3 - "${PROFILE_MALLOC:-}" "${PROFILE_FIGURES:-}" "${ROWS[@]}" <<'EOF'
import sys
malloc, figures = sys.argv[1], sys.argv[2]
rows = [line.split() for line in sys.argv[3:]]
if figures:
    with open(figures, "a", encoding="utf-8") as f:
        for name, requests, total, allocs, _ in rows:
            n = int(requests)
            f.write(f"profile_{name}_requests={n}\n")
            f.write(f"profile_{name}_instructions={int(total) / n:.0f}\n")
            f.write(f"profile_{name}_allocations={int(allocs) / n:.1f}\n")
print("| server | requests | instructions / request | allocations / request | L1i misses / request |")
print("| --- | ---: | ---: | ---: | ---: |")
per, alloc = {}, {}
for name, requests, total, allocs, i1_misses in rows:
    n = int(requests)
    per[name], alloc[name] = int(total) / n, int(allocs) / n
    print(f"| {name} | {n:,} | {per[name]:,.0f} | {alloc[name]:.1f} | {i1_misses} |")
if malloc:
    print(f"\n(proxy with LD_PRELOAD={malloc})")
verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
if "bare" in per:
    ratio = per["proxy"] / per["bare"]
    print(f"\nproxy / bare hyper instructions: {ratio:.2f} (target <= 2.5: {verdict(ratio <= 2.5)})")
    print(f"proxy / axum baseline instructions: {per['proxy'] / per['baseline']:.2f}")
print(f"proxy allocations per hit: {alloc['proxy']:.1f} (target <= 10: {verdict(alloc['proxy'] <= 10)})")
print("User space only; the kernel's share (loopback TCP) is the same for all.")
EOF
