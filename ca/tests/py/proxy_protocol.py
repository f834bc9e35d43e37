"""An HTTPS request through a "load balancer" that speaks the PROXY protocol v2.

Usage: proxy_protocol.py SOURCE_IP PORT SERVER_NAME ROOT_PEM CLIENT_IP|none

Connects from SOURCE_IP to 127.0.0.1:PORT, sends a PROXY v2 header naming CLIENT_IP:40000 as
the client (none: no header), then TLS with SERVER_NAME and GET /. Prints one JSON object:
the status and the response headers, or the error.
"""

import json
import socket
import ssl
import struct
import sys

source, port, name, root, client = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
if client != "none":
    body = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + struct.pack(">HH", 40000, port)
    raw.sendall(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body)
ctx = ssl.create_default_context(cafile=root)
try:
    s = ctx.wrap_socket(raw, server_hostname=name)
    s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), v.strip())
    print(json.dumps({"status": int(head[0].split()[1]), "headers": headers}))
except (OSError, ssl.SSLError) as e:
    print(json.dumps({"status": 0, "error": type(e).__name__ + ": " + str(e)}))
