"""Third-party gRPC clients against Ward's Unix sockets, as a user would run them.

Usage: grpc_clients.py AGENT_SOCKET ADMIN_SOCKET

1. The Python SPIFFE library (PyPI `spiffe`, on gRPC's C core through `grpcio`) with its
   defaults: FetchX509SVID, FetchX509Bundles, FetchJWTSVID, ValidateJWTSVID. gRPC's C core
   sends the socket path, percent-encoded, as `:authority` (the caller checks the trace).
2. Plain `grpcio` with the authority forced to a value h2 refuses, on the agent and on the CA's
   admin socket.
3. A raw HTTP/2 client (PyPI `h2`) with header validation off, sending a garbage authority.

Prints one JSON object per line; exits non-zero on the first failure.
"""

import json
import socket
import sys

import grpc
import h2.config
import h2.connection
import h2.events
from spiffe import WorkloadApiClient

agent_socket, admin_socket = sys.argv[1], sys.argv[2]


def out(**kv):
    print(json.dumps(kv), flush=True)


# 1. py-spiffe, unmodified.
with WorkloadApiClient(socket_path="unix://" + agent_socket) as c:
    svid = c.fetch_x509_svid()
    out(step="FetchX509SVID", spiffe_id=str(svid.spiffe_id), chain=len(svid.cert_chain))
    bundles = c.fetch_x509_bundles()
    out(step="FetchX509Bundles", trust_domains=sorted(str(b.trust_domain) for b in bundles.bundles))
    jwt = c.fetch_jwt_svid(audience={"grpc-test"})
    out(step="FetchJWTSVID", spiffe_id=str(jwt.spiffe_id))
    checked = c.validate_jwt_svid(jwt.token, "grpc-test")
    out(step="ValidateJWTSVID", spiffe_id=str(checked.spiffe_id))

# 2. grpcio with an authority forced to something h2's parser refuses.
forced = "tmp%2Fforced%2F[not a host]%"
opts = [("grpc.default_authority", forced)]
ident = lambda b: b  # noqa: E731: raw bytes in and out

with grpc.insecure_channel("unix://" + agent_socket, options=opts) as ch:
    # JWTSVIDRequest { audience: ["forced"] }: field 1, length-delimited.
    req = b"\x0a\x06forced"
    call = ch.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID", request_serializer=ident,
                          response_deserializer=ident)
    resp = call(req, metadata=[("workload.spiffe.io", "true")], timeout=10)
    out(step="forced-authority FetchJWTSVID", response_bytes=len(resp))
    # Without the security header: a gRPC answer (InvalidArgument), not a reset stream.
    try:
        call(req, timeout=10)
        out(step="forced-authority no-header", code="OK")
    except grpc.RpcError as e:
        out(step="forced-authority no-header", code=e.code().name, details=e.details())

with grpc.insecure_channel("unix://" + admin_socket, options=opts) as ch:
    call = ch.unary_unary("/ward.admin.v1.Admin/ListEntries", request_serializer=ident,
                          response_deserializer=ident)
    resp = call(b"", timeout=10)
    out(step="admin ListEntries", response_bytes=len(resp))

# 3. Raw HTTP/2 with a garbage authority.
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(agent_socket)
conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
    client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
    validate_inbound_headers=False, header_encoding="utf-8"))
conn.initiate_connection()
sid = conn.get_next_available_stream_id()
conn.send_headers(sid, [
    (":method", "POST"), (":scheme", "http"), (":path", "/SpiffeWorkloadAPI/FetchJWTSVID"),
    (":authority", "%%%garbage @ [authority]%%"), ("content-type", "application/grpc"),
    ("te", "trailers"), ("workload.spiffe.io", "true"),
])
msg = b"\x0a\x03raw"
conn.send_data(sid, b"\x00" + len(msg).to_bytes(4, "big") + msg, end_stream=True)
s.sendall(conn.data_to_send())
status, grpc_status, body, reset = None, None, 0, None
done = False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            status = dict(ev.headers).get(":status")
        elif isinstance(ev, h2.events.DataReceived):
            body += len(ev.data)
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            grpc_status = dict(ev.headers).get("grpc-status")
            done = True
        elif isinstance(ev, h2.events.StreamReset):
            reset = ev.error_code
            done = True
    s.sendall(conn.data_to_send())
s.close()
out(step="raw h2 garbage authority", status=status, grpc_status=grpc_status, body=body,
    reset=str(reset) if reset is not None else None)
