"""Verifies a JWT-SVID the way an OIDC relying party does, with PyJWT only: read the issuer's
discovery document, fetch its JWKS, pick the key by kid, check signature, audience, issuer and
expiry. Prints the subject; exits non-zero (with the reason on stderr) on any failure.

Usage: verify_jwt.py ISSUER AUDIENCE TOKEN
"""
import json
import sys
import urllib.request

import jwt

issuer, audience, token = sys.argv[1:4]
with urllib.request.urlopen(issuer + "/.well-known/openid-configuration", timeout=10) as r:
    conf = json.load(r)
if conf["issuer"] != issuer:
    sys.exit(f"discovery issuer {conf['issuer']!r} != {issuer!r}")
client = jwt.PyJWKClient(conf["jwks_uri"], cache_keys=False)
try:
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=conf["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=issuer,
    )
except Exception as e:  # noqa: BLE001 - any failure is a refusal
    sys.exit(f"refused: {type(e).__name__}: {e}")
print(claims["sub"])
