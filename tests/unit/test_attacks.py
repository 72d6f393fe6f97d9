"""The attack catalogue of docs (entra.md §5): one test id per case, each asserting the denial's
class, status and code. Cases 26-29 attack bearer extraction; case 4's flood (10k unknown kids
-> at most one fetch per interval) is in tests/integration/test_keys.py.

Statuses are asserted against the literal numbers of ``EXPECTED_STATUS`` below, never against the
class's own ``status`` attribute: changing a denial class's status must fail these tests."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from authz import config as authz_config
from authz.engine import Engine
from authz.identity.bearer import extract_bearer
from authz.identity.entra import TokenVerifier
from authz.policy.errors import (
    BadRequest,
    ClaimsChallenge,
    Code,
    Denial,
    Forbidden,
    RateLimited,
    Unauthenticated,
    Unavailable,
    UnknownSigningKey,
)
from authz.policy.model import RequestAttrs, TokenSettings

GRAPH_APP = "00000003-0000-0000-c000-000000000000"

# The HTTP status every denial class must answer with, as literal numbers (errors.py's table).
EXPECTED_STATUS: dict[type[Denial], int] = {
    BadRequest: 400,
    Unauthenticated: 401,
    UnknownSigningKey: 401,
    ClaimsChallenge: 401,
    Forbidden: 403,
    RateLimited: 429,
    Unavailable: 503,
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def raw_claims(m: Any, **kw: Any) -> str:
    """The default claims as compact JSON text (to splice duplicates and odd numbers in)."""
    return json.dumps(m.claims(**kw), separators=(",", ":"))


def with_sig(token: str, sig: bytes) -> str:
    h, p, _ = token.split(".")
    return f"{h}.{p}.{b64(sig)}"


def hs256_with_public_pem(m: Any, e: SimpleNamespace) -> str:
    pem = (
        m.keys[e.KID]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": e.KID}).encode())
    p = b64(json.dumps(m.claims()).encode())
    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(mac)}"


def noncanonical_last_char(m: Any, e: SimpleNamespace) -> str:
    token = m.token()
    last = token[-1]
    # 256-byte signature -> 342 chars, 2 left over: canonical last chars are A, Q, g, w.
    assert last in "AQgw"
    return token[:-1] + chr(ord(last) + 1)


Build = Callable[[Any, SimpleNamespace], str]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    denial: type[Denial]
    code: Code
    issuers: tuple[str, ...] = ("contoso",)
    no_lookup: bool = False  # rejected on syntax, before any key lookup
    settings: TokenSettings = field(default_factory=TokenSettings)


def tok(**kw: Any) -> Build:
    return lambda m, e: m.token(**kw)


U = Unauthenticated
C = Code

CASES = [
    # 1
    Case(
        "01-alg-none",
        lambda m, e: (
            f"{b64(json.dumps({'alg': 'none', 'kid': e.KID}).encode())}."
            f"{b64(json.dumps(m.claims()).encode())}."
        ),
        U,
        C.ALGORITHM_NOT_ALLOWED,
        no_lookup=True,
    ),
    Case(
        "01-alg-none-signed",
        lambda m, e: m.sign({"alg": "none", "kid": e.KID}, m.claims()),
        U,
        C.ALGORITHM_NOT_ALLOWED,
        no_lookup=True,
    ),
    # 2
    Case("02-hs256-public-key", hs256_with_public_pem, U, C.ALGORITHM_NOT_ALLOWED, no_lookup=True),
    # 3
    Case(
        "03-alg-mismatch-rs384",
        lambda m, e: m.sign(m.header(alg="RS384"), m.claims()),
        U,
        C.ALGORITHM_NOT_ALLOWED,
        no_lookup=True,
    ),
    Case(
        "03-alg-mismatch-ps256",
        lambda m, e: m.sign(m.header(alg="PS256"), m.claims()),
        U,
        C.ALGORITHM_NOT_ALLOWED,
        no_lookup=True,
    ),
    Case(
        "03-alg-mismatch-rs384-allowed",  # allowed, but the RS256 signature does not verify
        lambda m, e: m.sign(m.header(alg="RS384"), m.claims()),
        U,
        C.BAD_SIGNATURE,
        settings=TokenSettings(algorithms=frozenset({"RS256", "RS384"})),
    ),
    # 4
    Case(
        "04-unknown-kid",
        lambda m, e: m.sign(m.header(kid="Zm9yZ2Vk-kid"), m.claims()),
        UnknownSigningKey,
        C.UNKNOWN_SIGNING_KEY,
    ),
    # 5
    *(
        Case(f"05-kid-injection-{name}", build, U, C.MALFORMED_TOKEN, no_lookup=True)
        for name, build in [
            ("path", lambda m, e: m.sign(m.header(kid="../../dev/null"), m.claims())),
            ("sql", lambda m, e: m.sign(m.header(kid="' OR 1=1--"), m.claims())),
            ("10kb", lambda m, e: m.sign(m.header(kid="a" * 9000), m.claims())),
            ("non-string", lambda m, e: m.sign(m.header(kid=12345), m.claims())),
            ("missing", lambda m, e: m.sign({"typ": "JWT", "alg": "RS256"}, m.claims())),
            ("empty", lambda m, e: m.sign(m.header(kid=""), m.claims())),
        ]
    ),
    # 6
    *(
        Case(f"06-embedded-{param}", build, U, C.FORBIDDEN_HEADER_PARAMETER, no_lookup=True)
        for param, build in [
            (
                "jwk",
                lambda m, e: m.sign(
                    m.header(jwk=e.public_jwk(m.attacker, e.KID)), m.claims(), m.attacker
                ),
            ),
            (
                "jku",
                lambda m, e: m.sign(
                    m.header(jku="https://evil.example/keys"), m.claims(), m.attacker
                ),
            ),
            (
                "x5u",
                lambda m, e: m.sign(
                    m.header(x5u="https://evil.example/cert.pem"), m.claims(), m.attacker
                ),
            ),
            ("x5c", lambda m, e: m.sign(m.header(x5c=["MIIBIjAN"]), m.claims(), m.attacker)),
        ]
    ),
    # 7, 8
    Case(
        "07-crit",
        lambda m, e: m.sign(m.header(crit=["foo"], foo=1), m.claims()),
        U,
        C.FORBIDDEN_HEADER_PARAMETER,
        no_lookup=True,
    ),
    Case(
        "08-b64-false",
        lambda m, e: m.sign(m.header(b64=False, crit=["b64"]), m.claims()),
        U,
        C.FORBIDDEN_HEADER_PARAMETER,
        no_lookup=True,
    ),
    # 9, 10, 11
    Case(
        "09-wrong-aud-guid", tok(aud="77777777-7777-4777-8777-777777777777"), U, C.AUDIENCE_MISMATCH
    ),
    Case("09-wrong-aud-graph-url", tok(aud="https://graph.microsoft.com"), U, C.AUDIENCE_MISMATCH),
    Case("09-wrong-aud-graph-id", tok(aud=GRAPH_APP), U, C.AUDIENCE_MISMATCH),
    Case("10-sibling-api-uri", tok(aud="api://billing"), U, C.AUDIENCE_MISMATCH),
    Case(
        "10-sibling-api-id", tok(aud="88888888-8888-4888-8888-888888888888"), U, C.AUDIENCE_MISMATCH
    ),
    Case(
        "11-v1-aud-trailing-slash", tok(version="1.0", aud="api://orders/"), U, C.AUDIENCE_MISMATCH
    ),
    # 12
    Case(
        "12-wrong-iss-host",
        lambda m, e: m.token(iss=f"https://login.evil.test/{e.TENANT}/v2.0"),
        U,
        C.ISSUER_MISMATCH,
    ),
    Case(
        "12-wrong-iss-http",
        lambda m, e: m.token(iss=e.v2_issuer(e.TENANT).replace("https:", "http:")),
        U,
        C.ISSUER_MISMATCH,
    ),
    Case(
        "12-wrong-iss-trailing-slash",
        lambda m, e: m.token(iss=e.v2_issuer(e.TENANT) + "/"),
        U,
        C.ISSUER_MISMATCH,
    ),
    Case(
        "12-wrong-iss-case",
        lambda m, e: m.token(iss=e.v2_issuer(e.TENANT).replace("login", "LOGIN")),
        U,
        C.ISSUER_MISMATCH,
    ),
    Case(
        "12-wrong-iss-multi-tenant",
        lambda m, e: m.token(iss=e.v2_issuer(e.TENANT) + "/"),
        U,
        C.ISSUER_MISMATCH,
        issuers=("multi",),
    ),
    # 13
    Case(
        "13-v1-iss-under-v2-only",
        tok(version="1.0"),
        U,
        C.TOKEN_VERSION_NOT_ACCEPTED,
        issuers=("contoso-v2",),
    ),
    # 14
    Case(
        "14-iss-tenant-a-tid-b",
        lambda m, e: m.token(tid=e.OTHER_TENANT, iss=e.v2_issuer(e.TENANT)),
        U,
        C.ISSUER_MISMATCH,
    ),
    Case(
        "14-iss-tenant-a-tid-b-multi",
        lambda m, e: m.token(tid=e.OTHER_TENANT, iss=e.v2_issuer(e.TENANT)),
        U,
        C.ISSUER_MISMATCH,
        issuers=("multi",),
    ),
    Case("14-non-guid-tid", lambda m, e: m.token(tid="contoso.com"), U, C.INVALID_CLAIM),
    Case(
        "14-non-guid-tid-template",
        lambda m, e: m.token(tid="{tenantid}", iss=e.v2_issuer("{tenantid}")),
        U,
        C.INVALID_CLAIM,
        issuers=("multi",),
    ),
    Case("14-no-tid", lambda m, e: m.token(tid=e.DROP), U, C.MISSING_CLAIM),
    # 15
    Case(
        "15-foreign-tenant",
        lambda m, e: m.token(tid=e.OTHER_TENANT),
        U,
        C.TENANT_NOT_ALLOWED,
        issuers=("multi",),
    ),
    # 16
    Case(
        "16-key-issuer-msa-v2",
        lambda m, e: m.token(kid=e.MSA_KID),
        U,
        C.KEY_ISSUER_MISMATCH,
    ),
    Case(
        "16-key-issuer-msa-v1",
        lambda m, e: m.token(kid=e.MSA_KID, version="1.0"),
        U,
        C.KEY_ISSUER_MISMATCH,
    ),
    Case(
        "16-key-issuer-msa-multi",
        lambda m, e: m.token(kid=e.MSA_KID),
        U,
        C.KEY_ISSUER_MISMATCH,
        issuers=("multi",),
    ),
    # 17 (default clock skew 60 s)
    Case("17-expired", lambda m, e: m.token(exp=e.NOW - 61), U, C.TOKEN_EXPIRED),
    Case("17-nbf-future", lambda m, e: m.token(nbf=e.NOW + 61), U, C.TOKEN_NOT_YET_VALID),
    Case("17-iat-future", lambda m, e: m.token(iat=e.NOW + 61), U, C.TOKEN_NOT_YET_VALID),
    # 18
    *(
        Case(f"18-missing-{claim}", (lambda c: lambda m, e: m.token(**{c: e.DROP}))(claim), U, code)
        for claim, code in [
            ("exp", C.MISSING_CLAIM),
            ("nbf", C.MISSING_CLAIM),
            ("iat", C.MISSING_CLAIM),
            ("iss", C.MISSING_CLAIM),
            ("aud", C.MISSING_CLAIM),
            ("tid", C.MISSING_CLAIM),
            ("ver", C.MISSING_CLAIM),
        ]
    ),
    # 19
    Case("19-exp-string", tok(exp="1999999999"), U, C.INVALID_CLAIM),
    Case("19-exp-bool", tok(exp=True), U, C.INVALID_CLAIM),
    Case(
        "19-exp-1e400",
        lambda m, e: m.sign(
            m.header(), raw_claims(m).replace('"exp":', '"exp":1e400,"x":').encode()
        ),
        U,
        C.INVALID_CLAIM,
    ),
    Case("19-exp-float", tok(exp=1999999999.5), U, C.INVALID_CLAIM),
    Case("19-aud-object", tok(aud={}), U, C.INVALID_CLAIM),
    Case("19-aud-list", lambda m, e: m.token(aud=[e.API_ID]), U, C.INVALID_CLAIM),
    Case("19-scp-list", tok(scp=["a"]), U, C.INVALID_CLAIM),
    Case("19-roles-string", tok(roles="a"), U, C.INVALID_CLAIM),
    Case("19-roles-mixed", tok(roles=["a", 1]), U, C.INVALID_CLAIM),
    Case("19-groups-string", tok(groups="g"), U, C.INVALID_CLAIM),
    Case("19-oid-number", tok(oid=5), U, C.INVALID_CLAIM),
    Case("19-iss-number", tok(iss=5), U, C.INVALID_CLAIM),
    # 20
    Case(
        "20-signature-stripped", lambda m, e: m.token().rsplit(".", 1)[0] + ".", U, C.BAD_SIGNATURE
    ),
    Case(
        "20-signature-truncated",
        lambda m, e: with_sig(m.token(), unb64(m.token().split(".")[2])[:-10]),
        U,
        C.BAD_SIGNATURE,
    ),
    Case(
        "20-signature-bit-flip",
        lambda m, e: with_sig(
            m.token(),
            bytes([unb64(m.token().split(".")[2])[0] ^ 1]) + unb64(m.token().split(".")[2])[1:],
        ),
        U,
        C.BAD_SIGNATURE,
    ),
    Case(
        "20-signature-other-key",
        lambda m, e: m.sign(m.header(), m.claims(), m.attacker),
        U,
        C.BAD_SIGNATURE,
    ),
    # 21
    Case(
        "21-payload-tampered",
        lambda m, e: ".".join(
            [
                m.token().split(".")[0],
                b64(json.dumps(m.claims(scp="Orders.Admin")).encode()),
                m.token().split(".")[2],
            ]
        ),
        U,
        C.BAD_SIGNATURE,
    ),
    # 22
    *(
        Case(f"22-duplicate-{name}", build, U, C.DUPLICATE_CLAIM, no_lookup=True)
        for name, build in [
            (
                "tid",
                lambda m, e: m.sign(
                    m.header(), (raw_claims(m)[:-1] + f',"tid":"{e.OTHER_TENANT}"}}').encode()
                ),
            ),
            ("aud", lambda m, e: m.sign(m.header(), (raw_claims(m)[:-1] + ',"aud":"x"}').encode())),
            ("scp", lambda m, e: m.sign(m.header(), (raw_claims(m)[:-1] + ',"scp":"x"}').encode())),
            (
                "tid-TID",
                lambda m, e: m.sign(m.header(), m.claims(TID=e.OTHER_TENANT)),
            ),
            (
                "nested",
                lambda m, e: m.sign(
                    m.header(), (raw_claims(m)[:-1] + ',"_claim_names":{"a":1,"a":2}}').encode()
                ),
            ),
            (
                "header-alg",
                lambda m, e: m.sign(
                    f'{{"alg":"none","alg":"RS256","kid":"{e.KID}"}}'.encode(), m.claims()
                ),
            ),
        ]
    ),
    # 23
    *(
        Case(f"23-non-json-{name}", build, U, C.MALFORMED_TOKEN, no_lookup=True)
        for name, build in [
            ("array", lambda m, e: m.sign(m.header(), b"[]")),
            ("string", lambda m, e: m.sign(m.header(), b'"x"')),
            ("bad-utf8", lambda m, e: m.sign(m.header(), b'{"tid":"\xff\xfe"}')),
            ("utf16", lambda m, e: m.sign(m.header(), raw_claims(m).encode("utf-16"))),
            ("deep-nesting", lambda m, e: m.sign(m.header(), b"[" * 3000 + b"]" * 3000)),
            (
                "nan",
                lambda m, e: m.sign(
                    m.header(), raw_claims(m).replace('"exp":', '"exp":NaN,"x":').encode()
                ),
            ),
            ("infinity", lambda m, e: m.sign(m.header(), b'{"exp":Infinity}')),
            ("header-not-json", lambda m, e: m.sign(b"not json", m.claims())),
            ("huge-int", lambda m, e: m.sign(m.header(), b'{"exp":' + b"9" * 5000 + b"}")),
            ("trailing-garbage", lambda m, e: m.sign(m.header(), raw_claims(m).encode() + b"x")),
        ]
    ),
    Case(
        "23-non-json-deep-nesting-100k",
        lambda m, e: m.sign(m.header(), b"[" * 100_000 + b"]" * 100_000),
        U,
        C.TOKEN_TOO_LARGE,
        no_lookup=True,
    ),
    # 24
    *(
        Case(f"24-malformed-{name}", build, U, C.MALFORMED_TOKEN, no_lookup=True)
        for name, build in [
            ("2-segments", lambda m, e: m.token().rsplit(".", 1)[0]),
            ("4-segments", lambda m, e: m.token() + ".AAAA"),
            ("empty-header", lambda m, e: "." + m.token().split(".", 1)[1]),
            (
                "empty-payload",
                lambda m, e: m.token().split(".")[0] + ".." + m.token().split(".")[2],
            ),
            ("all-empty", lambda m, e: ".."),
            ("plus", lambda m, e: m.token().replace("-", "+").replace("_", "+") + "+"),
            ("slash", lambda m, e: m.token()[:-4] + "/" + m.token()[-3:]),
            ("padding", lambda m, e: m.token() + "=="),
            ("non-canonical-last-char", noncanonical_last_char),
            ("whitespace-inside", lambda m, e: m.token()[:40] + " " + m.token()[40:]),
            ("newline-inside", lambda m, e: m.token()[:40] + "\n" + m.token()[40:]),
            ("length-mod-4-is-1", lambda m, e: m.token() + "AAA"),
            ("non-ascii", lambda m, e: m.token()[:40] + "é" + m.token()[40:]),
            ("empty", lambda m, e: ""),
        ]
    ),
    # 25
    Case(
        "25-oversize-64kb",
        lambda m, e: m.token(blob="x" * 64 * 1024),
        U,
        C.TOKEN_TOO_LARGE,
        no_lookup=True,
    ),
    Case(
        "25-oversize-1mb",
        lambda m, e: m.token(blob="x" * 1024 * 1024),
        U,
        C.TOKEN_TOO_LARGE,
        no_lookup=True,
    ),
    # 30, 31, 32
    Case(
        "30-id-token-as-access-token",
        lambda m, e: m.token(scp=e.DROP, nonce="abc", aud=e.API_ID, at_hash="x"),
        U,
        C.NO_SCOPE_OR_ROLE,
    ),
    Case(
        "31-roleless-app-token",
        lambda m, e: m.token(kind="app", roles=e.DROP),
        U,
        C.APP_TOKEN_WITHOUT_ROLES,
    ),
    Case(
        "31-roleless-app-token-no-idtyp",
        lambda m, e: m.token(kind="app", roles=e.DROP, idtyp=e.DROP),
        U,
        C.APP_TOKEN_WITHOUT_ROLES,
    ),
    Case(
        "31-app-token-empty-roles",
        tok(kind="app", roles=[]),
        U,
        C.APP_TOKEN_WITHOUT_ROLES,
    ),
    Case(
        "32-graph-token-nonce",
        lambda m, e: m.sign(m.header(nonce="x" * 43), m.claims(aud=GRAPH_APP)),
        U,
        C.FORBIDDEN_HEADER_PARAMETER,
        no_lookup=True,
    ),
]


@pytest.fixture
def m(minter: Any, attacker_key: Any) -> Any:
    minter.attacker = attacker_key
    return minter


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_token_attack(case: Case, m: Any, env: SimpleNamespace, memory_keys: Any) -> None:
    token = case.build(m, env)
    verifier = TokenVerifier(case.settings, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW))
    api = env.make_api(*case.issuers)
    with pytest.raises(Denial) as info:
        verifier.verify(token, api)
    denial = info.value
    assert type(denial) is case.denial
    assert denial.status == EXPECTED_STATUS[case.denial]
    assert denial.code == case.code
    if isinstance(denial, UnknownSigningKey):
        assert denial.issuer == case.issuers[0]
    if case.no_lookup:
        assert memory_keys.lookups == 0


@pytest.mark.parametrize("cls", list(EXPECTED_STATUS), ids=lambda c: c.__name__)
def test_denial_class_status(cls: type[Denial]) -> None:
    assert cls.status == EXPECTED_STATUS[cls]


def test_catalogue_statuses_are_literal() -> None:
    # Every class the catalogue expects has a literal status here; the token attacks are all 401
    # (identity phase), the bearer attacks 400 (credential sent twice) or 401.
    assert {EXPECTED_STATUS[c.denial] for c in CASES} == {401}
    assert {EXPECTED_STATUS[b[3]] for b in BEARER_CASES if b[3] is not None} == {400, 401}


def test_catalogue_covers_every_token_case() -> None:
    numbers = {int(c.id[:2]) for c in CASES} | {int(b[0][:2]) for b in BEARER_CASES}
    assert numbers == set(range(1, 33))


# ----------------------------------------------------------------------- 26-29: bearer extraction

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"

BEARER_CASES: list[tuple[str, dict[str, str], str, type[Denial] | None, Code | None]] = [
    # (id, headers, query, expected denial class or None = accepted, code)
    (
        "26-two-authorization-headers",
        {"authorization": f"Bearer {TOKEN}, Bearer {TOKEN}"},
        "",
        BadRequest,
        C.INVALID_REQUEST,
    ),
    (
        "26-comma-in-value",
        {"authorization": f"Bearer {TOKEN},x"},
        "",
        BadRequest,
        C.INVALID_REQUEST,
    ),
    (
        "26-two-differently-cased-headers",
        {"Authorization": f"Bearer {TOKEN}", "AUTHORIZATION": f"Bearer {TOKEN}"},
        "",
        BadRequest,
        C.INVALID_REQUEST,
    ),
    ("27-scheme-lower-accepted", {"authorization": f"bearer {TOKEN}"}, "", None, None),
    ("27-scheme-upper-accepted", {"authorization": f"BEARER {TOKEN}"}, "", None, None),
    ("27-basic", {"authorization": "Basic dXNlcjpwYXNz"}, "", U, C.MALFORMED_TOKEN),
    ("27-bearer-no-token", {"authorization": "Bearer"}, "", U, C.MALFORMED_TOKEN),
    ("27-bearer-space-no-token", {"authorization": "Bearer    "}, "", U, C.MALFORMED_TOKEN),
    ("27-missing-space", {"authorization": f"Bearer{TOKEN}"}, "", U, C.MALFORMED_TOKEN),
    ("27-token-only", {"authorization": TOKEN}, "", U, C.MALFORMED_TOKEN),
    ("28-query-only-ignored", {}, f"access_token={TOKEN}", None, None),
    (
        "28-query-and-header",
        {"authorization": f"Bearer {TOKEN}"},
        f"a=1&access_token={TOKEN}",
        BadRequest,
        C.INVALID_REQUEST,
    ),
    (
        "28-encoded-query-and-header",
        {"authorization": f"Bearer {TOKEN}"},
        f"access%5Ftoken={TOKEN}",
        BadRequest,
        C.INVALID_REQUEST,
    ),
    ("28-cookie-ignored", {"cookie": f"access_token={TOKEN}"}, "", None, None),
    # A form body `access_token=...` (RFC 6750 §2.2): the body never reaches extract_bearer (nor
    # RequestAttrs; Envoy sends none, no with_request_body), so only the headers announce it.
    (
        "28-body-ignored",
        {"content-type": "application/x-www-form-urlencoded", "content-length": "52"},
        "",
        None,
        None,
    ),
    ("29-multiple-sp-accepted", {"authorization": f"Bearer    {TOKEN}"}, "", None, None),
    ("29-ows-at-ends-accepted", {"authorization": f" \tBearer {TOKEN} \t"}, "", None, None),
    ("29-tab-separator", {"authorization": f"Bearer\t{TOKEN}"}, "", U, C.MALFORMED_TOKEN),
    ("29-crlf", {"authorization": f"Bearer {TOKEN}\r\nX-Evil: 1"}, "", U, C.MALFORMED_TOKEN),
    (
        "29-lf-inside",
        {"authorization": f"Bearer {TOKEN[:10]}\n{TOKEN[10:]}"},
        "",
        U,
        C.MALFORMED_TOKEN,
    ),
    ("29-nul", {"authorization": f"Bearer {TOKEN}\x00"}, "", U, C.MALFORMED_TOKEN),
    ("29-nbsp", {"authorization": f"Bearer\u00a0{TOKEN}"}, "", U, C.MALFORMED_TOKEN),
    (
        "29-em-space-inside",
        {"authorization": f"Bearer {TOKEN[:10]}\u2003{TOKEN[10:]}"},
        "",
        U,
        C.MALFORMED_TOKEN,
    ),
    (
        "29-space-inside-token",
        {"authorization": f"Bearer {TOKEN[:10]} {TOKEN[10:]}"},
        "",
        U,
        C.MALFORMED_TOKEN,
    ),
    ("29-non-b64token-char", {"authorization": f"Bearer {TOKEN}!"}, "", U, C.MALFORMED_TOKEN),
]


@pytest.mark.parametrize(
    ("headers", "query", "denial", "code"),
    [c[1:] for c in BEARER_CASES],
    ids=[c[0] for c in BEARER_CASES],
)
def test_bearer_attack(
    headers: dict[str, str], query: str, denial: type[Denial] | None, code: Code | None
) -> None:
    if denial is None:
        got = extract_bearer(headers, query)
        assert got == (None if "authorization" not in headers else TOKEN)
        return
    with pytest.raises(Denial) as info:
        extract_bearer(headers, query)
    assert type(info.value) is denial
    assert info.value.status == EXPECTED_STATUS[denial]
    assert info.value.code == code


ORDERS_CONFIG = """
issuers:
  - {name: contoso, tenant: 11111111-1111-4111-8111-111111111111}
apis:
  - name: orders
    audiences: [api://orders, 33333333-3333-4333-8333-333333333333]
    issuers: [contoso]
    routes:
      - {name: create, path: /orders, require: authenticated}
"""


@pytest.mark.parametrize(
    ("where", "status", "code"),
    [
        ("header", 200, C.OK),  # control: the same token is good where it belongs
        ("body", 401, C.MISSING_TOKEN),
        ("query", 401, C.MISSING_TOKEN),
        ("cookie", 401, C.MISSING_TOKEN),
    ],
)
def test_28_token_outside_the_header_is_no_credential(
    where: str, status: int, code: Code, m: Any, env: SimpleNamespace, memory_keys: Any
) -> None:
    """Case 28 through the engine: a valid token anywhere but ``Authorization`` is no credential
    (401 missing_token), not a token. The request body is not even representable: RequestAttrs
    has no body field, so a form body ``access_token=`` can never be read."""
    assert "body" not in {f.name for f in dataclasses.fields(RequestAttrs)}
    token = m.token(aud="api://orders")
    path, headers = "/orders", {}
    if where == "header":
        headers = {"authorization": f"Bearer {token}"}
    elif where == "body":
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "content-length": str(len(f"access_token={token}")),
        }
    elif where == "query":
        path = f"/orders?access_token={token}"
    else:
        headers = {"cookie": f"access_token={token}"}
    settings = authz_config.parse(ORDERS_CONFIG, env={})
    verifier = TokenVerifier(
        settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW)
    )
    decision = Engine(settings, verifier).check(
        RequestAttrs(method="POST", path=path, headers=headers, context={"api": "orders"})
    )
    assert (decision.status, decision.code) == (status, code)


def test_no_loaded_keys_is_unavailable(m: Any, env: SimpleNamespace) -> None:
    verifier = TokenVerifier(TokenSettings(), env.ISSUERS, env.MemoryKeys())
    with pytest.raises(Unavailable) as info:
        verifier.verify(m.token(), env.make_api())
    assert info.value.status == 503
    assert info.value.code == C.KEYS_UNAVAILABLE
