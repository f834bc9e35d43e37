"""A plain application for the capture tests, run inside a network namespace ("pod").

Usage: app.py NAME

Serves HTTP on [::]:8080 and [::]:9090 (dual-stack, so 0.0.0.0 too) answering every request
with JSON: the pod's name, the port, method, path, and the x-ward-peer-id header it got; and
echoes UDP datagrams on [::]:5353. It knows nothing about Ward.
"""

import http.server
import json
import socket
import socketserver
import sys
import threading

NAME = sys.argv[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one(self):
        body = json.dumps({
            "pod": NAME,
            "port": self.server.server_address[1],
            "method": self.command,
            "path": self.path,
            "peer": self.headers.get("x-ward-peer-id"),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = handle_one

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_echo():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 5353))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(NAME.encode() + b":" + data, addr)


servers = [Server(("::", p), Handler) for p in (8080, 9090)]
for srv in servers[1:]:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
threading.Thread(target=udp_echo, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
