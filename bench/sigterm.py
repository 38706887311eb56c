# SIGTERM with one idle keep-alive and one half-sent connection: time to exit.
import os, signal, socket, subprocess, sys, time
p = subprocess.Popen([sys.argv[1], "--demo"], env=dict(os.environ, KEYAPI_PROXY__SERVER__LISTEN="127.0.0.1:18932", RUST_LOG="error"), stdout=subprocess.DEVNULL)
time.sleep(1)
idle = socket.create_connection(("127.0.0.1", 18932)); idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); idle.recv(4096)
half = socket.create_connection(("127.0.0.1", 18932)); half.sendall(b"GET /healthz HTTP/1.1\r\nHo")
time.sleep(0.2)
t = time.monotonic(); p.send_signal(signal.SIGTERM); p.wait()
print(f"exit {p.returncode} {(time.monotonic()-t)*1000:.1f} ms after SIGTERM")
