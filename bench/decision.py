"""Micro-benchmark of token verification: raw RSA verify vs our cold and cached paths vs pyjwt.

Run: ``python -m bench.decision`` (or ``python bench/decision.py``). Prints microseconds per
operation (best of several rounds) and the ratios cold/raw and cached/raw. No asserts.

"cold" is a cache miss for a token whose header segment the verifier has parsed before (the
normal case: Entra signs with a handful of keys); "header not seen" also parses the header.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import timeit
from collections.abc import Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authz.identity.cache import ClaimsCache
from authz.identity.entra import KeySnapshot, TokenVerifier
from authz.identity.keys import parse_jwks
from authz.policy.model import ApiSpec, IssuerSpec, TokenSettings

INSTANCE = "https://login.microsoftonline.com"
TID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
AUD = "6e74172b-be56-4843-9ff4-e66a39bb12e3"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(v: int) -> str:
    return b64(v.to_bytes((v.bit_length() + 7) // 8, "big"))


def entra_token(key: rsa.RSAPrivateKey, kid: str, now: int) -> str:
    """A ~2.5 KB v2 user token shaped like Entra's (groups, wids, opaque aio/rh)."""
    claims = {
        "aud": AUD,
        "iss": f"{INSTANCE}/{TID}/v2.0",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "aio": "AWQAm/8YAAAA" + "x" * 120,
        "azp": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
        "azpacr": "0",
        "groups": [f"{i:08x}-1111-4111-8111-111111111111" for i in range(16)],
        "name": "Dev User",
        "oid": "d9f9c5f4-1e3c-4b3a-8c4f-0a6f0b8c9d10",
        "preferred_username": "dev@contoso.example",
        "rh": "1.AQ" + "y" * 60 + ".",
        "roles": ["Orders.Admin"],
        "scp": "Orders.Read Orders.Write User.Read",
        "sid": "0b3c5a4e-8c5f-4f8e-9a0b-1c2d3e4f5a6b",
        "sub": "pUn0Wq0m0a5rQ6tG7t2kqVw0g3l9tN2uR8sF4eYwX0o",
        "tid": TID,
        "uti": "AbCdEfGhIjKlMnOpQrStUv",
        "ver": "2.0",
        "wids": ["b79fbf4d-3ef9-4689-8143-76b194e85509"],
        "xms_cc": ["cp1"],
        "acrs": ["c1"],
    }
    header = {"typ": "JWT", "alg": "RS256", "kid": kid}
    body = json.dumps(claims, separators=(",", ":")).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"


class OneIssuer:
    def __init__(self, snap: KeySnapshot) -> None:
        self._snap = snap

    def snapshot(self, issuer: str) -> KeySnapshot | None:
        return self._snap if issuer == "entra" else None


def best_us(fn: Callable[[], object], number: int, rounds: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6


def main() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "nOo3ZDrODXEK1jKWhXslHR_KXEg"
    n = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "use": "sig", "kid": kid, "n": uint(n.n), "e": uint(n.e)}
    jwk["issuer"] = f"{INSTANCE}/{TID}/v2.0"
    keys = parse_jwks(json.dumps({"keys": [jwk]}).encode(), "2.0")
    snap = KeySnapshot("entra", TID, {"2.0": f"{INSTANCE}/{TID}/v2.0"}, keys, time.time())
    spec = IssuerSpec(name="entra", instance=INSTANCE, tenant=TID)
    api = ApiSpec(name="orders", audiences=frozenset({AUD}), issuers=("entra",), routes=())
    token = entra_token(key, kid, int(time.time()))
    settings = TokenSettings()

    cold = TokenVerifier(settings, {"entra": spec}, OneIssuer(snap))
    cached = TokenVerifier(
        settings, {"entra": spec}, OneIssuer(snap), cache=ClaimsCache(10_000, 300.0)
    )
    cold.verify(token, api)
    cached.verify(token, api)

    public = key.public_key()
    h, p, s = token.split(".")
    signing_input = f"{h}.{p}".encode()
    signature = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    pyjwk = keys[kid].jwk

    def raw() -> None:
        public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())

    def pyjwt_decode() -> None:
        jwt.decode(
            token,
            pyjwk,
            algorithms=["RS256"],
            audience=AUD,
            leeway=60,
            options={"require": ["exp", "nbf", "iat", "iss", "aud", "tid"], "verify_iss": False},
        )

    def cold_unseen_header() -> None:
        # A header segment this verifier has not parsed before (a new kid, a fresh process).
        cold._headers.clear()
        cold.verify(token, api)

    results = {
        "raw RSA verify (cryptography)": best_us(raw, 2000),
        "ours, cold (no cache)": best_us(lambda: cold.verify(token, api), 2000),
        "ours, cold, header not seen": best_us(cold_unseen_header, 2000),
        "ours, cached": best_us(lambda: cached.verify(token, api), 20000),
        "pyjwt.decode (PyJWK prebuilt)": best_us(pyjwt_decode, 1000),
    }
    print(f"token: {len(token)} bytes; pyjwt {jwt.__version__}; python {sys.version.split()[0]}")
    for name, us in results.items():
        print(f"{name:34s} {us:8.1f} us")
    r = results["raw RSA verify (cryptography)"]
    print(f"{'cold / raw':34s} {results['ours, cold (no cache)'] / r:8.2f}x")
    print(f"{'cold, header not seen / raw':34s} {results['ours, cold, header not seen'] / r:8.2f}x")
    print(f"{'cached / raw':34s} {results['ours, cached'] / r:8.2f}x")
    print(f"{'pyjwt.decode / raw':34s} {results['pyjwt.decode (PyJWK prebuilt)'] / r:8.2f}x")


if __name__ == "__main__":
    main()
