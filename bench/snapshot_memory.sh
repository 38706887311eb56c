#!/usr/bin/env bash
# Peak RSS around a periodic snapshot of 50,000 cached entries (see
# bench/filled_proxy.sh).
set -u
cd "$(dirname "$0")/.."
. bench/filled_proxy.sh
SNAP=$(mktemp -d)
start_filled_proxy 18951 KEYAPI_PROXY__CACHE__SNAPSHOT_PATH="$SNAP/cache.snap" \
  KEYAPI_PROXY__CACHE__SNAPSHOT_INTERVAL=20s
mem() { grep -E 'VmRSS|VmHWM' "/proc/$PX/status" | tr -s ' \t\n' ' '; }
echo "after the fill: $(mem)"
n0=$(grep -c 'snapshot written' "$W/proxy.log")
for _ in $(seq 400); do [ "$(grep -c 'snapshot written' "$W/proxy.log")" -gt "$n0" ] && break; sleep 0.1; done
echo "after a periodic snapshot: $(mem) file $(stat -c %s "$SNAP/cache.snap") bytes"
stop_filled_proxy
rm -rf "$SNAP"
