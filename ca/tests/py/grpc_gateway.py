"""gRPC through the ingress gateway with Python grpcio (gRPC's C core) over TLS.

Usage: grpc_gateway.py ADDRESS AUTHORITY ROOT_PEM

Calls /SpiffeWorkloadAPI/FetchJWTSVID (the test's echo application) with audience "gw" as
AUTHORITY, trusting ROOT_PEM for the gateway's certificate. Prints one JSON object: the gRPC
status code name and, when OK, the strings in the response (the echo puts the audiences and the
caller's verified SPIFFE ID there).
"""

import json
import re
import sys

import grpc

address, authority, root = sys.argv[1], sys.argv[2], sys.argv[3]
creds = grpc.ssl_channel_credentials(root_certificates=open(root, "rb").read())
options = [("grpc.ssl_target_name_override", authority), ("grpc.default_authority", authority)]
with grpc.secure_channel(address, creds, options=options) as ch:
    call = ch.unary_unary(
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # JWTSVIDRequest { audience: ["gw"] }: field 1, length-delimited.
    request = b"\x0a\x02gw"
    try:
        reply = call(request, timeout=10)
        strings = [s.decode() for s in re.findall(rb"[\x20-\x7e]{2,}", reply)]
        print(json.dumps({"code": "OK", "strings": strings}))
    except grpc.RpcError as e:
        print(json.dumps({"code": e.code().name, "details": e.details()}))
