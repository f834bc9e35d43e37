"""An "internet" server for the egress tests, run inside a network namespace.

Usage: origin.py NAME IP CERT KEY

Serves HTTPS on IP:443 (the certificate in CERT/KEY) and plain HTTP on IP:80, answering every
request with JSON: the server's name, the Host it got and the TLS server name (SNI) the client
asked for. Prints "ready" once both listen. It knows nothing about Ward.
"""

import http.server
import json
import socketserver
import ssl
import sys
import threading

NAME, IP, CERT, KEY = sys.argv[1:5]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one(self):
        sni = getattr(self.connection, "sni", None)
        body = json.dumps({
            "server": NAME,
            "host": self.headers.get("host"),
            "sni": sni,
            "path": self.path,
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = handle_one

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    plain = Server((IP, 80), Handler)
    tls = Server((IP, 443), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERT, KEY)

    def remember(sock, name, _ctx):
        sock.sni = name

    ctx.sni_callback = remember
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    for s in (plain, tls):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


main()
