#!/usr/bin/env python3
"""Scenario 4 of bench/run.sh: N concurrent cold requests over K keys.

Opens every connection first, then releases all requests at once, so they
reach the proxy while the first fetch of each key is still in flight (the
fake upstream is slow on purpose). Prints one machine-readable line:

    BENCH requests=.. ok=.. errors=.. stored=.. collapsed=.. hit=.. elapsed_ms=..

Standard library only. Usage: stampede.py HOST:PORT PREFIX [N] [K]
"""

import asyncio
import collections
import sys
import time

PATH = "/v1/tiktok/trending/hashtag/detail?hashtag_name="


async def one(host, port, path, go, outcomes):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        outcomes["error:connect"] += 1
        print(f"connect failed: {e}", file=sys.stderr)
        return
    try:
        await go.wait()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await reader.read()
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        status = head[0].split(" ")[1] if head and " " in head[0] else "?"
        if status != "200":
            outcomes[f"error:status {status}"] += 1
            return
        cache = next(
            (h.split(":", 1)[1] for h in head[1:] if h.lower().startswith("cache-status:")),
            "",
        )
        state = next(
            (s for s in ("stored", "collapsed", "hit") if s in cache), "other"
        )
        outcomes[state] += 1
    except (OSError, IndexError) as e:
        outcomes["error:io"] += 1
        print(f"request failed: {e!r}", file=sys.stderr)
    finally:
        writer.close()


async def main():
    addr, prefix = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    k = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    host, port = addr.rsplit(":", 1)
    go = asyncio.Event()
    outcomes = collections.Counter()
    tasks = [
        asyncio.create_task(one(host, int(port), f"{PATH}{prefix}{i % k}", go, outcomes))
        for i in range(n)
    ]
    # Let every connection open before any request is sent.
    await asyncio.sleep(1.0)
    started = time.monotonic()
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    elapsed_ms = (time.monotonic() - started) * 1000
    errors = sum(v for key, v in outcomes.items() if key.startswith("error"))
    ok = sum(outcomes[s] for s in ("stored", "collapsed", "hit", "other"))
    for key, v in sorted(outcomes.items()):
        if key.startswith("error"):
            print(f"{key}: {v}", file=sys.stderr)
    print(
        f"BENCH requests={n} ok={ok} errors={errors} stored={outcomes['stored']} "
        f"collapsed={outcomes['collapsed']} hit={outcomes['hit']} elapsed_ms={elapsed_ms:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
