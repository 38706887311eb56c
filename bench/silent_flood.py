# Silent-socket flood against a running proxy: open N sockets, send nothing,
# then count the proxy's descriptors and time /healthz.
import os, socket, sys, time, urllib.request
pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket(); s.connect(("127.0.0.1", port)); socks.append(s)
time.sleep(0.5)
fds = len(os.listdir(f"/proc/{pid}/fd"))
t = time.monotonic()
body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
print(f"{n} silent sockets: proxy holds {fds} fds; /healthz {body!r} in {(time.monotonic()-t)*1000:.1f} ms")
