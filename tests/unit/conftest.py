"""Shared unit fixtures: session-scoped RSA keys, an in-memory ``KeySource`` and a token minter.

No network: key snapshots are built from JWKS documents with the production parser
(``parse_jwks``/``build_snapshot``), so the unit tests exercise the same key objects as the
service, without HTTP.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authz.identity.entra import KeySnapshot, TokenVerifier
from authz.identity.keys import build_snapshot, parse_jwks
from authz.policy.model import ApiSpec, IssuerSpec, TokenSettings

INSTANCE = "https://login.example.test"
TENANT = "11111111-1111-4111-8111-111111111111"
OTHER_TENANT = "22222222-2222-4222-8222-222222222222"
MSA_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
API_ID = "33333333-3333-4333-8333-333333333333"
CLIENT_ID = "44444444-4444-4444-8444-444444444444"
USER_OID = "55555555-5555-4555-8555-555555555555"
APP_OID = "66666666-6666-4666-8666-666666666666"
KID = "main-key"
MSA_KID = "msa-key"
NOW = 1_700_000_000
DROP = "__drop__"  # as a claim value in Minter.claims/token: remove that claim


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def public_jwk(key: rsa.RSAPrivateKey, kid: str, issuer: str | None = None) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    jwk: dict[str, Any] = {
        "kty": "RSA",
        "use": "sig",
        "kid": kid,
        "x5t": kid,
        "n": _uint(numbers.n),
        "e": _uint(numbers.e),
    }
    if issuer is not None:
        jwk["issuer"] = issuer
    return jwk


def v2_issuer(tid: str) -> str:
    return f"{INSTANCE}/{tid}/v2.0"


def v1_issuer(tid: str) -> str:
    return f"https://sts.example.test/{tid}/"


class MemoryKeys:
    """The ``KeySource`` seam as a dict: tests swap snapshots in and out."""

    def __init__(self, snapshots: Mapping[str, KeySnapshot] | None = None) -> None:
        self.snapshots: dict[str, KeySnapshot] = dict(snapshots or {})
        self.lookups = 0  # how often the verifier asked: attacks rejected on syntax never do

    def snapshot(self, issuer: str) -> KeySnapshot | None:
        self.lookups += 1
        return self.snapshots.get(issuer)


class Minter:
    """Builds Entra-shaped tokens (v1/v2, user/app) signed with the session keys."""

    def __init__(self, keys: Mapping[str, rsa.RSAPrivateKey], now: int = NOW) -> None:
        self.keys = dict(keys)
        self.now = now

    def claims(
        self,
        *,
        version: str = "2.0",
        kind: str = "user",
        tid: str = TENANT,
        aud: str = API_ID,
        **overrides: Any,
    ) -> dict[str, Any]:
        drops = {name for name, v in (("tid", tid), ("aud", aud), ("ver", version)) if v == DROP}
        if "tid" in drops:
            tid = TENANT
        if "ver" in drops:
            version = "2.0"
        iss = v2_issuer(tid) if version == "2.0" else v1_issuer(tid)
        c: dict[str, Any] = {
            "aud": aud,
            "iss": iss,
            "iat": self.now - 60,
            "nbf": self.now - 60,
            "exp": self.now + 3600,
            "aio": "E2ZgYJj" * 20,
            "oid": APP_OID if kind == "app" else USER_OID,
            "rh": "0.AQ" + "x" * 120,
            "sub": APP_OID if kind == "app" else "pairwise-" + "s" * 30,
            "tid": tid,
            "uti": "AbCdEfGhIjKlMnOp",
            "ver": version,
        }
        c["azp" if version == "2.0" else "appid"] = CLIENT_ID
        c["azpacr" if version == "2.0" else "appidacr"] = "1"
        if kind == "app":
            c["roles"] = ["Orders.Read.All"]
            c["idtyp"] = "app"
        else:
            c["scp"] = "Orders.Read Orders.Write"
            c["name"] = "Dev User"
            c["preferred_username"] = "dev@contoso.example"
        for name in drops:
            c.pop(name, None)
        for name, value in overrides.items():
            if value is DROP or value == DROP:
                c.pop(name, None)
            else:
                c[name] = value
        return c

    def header(self, kid: str = KID, **extra: Any) -> dict[str, Any]:
        h: dict[str, Any] = {"typ": "JWT", "alg": "RS256", "kid": kid}
        h.update(extra)
        return h

    def sign(
        self,
        header: Mapping[str, Any] | bytes,
        payload: Mapping[str, Any] | bytes,
        key: str | rsa.RSAPrivateKey = KID,
    ) -> str:
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        signing_input = f"{b64url(h)}.{b64url(p)}".encode()
        private = self.keys[key] if isinstance(key, str) else key
        sig = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{b64url(sig)}"

    def token(
        self, *, kid: str = KID, header: Mapping[str, Any] | None = None, **claims: Any
    ) -> str:
        signer = MSA_KID if kid == MSA_KID else KID
        return self.sign(header or self.header(kid), self.claims(**claims), signer)


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def msa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def minter(rsa_key: rsa.RSAPrivateKey, msa_key: rsa.RSAPrivateKey) -> Minter:
    return Minter({KID: rsa_key, MSA_KID: msa_key})


def jwks_bytes(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def snapshot_for(
    name: str,
    rsa_key: rsa.RSAPrivateKey,
    msa_key: rsa.RSAPrivateKey,
    *,
    tenant: str | None = TENANT,
    versions: tuple[str, ...] = ("1.0", "2.0"),
) -> KeySnapshot:
    """A snapshot as KeyStore would build it from Entra-shaped documents for ``tenant`` (None:
    the tenant-independent ``{tenantid}`` documents of common/organizations)."""
    tid = tenant or "{tenantid}"
    docs = {}
    for v in versions:
        if v == "2.0":
            jwks = jwks_bytes(
                public_jwk(rsa_key, KID, v2_issuer(tid)),
                public_jwk(msa_key, MSA_KID, v2_issuer(MSA_TENANT)),
            )
            docs[v] = (v2_issuer(tid), parse_jwks(jwks, v))
        else:
            jwks = jwks_bytes(public_jwk(rsa_key, KID), public_jwk(msa_key, MSA_KID))
            docs[v] = (v1_issuer(tid), parse_jwks(jwks, v))
    spec = IssuerSpec(name=name, instance=INSTANCE, tenant=tenant or "common")
    snap = build_snapshot(spec, docs, float(NOW))
    if tenant is None:  # KeyStore also fetches each allowed tenant's own key set
        snap = dataclasses.replace(
            snap, tenant_keys={TENANT: snap.keys}, tenant_fetched_at={TENANT: float(NOW)}
        )
    return snap


ISSUERS = {
    "contoso": IssuerSpec(
        name="contoso", instance=INSTANCE, tenant=TENANT, versions=frozenset({"1.0", "2.0"})
    ),
    "contoso-v2": IssuerSpec(name="contoso-v2", instance=INSTANCE, tenant=TENANT),
    "multi": IssuerSpec(
        name="multi",
        instance=INSTANCE,
        tenant="organizations",
        allowed_tenants=frozenset({TENANT}),
    ),
}


def make_api(
    *issuers: str,
    audiences: tuple[str, ...] = (API_ID, "api://orders"),
    require_scope_or_role: bool = True,
) -> ApiSpec:
    return ApiSpec(
        name="orders",
        audiences=frozenset(audiences),
        issuers=issuers or ("contoso",),
        routes=(),
        require_scope_or_role=require_scope_or_role,
    )


@pytest.fixture
def memory_keys(rsa_key: rsa.RSAPrivateKey, msa_key: rsa.RSAPrivateKey) -> MemoryKeys:
    return MemoryKeys(
        {
            "contoso": snapshot_for("contoso", rsa_key, msa_key),
            "contoso-v2": snapshot_for("contoso-v2", rsa_key, msa_key, versions=("2.0",)),
            "multi": snapshot_for("multi", rsa_key, msa_key, tenant=None, versions=("2.0",)),
        }
    )


@pytest.fixture
def clock() -> list[float]:
    """A settable clock: ``clock[0]`` is "now"."""
    return [float(NOW)]


@pytest.fixture
def verifier(memory_keys: MemoryKeys, clock: list[float]) -> TokenVerifier:
    return TokenVerifier(TokenSettings(), ISSUERS, memory_keys, clock=lambda: clock[0])


@pytest.fixture(scope="session")
def env() -> SimpleNamespace:
    """The constants and helpers above, for test modules (they never import conftest)."""
    return SimpleNamespace(
        INSTANCE=INSTANCE,
        TENANT=TENANT,
        OTHER_TENANT=OTHER_TENANT,
        MSA_TENANT=MSA_TENANT,
        API_ID=API_ID,
        CLIENT_ID=CLIENT_ID,
        USER_OID=USER_OID,
        APP_OID=APP_OID,
        KID=KID,
        MSA_KID=MSA_KID,
        NOW=NOW,
        DROP=DROP,
        ISSUERS=ISSUERS,
        b64url=b64url,
        public_jwk=public_jwk,
        jwks_bytes=jwks_bytes,
        v1_issuer=v1_issuer,
        v2_issuer=v2_issuer,
        snapshot_for=snapshot_for,
        make_api=make_api,
        MemoryKeys=MemoryKeys,
        Minter=Minter,
    )
