"""An OTLP/HTTP sink for bench/profile.sh (PROFILE_TRACES=1): answers every POST
with 200 and an empty body, and counts exports and bytes (printed on SIGTERM).

    python3 bench/otlp_sink.py PORT
"""
import http.server
import signal
import sys

exports = 0
received = 0


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global exports, received
        length = int(self.headers.get("Content-Length", 0))
        received += len(self.rfile.read(length))
        exports += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def report(*_):
    print(f"otlp sink: {exports} exports, {received} bytes", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, report)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
