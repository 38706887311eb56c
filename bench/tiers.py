#!/usr/bin/env python3
"""L2 (Redis) hit latency vs L1 (memory) hit latency, measured on one replica.

Starts redis-server, the benchmark fake upstream (0 ms) and two release proxies
A and B sharing Redis. N distinct keys are fetched through A (stored in Redis);
then B is asked for each key twice, sequentially over one keep-alive
connection: the first answer is an L2 hit (Redis GET, decode, fill L1), the
second an L1 hit. Prints p50/p90/p99 of both and the overhead.

Usage: bench/tiers.py [N]   (after `cargo build --release --examples`)
"""

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
KEY = "bench-key"
ROUTE = "/v1/tiktok/trending/hashtag/detail?hashtag_name="


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not on PATH")
    procs = []
    try:
        redis_port = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL))
        wait_port(redis_port)
        fake = subprocess.Popen([os.path.join(RELEASE, "examples", "bench-fake-upstream"), "0", KEY],
                                stdout=subprocess.PIPE, text=True)
        procs.append(fake)
        base_url = fake.stdout.readline().strip()
        ports = []
        for _ in range(2):
            port = free_port()
            env = dict(os.environ,
                       KEYAPI_API_KEY=KEY,
                       RUST_LOG="warn",
                       KEYAPI_PROXY__SERVER__LISTEN=f"127.0.0.1:{port}",
                       KEYAPI_PROXY__UPSTREAM__BASE_URL=base_url,
                       KEYAPI_PROXY__CACHE__REDIS__URL=f"redis://127.0.0.1:{redis_port}")
            procs.append(subprocess.Popen([os.path.join(RELEASE, "keyapi-proxy")], env=env,
                                          stdout=subprocess.DEVNULL))
            wait_port(port)
            ports.append(port)
        a = http.client.HTTPConnection("127.0.0.1", ports[0])
        b = http.client.HTTPConnection("127.0.0.1", ports[1])

        def get(conn, tag):
            start = time.perf_counter()
            conn.request("GET", ROUTE + tag)
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - start
            return elapsed * 1e6, response.getheader("cache-status")

        for i in range(n):
            _, status = get(a, f"tier{i}")
            assert status.endswith("stored"), status
        l2, l1 = [], []
        for i in range(n):
            t, status = get(b, f"tier{i}")
            assert "; hit;" in status, status
            l2.append(t)
            t, status = get(b, f"tier{i}")
            l1.append(t)
        rows = [("L1 hit (memory)", l1), ("L2 hit (Redis, then fills L1)", l2)]
        print(f"{n} keys, sequential requests over one keep-alive connection, microseconds")
        print("| tier | p50 | p90 | p99 |")
        print("|---|---|---|---|")
        for name, values in rows:
            print(f"| {name} | {percentile(values, 50):.0f} | {percentile(values, 90):.0f} | {percentile(values, 99):.0f} |")
        print(f"| L2 overhead over L1 | {percentile(l2, 50) - percentile(l1, 50):.0f} | "
              f"{percentile(l2, 90) - percentile(l1, 90):.0f} | {percentile(l2, 99) - percentile(l1, 99):.0f} |")
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
