"""Pure parsing of discovery documents and JWKS: garbled input is rejected whole."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from authz.identity.keys import (
    GarbledDiscovery,
    GarbledJwks,
    KeyFetchError,
    build_snapshot,
    discovery_url,
    merge_keys,
    parse_discovery,
    parse_jwks,
    retry_delay,
)
from authz.policy.model import IssuerSpec

INSTANCE = "https://login.example.test"
TID = "11111111-1111-4111-8111-111111111111"


def doc(**fields: Any) -> bytes:
    base = {
        "issuer": f"{INSTANCE}/{TID}/v2.0",
        "jwks_uri": f"{INSTANCE}/{TID}/discovery/v2.0/keys",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_discovery_urls() -> None:
    spec = IssuerSpec(name="c", instance=INSTANCE, tenant="contoso.com")
    assert (
        discovery_url(spec, "2.0")
        == f"{INSTANCE}/contoso.com/v2.0/.well-known/openid-configuration"
    )
    assert discovery_url(spec, "1.0") == f"{INSTANCE}/contoso.com/.well-known/openid-configuration"
    spec = IssuerSpec(name="c", instance=INSTANCE, tenant=TID, metadata_query="appid=x")
    assert discovery_url(spec, "2.0").endswith("/openid-configuration?appid=x")


@pytest.mark.parametrize(
    ("instance", "v1_issuer"),
    [
        ("https://login.microsoftonline.us", f"https://sts.windows.net/{TID}/"),
        ("https://login.partner.microsoftonline.cn", f"https://sts.chinacloudapi.cn/{TID}/"),
    ],
)
def test_sovereign_cloud_documents(instance: str, v1_issuer: str) -> None:
    """US Government and China: the discovery URLs follow the configured instance, and their
    documents (issuer, jwks_uri on that instance) are accepted as published."""
    spec = IssuerSpec(name="gov", instance=instance, tenant=TID)
    assert discovery_url(spec, "2.0") == f"{instance}/{TID}/v2.0/.well-known/openid-configuration"
    assert discovery_url(spec, "1.0") == f"{instance}/{TID}/.well-known/openid-configuration"
    v2 = doc(issuer=f"{instance}/{TID}/v2.0", jwks_uri=f"{instance}/{TID}/discovery/v2.0/keys")
    assert parse_discovery(v2, "2.0", instance=instance) == (
        f"{instance}/{TID}/v2.0",
        f"{instance}/{TID}/discovery/v2.0/keys",
    )
    v1 = doc(issuer=v1_issuer, jwks_uri=f"{instance}/{TID}/discovery/keys")
    assert parse_discovery(v1, "1.0", instance=instance)[0] == v1_issuer


def test_discovery_ok() -> None:
    assert parse_discovery(doc(), "2.0", instance=INSTANCE) == (
        f"{INSTANCE}/{TID}/v2.0",
        f"{INSTANCE}/{TID}/discovery/v2.0/keys",
    )
    v1 = doc(issuer=f"https://sts.example.test/{TID}/", jwks_uri=f"{INSTANCE}/{TID}/discovery/keys")
    assert parse_discovery(v1, "1.0")[0] == f"https://sts.example.test/{TID}/"
    template = doc(issuer=f"{INSTANCE}/{{tenantid}}/v2.0")
    assert parse_discovery(template, "2.0")[0] == f"{INSTANCE}/{{tenantid}}/v2.0"


@pytest.mark.parametrize(
    ("body", "version"),
    [
        (b"<html>", "2.0"),
        (b"[]", "2.0"),
        (b"\xff", "2.0"),
        (b'{"issuer":"a","issuer":"b","jwks_uri":"x"}', "2.0"),
        (doc(issuer=None), "2.0"),
        (doc(jwks_uri=None), "2.0"),
        (doc(issuer=5), "2.0"),
        (doc(jwks_uri="file:///etc/passwd"), "2.0"),
        (doc(jwks_uri="data:application/json,{}"), "2.0"),
        (doc(jwks_uri="https://evil.example/keys"), "2.0"),
        (doc(), "1.0"),
        (doc(issuer=f"{INSTANCE}/contoso.com/v2.0"), "2.0"),
    ],
    ids=[
        "not-json",
        "not-object",
        "bad-utf8",
        "duplicate-keys",
        "no-issuer",
        "no-jwks-uri",
        "issuer-not-string",
        "file-uri",
        "data-uri",
        "other-host",
        "v2-doc-for-v1",
        "no-tenant-id",
    ],
)
def test_discovery_garbled(body: bytes, version: str) -> None:
    with pytest.raises(GarbledDiscovery):
        parse_discovery(body, version, instance=INSTANCE)


def test_jwks_ok(
    rsa_key: rsa.RSAPrivateKey, msa_key: rsa.RSAPrivateKey, env: SimpleNamespace
) -> None:
    body = env.jwks_bytes(
        env.public_jwk(rsa_key, "k1", f"{INSTANCE}/{{tenantid}}/v2.0"),
        env.public_jwk(msa_key, "k2", f"{INSTANCE}/{env.MSA_TENANT}/v2.0"),
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "x", "y": "y"},
    )
    keys = parse_jwks(body, "2.0")
    assert sorted(keys) == ["k1", "k2"]
    assert keys["k1"].issuer == f"{INSTANCE}/{{tenantid}}/v2.0"
    assert keys["k1"].jwk.algorithm_name == "RS256"
    assert parse_jwks(body, "1.0")["k1"].issuer is None  # v1 keys carry no issuer


def test_a_key_pinned_to_another_algorithm_is_not_ours(
    rsa_key: rsa.RSAPrivateKey, msa_key: rsa.RSAPrivateKey, env: SimpleNamespace
) -> None:
    """Entra publishes no 'alg'; a key pinned to another algorithm is skipped, not refused."""
    body = env.jwks_bytes(
        {**env.public_jwk(rsa_key, "k1"), "alg": "RS256"},
        {**env.public_jwk(msa_key, "k2"), "alg": "RS384"},
    )
    assert sorted(parse_jwks(body, "2.0")) == ["k1"]


def test_a_key_the_crypto_library_refuses_is_garbled(
    rsa_key: rsa.RSAPrivateKey, env: SimpleNamespace
) -> None:
    """Numbers that pass our checks (long enough, odd exponent) but make no RSA key: the
    exponent is larger than the modulus."""
    jwk = env.public_jwk(rsa_key, "k1")
    jwk["e"] = env.b64url((2**2049 + 1).to_bytes(257, "big"))
    with pytest.raises(GarbledJwks, match=r"key 'k1' is unusable \(InvalidKeyError\)"):
        parse_jwks(env.jwks_bytes(jwk), "2.0")


def _rsa_jwk(env: SimpleNamespace, key: rsa.RSAPrivateKey, **changes: Any) -> dict[str, Any]:
    jwk = env.public_jwk(key, "k1")
    jwk.update(changes)
    return {k: v for k, v in jwk.items() if v is not None}


@pytest.mark.parametrize(
    "make",
    [
        lambda env, k: b"{not json",
        lambda env, k: b'{"keys": {}}',
        lambda env, k: b'{"keys": ["x"]}',
        lambda env, k: b'{"keys": []}',
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k), _rsa_jwk(env, k)),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, kid="../x")),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, kid=None)),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, n="!!")),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, n=None)),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, e="AA")),
        lambda env, k: env.jwks_bytes(
            env.public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "k1")
        ),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, d="AQAB")),
        lambda env, k: env.jwks_bytes(_rsa_jwk(env, k, issuer=7)),
        lambda env, k: env.jwks_bytes({"kty": "EC", "kid": "ec", "crv": "P-256"}),
    ],
    ids=[
        "not-json",
        "keys-not-array",
        "key-not-object",
        "no-keys",
        "duplicate-kid",
        "bad-kid",
        "no-kid",
        "bad-n",
        "no-n",
        "bad-e",
        "short-key",
        "private-key",
        "bad-issuer",
        "no-rsa-key",
    ],
)
def test_jwks_garbled(make: Any, rsa_key: rsa.RSAPrivateKey, env: SimpleNamespace) -> None:
    with pytest.raises(GarbledJwks):
        parse_jwks(make(env, rsa_key), "2.0")


def test_merge_conflict(
    rsa_key: rsa.RSAPrivateKey, msa_key: rsa.RSAPrivateKey, env: SimpleNamespace
) -> None:
    v1 = parse_jwks(env.jwks_bytes(env.public_jwk(rsa_key, "k1")), "1.0")
    v2 = parse_jwks(env.jwks_bytes(env.public_jwk(msa_key, "k1", "https://x/y/v2.0")), "2.0")
    with pytest.raises(GarbledJwks):
        merge_keys({"1.0": v1, "2.0": v2})
    same = parse_jwks(env.jwks_bytes(env.public_jwk(rsa_key, "k1", "https://x/y/v2.0")), "2.0")
    assert merge_keys({"1.0": v1, "2.0": same})["k1"].issuer == "https://x/y/v2.0"


def test_snapshot_tenant(rsa_key: rsa.RSAPrivateKey, env: SimpleNamespace) -> None:
    keys = parse_jwks(env.jwks_bytes(env.public_jwk(rsa_key, "k1")), "1.0")
    spec = IssuerSpec(
        name="c", instance=INSTANCE, tenant="contoso.com", versions=frozenset({"1.0", "2.0"})
    )
    snap = build_snapshot(
        spec, {"2.0": (f"{INSTANCE}/{TID}/v2.0", keys), "1.0": (f"https://sts.x/{TID}/", keys)}, 1.0
    )
    assert snap.tenant_id == TID
    assert snap.issuers["1.0"] == f"https://sts.x/{TID}/"
    multi = IssuerSpec(
        name="m", instance=INSTANCE, tenant="common", allowed_tenants=frozenset({TID})
    )
    assert (
        build_snapshot(multi, {"2.0": (f"{INSTANCE}/{{tenantid}}/v2.0", keys)}, 1.0).tenant_id
        is None
    )


@pytest.mark.parametrize(
    ("tenant", "issuers"),
    [
        ("common", {"2.0": f"{INSTANCE}/{{tenantid}}/v2.0", "1.0": f"https://sts.x/{TID}/"}),
        (
            "contoso.com",
            {
                "2.0": f"{INSTANCE}/{TID}/v2.0",
                "1.0": f"https://sts.x/{'2' * 8}-2222-4222-8222-222222222222/",
            },
        ),
        ("22222222-2222-4222-8222-222222222222", {"2.0": f"{INSTANCE}/{TID}/v2.0"}),
    ],
    ids=["template-and-concrete", "two-tenants", "other-tenant-than-configured"],
)
def test_snapshot_garbled(
    tenant: str, issuers: dict[str, str], rsa_key: rsa.RSAPrivateKey, env: SimpleNamespace
) -> None:
    keys = parse_jwks(env.jwks_bytes(env.public_jwk(rsa_key, "k1")), "1.0")
    spec = IssuerSpec(name="c", instance=INSTANCE, tenant=tenant)
    with pytest.raises(KeyFetchError):
        build_snapshot(spec, {v: (i, keys) for v, i in issuers.items()}, 1.0)


@pytest.mark.parametrize(
    ("failures", "loaded", "delay", "jitter"),
    [
        (1, True, 5.0, 2.5),  # the first retry: 5 s after the failure (was 10 s)
        (2, True, 10.0, 5.0),
        (3, True, 20.0, 10.0),
        (9, True, 1280.0, 300.0),
        (11, True, 3600.0, 300.0),  # capped at the refresh interval
        (60, True, 3600.0, 300.0),
        (0, False, 5.0, 2.5),  # never loaded and not tried yet
        (1, False, 5.0, 2.5),  # the outage at start: recovery on the documented schedule
        (0, True, 3600.0, 300.0),  # healthy: the interval +- its jitter
    ],
    ids=["1st", "2nd", "3rd", "9th", "cap", "many", "unloaded", "start-outage", "healthy"],
)
def test_retry_schedule(failures: int, loaded: bool, delay: float, jitter: float) -> None:
    spec = IssuerSpec(name="c", instance=INSTANCE, tenant=TID)
    assert retry_delay(spec, failures, loaded) == (delay, jitter)
