"""Dev-issuer token shapes: Entra v1/v2 claims, user vs app, and that they verify with pyjwt.

Pure: uses authz.dev.idp.tokens/keys directly with a session-scoped key; no sockets.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from authz.dev.idp.keys import SigningKey, b64url, generate_signing_key
from authz.dev.idp.tokens import (
    DEFAULT_APP_ROLES,
    DEFAULT_CLIENT_ID,
    UNSET,
    build_claims,
    build_header,
    default_oid,
    sign_jws,
)

TID = "11111111-1111-4111-8111-111111111111"
BASE = "http://127.0.0.1:9400"
NOW = 1_800_000_000


@pytest.fixture(scope="session")
def key() -> SigningKey:
    return generate_signing_key()


def issuer(version: str) -> str:
    return f"{BASE}/{TID}/v2.0" if version == "2.0" else f"{BASE}/sts/{TID}/"


def claims(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "now": NOW,
        "tid": TID,
        "version": "2.0",
        "aud": "api://orders",
        "kind": "user",
        "scp": UNSET,
        "roles": UNSET,
        "groups": None,
        "oid": None,
        "sub": None,
        "client_id": DEFAULT_CLIENT_ID,
        "lifetime": 3600,
        "nbf_offset": 0,
        "iat_offset": 0,
        "idtyp": UNSET,
        "username": "dev.user@contoso.onmicrosoft.com",
        "extra": None,
        "remove": (),
    }
    args.update(overrides)
    args.setdefault("issuer", issuer(args["version"]))
    return build_claims(**args)


def token(key: SigningKey, payload: Mapping[str, Any], version: str = "2.0") -> str:
    header = build_header(kid=key.kid, version=version, header_extra=None, header_remove=())
    return sign_jws(key.private_key, header, payload)


def verify(key: SigningKey, tok: str, **kwargs: Any) -> dict[str, Any]:
    pyjwk = jwt.PyJWK(key.public_jwk(), algorithm="RS256")
    options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}
    return jwt.decode(
        tok, pyjwk, algorithms=["RS256"], audience="api://orders", options=options, **kwargs
    )


COMMON = {"aud", "iss", "iat", "nbf", "exp", "aio", "oid", "rh", "sub", "tid", "uti", "ver"}


@pytest.mark.parametrize(
    ("version", "kind", "expected"),
    [
        ("2.0", "user", COMMON | {"azp", "azpacr", "name", "preferred_username", "scp"}),
        ("2.0", "app", COMMON | {"azp", "azpacr", "idtyp", "roles"}),
        (
            "1.0",
            "user",
            COMMON | {"acr", "amr", "appid", "appidacr", "name", "scp", "unique_name", "upn"},
        ),
        ("1.0", "app", COMMON | {"appid", "appidacr", "idtyp", "roles"}),
    ],
    ids=["v2-user", "v2-app", "v1-user", "v1-app"],
)
def test_claim_sets(key: SigningKey, version: str, kind: str, expected: set[str]) -> None:
    c = verify(key, token(key, claims(version=version, kind=kind), version), issuer=issuer(version))
    assert set(c) == expected
    assert c["ver"] == version
    assert c["tid"] == TID
    assert c["iat"] == c["nbf"] == NOW
    assert c["exp"] == NOW + 3600


def test_v2_user_token(key: SigningKey) -> None:
    c = claims()
    assert c["iss"] == f"{BASE}/{TID}/v2.0"
    assert c["scp"] == "Orders.Read"
    assert c["azp"] == DEFAULT_CLIENT_ID
    assert c["azpacr"] == "0"
    assert c["sub"] != c["oid"]
    assert c["oid"] == default_oid(TID, "user", DEFAULT_CLIENT_ID)
    assert "roles" not in c
    assert "idtyp" not in c


def test_v2_app_token() -> None:
    c = claims(kind="app")
    assert c["roles"] == list(DEFAULT_APP_ROLES)
    assert c["idtyp"] == "app"
    assert c["sub"] == c["oid"]
    assert c["azpacr"] == "1"
    assert "scp" not in c
    assert "name" not in c


def test_v1_tokens() -> None:
    user = claims(version="1.0")
    assert user["iss"] == f"{BASE}/sts/{TID}/"
    assert user["appid"] == DEFAULT_CLIENT_ID
    assert user["appidacr"] == "0"
    assert "azp" not in user
    assert "preferred_username" not in user
    app = claims(version="1.0", kind="app")
    assert app["appidacr"] == "1"
    assert app["sub"] == app["oid"]


def test_v1_header_carries_x5t(key: SigningKey) -> None:
    v1 = jwt.get_unverified_header(token(key, claims(version="1.0"), "1.0"))
    assert v1 == {"typ": "JWT", "alg": "RS256", "x5t": key.kid, "kid": key.kid}
    v2 = jwt.get_unverified_header(token(key, claims()))
    assert v2 == {"typ": "JWT", "alg": "RS256", "kid": key.kid}


@pytest.mark.parametrize(
    ("overrides", "present", "absent"),
    [
        ({"scp": None}, {}, {"scp"}),
        ({"kind": "app", "roles": None}, {}, {"roles"}),
        ({"kind": "app", "idtyp": None}, {}, {"idtyp"}),
        ({"idtyp": "user"}, {"idtyp": "user"}, set()),
        ({"kind": "app", "scp": "X.Y"}, {"scp": "X.Y", "roles": ["Orders.Read.All"]}, set()),
        ({"roles": ("A", "B")}, {"roles": ["A", "B"], "scp": "Orders.Read"}, set()),
        ({"groups": ["g1"]}, {"groups": ["g1"]}, set()),
        ({"oid": "o", "sub": "s"}, {"oid": "o", "sub": "s"}, set()),
        ({"extra": {"tid": "x", "acrs": ["c1"]}}, {"tid": "x", "acrs": ["c1"]}, set()),
        ({"remove": ("exp", "tid")}, {}, {"exp", "tid"}),
        ({"extra": {"exp": "1"}, "remove": ("exp",)}, {}, {"exp"}),
        ({"lifetime": -10, "nbf_offset": 5, "iat_offset": -5}, {"exp": NOW - 10}, set()),
    ],
    ids=[
        "scp-none",
        "roles-none",
        "idtyp-none",
        "idtyp-user",
        "app-with-scp",
        "user-roles",
        "groups",
        "oid-sub",
        "extra",
        "remove",
        "remove-beats-extra",
        "times",
    ],
)
def test_options(overrides: dict[str, Any], present: dict[str, Any], absent: set[str]) -> None:
    c = claims(**overrides)
    for name, value in present.items():
        assert c[name] == value
    assert not absent & set(c)


def test_time_offsets() -> None:
    c = claims(lifetime=60, nbf_offset=30, iat_offset=-30)
    assert (c["iat"], c["nbf"], c["exp"]) == (NOW - 30, NOW + 30, NOW + 60)


def test_random_ids_differ() -> None:
    a, b = claims(), claims()
    assert a["uti"] != b["uti"]
    assert a["aio"] != b["aio"]


@pytest.mark.parametrize(
    "overrides", [{"version": "3.0"}, {"kind": "robot"}], ids=["bad-version", "bad-kind"]
)
def test_rejects_bad_arguments(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        claims(**overrides)


def test_header_overrides() -> None:
    h = build_header(
        kid="k", version="1.0", header_extra={"alg": "RS384", "crit": ["x"]}, header_remove=("x5t",)
    )
    assert h == {"typ": "JWT", "alg": "RS384", "kid": "k", "crit": ["x"]}


def test_sign_bytes_verbatim_duplicate_keys(key: SigningKey) -> None:
    raw = b'{"aud":"api://orders","tid":"a","tid":"b"}'
    tok = sign_jws(key.private_key, {"alg": "RS256", "kid": key.kid}, raw)
    payload = tok.split(".")[1]
    assert base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) == raw
    assert verify(key, tok)["tid"] == "b"  # pyjwt: last duplicate wins


def test_signature_is_rs256_whatever_the_header_says(key: SigningKey) -> None:
    tok = sign_jws(key.private_key, {"alg": "PS256", "kid": key.kid}, {"a": 1})
    head, body, sig = tok.split(".")
    key.private_key.public_key().verify(
        base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)),
        f"{head}.{body}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )


def test_tampered_token_fails(key: SigningKey) -> None:
    tok = token(key, claims())
    head, _, sig = tok.split(".")
    forged = b64url(json.dumps(claims(scp="Orders.Write")).encode())
    with pytest.raises(jwt.InvalidSignatureError):
        verify(key, f"{head}.{forged}.{sig}")


def test_public_jwk_shape(key: SigningKey) -> None:
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "use", "kid", "x5t", "n", "e", "x5c"}
    assert (jwk["kty"], jwk["use"], jwk["e"]) == ("RSA", "sig", "AQAB")
    assert jwk["kid"] == jwk["x5t"]
    der = base64.b64decode(jwk["x5c"][0])
    assert jwk["x5t"] == b64url(hashlib.sha1(der).digest())
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_key().public_numbers() == key.private_key.public_key().public_numbers()
    n = int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=" * (-len(jwk["n"]) % 4)), "big")
    assert n == key.private_key.public_key().public_numbers().n
    assert n.bit_length() == 2048


def test_keys_are_fresh_each_time() -> None:
    assert generate_signing_key().kid != generate_signing_key().kid
