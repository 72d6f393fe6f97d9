"""Decision rendering: the identity-header contract on allow, challenges and bodies on deny."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote

import pytest

from authz import engine
from authz.engine import new_decision_id
from authz.policy.decisions import ResponsePlan, allow, deny, internal_error, www_authenticate
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
from authz.policy.headers import _MEMO_MAX, HeaderPlan, claim_header_value, safe_header_value
from authz.policy.model import (
    AUTHENTICATED,
    Actor,
    ApiSpec,
    HeaderContract,
    Principal,
    Route,
    TokenKind,
)

CONTRACT = HeaderContract(also_strip=("x-user-email",))
ROUTE = Route(name="read", path="/orders/{id}", path_kind="template", require=AUTHENTICATED)
API = ApiSpec(
    name="orders",
    audiences=frozenset({"api://orders"}),
    issuers=("contoso",),
    routes=(ROUTE,),
    claim_headers=(("x-user-name", "name"), ("x-groups", "groups"), ("x-missing", "nope")),
    realm="orders",
)
BARE_API = replace(API, claim_headers=(), realm="")
FORWARDING_API = replace(API, forward_authorization=True, claim_headers=())
METADATA_API = replace(
    API, resource_metadata="https://orders.example.com/.well-known/oauth-protected-resource"
)

STANDARD = (
    "x-user-id",
    "x-tenant-id",
    "x-client-id",
    "x-roles",
    "x-scopes",
    "x-token-kind",
    "x-actor-kind",
)
OVERRIDES = ("x-http-method-override", "x-method-override", "x-http-method")


def principal(**kw: Any) -> Principal:
    base = Principal(
        tid="tid-1",
        oid="oid-1",
        sub="sub-1",
        client_id="azp-1",
        kind=TokenKind.USER,
        version="2.0",
        issuer="https://login.microsoftonline.com/tid-1/v2.0",
        audience="api://orders",
        provider="contoso",
        expires_at=2_000_000_000,
        roles=frozenset({"B", "A"}),
        roles_list=("B", "A"),
        scopes=frozenset({"Orders.Read", "Orders.Write"}),
        scp="Orders.Read Orders.Write",
        claims=MappingProxyType({"name": "Ann", "groups": ["g1", "g2"]}),
    )
    return replace(base, **kw)


def allowed(api: ApiSpec | None, who: Principal | None, **kw: Any) -> Any:
    return allow(
        decision_id="d1",
        request_id="r1",
        api=api,
        route=ROUTE,
        principal=who,
        contract=CONTRACT,
        **kw,
    )


# ------------------------------------------------------------------------------------ allow


def test_allow_with_principal_sets_the_contract_and_removes_the_rest() -> None:
    d = allowed(API, principal())
    assert d.allowed
    assert (d.status, d.code, d.reason, d.would_deny) == (200, "ok", "allowed", False)
    assert (d.api, d.route, d.decision_id) == ("orders", "read", "d1")
    assert d.upstream_headers == (
        ("x-user-id", "oid-1"),
        ("x-tenant-id", "tid-1"),
        ("x-client-id", "azp-1"),
        ("x-roles", "B,A"),
        ("x-scopes", "Orders.Read Orders.Write"),
        ("x-token-kind", "user"),
        ("x-actor-kind", "human"),
        ("x-user-name", "Ann"),
        ("x-groups", "g1,g2"),
    )
    assert d.remove_headers == ("x-user-email", "x-missing", *OVERRIDES, "authorization")
    assert dict(d.metadata) == {
        "decision_id": "d1",
        "api": "orders",
        "route": "read",
        "code": "ok",
        "oid": "oid-1",
        "tid": "tid-1",
        "azp": "azp-1",
        "actor": "human",
    }
    assert d.response_headers == ()
    assert d.body == b""


def test_rendered_headers_are_reused_per_principal_and_the_memo_stays_bounded() -> None:
    plan = HeaderPlan(API, CONTRACT)
    ann = principal()
    first = plan.render(ann)
    assert plan.render(ann) is first  # the same verified principal: rendered once
    others = [principal(oid=f"oid-{i}") for i in range(_MEMO_MAX)]  # more than it keeps
    rendered = {p.oid: plan.render(p) for p in others}
    # the memo was emptied when full, and every answer is still the principal's own
    assert ("x-user-id", "oid-7") in rendered["oid-7"][0]
    again = plan.render(ann)
    assert again == first
    assert again is not first  # rendered anew after the memo was emptied


def test_anonymous_allow_removes_every_identity_header() -> None:
    d = allowed(API, None)
    assert d.upstream_headers == ()
    assert d.remove_headers == (
        *STANDARD,
        "x-user-email",
        "x-user-name",
        "x-groups",
        "x-missing",
        *OVERRIDES,
        "authorization",
    )
    assert dict(d.metadata) == {
        "decision_id": "d1",
        "api": "orders",
        "route": "read",
        "code": "ok",
        "oid": "",
        "tid": "",
        "azp": "",
        "actor": "",
    }


def test_forward_authorization_keeps_the_token_header() -> None:
    d = allowed(FORWARDING_API, None)
    assert d.remove_headers == (*STANDARD, "x-user-email", *OVERRIDES)


@pytest.mark.parametrize("who", [None, "principal"], ids=["anonymous", "verified"])
def test_method_override_headers_are_removed_unless_the_api_keeps_them(who: str | None) -> None:
    """A GET rule must not let the backend run the DELETE a method-override header names."""
    p = principal() if who else None
    stripped = allowed(BARE_API, p).remove_headers
    assert set(OVERRIDES) <= set(stripped)
    kept = allowed(replace(BARE_API, strip_method_override=False), p).remove_headers
    assert not set(OVERRIDES) & set(kept)
    assert set(stripped) - set(kept) == set(OVERRIDES)


def test_method_override_headers_are_stripped_once_when_also_listed() -> None:
    contract = HeaderContract(also_strip=("X-HTTP-Method-Override",))
    d = allow(
        decision_id="d", request_id="", api=BARE_API, route=None, principal=None, contract=contract
    )
    assert d.remove_headers.count("x-http-method-override") == 1


def test_empty_values_are_removed_not_set() -> None:
    app = principal(
        kind=TokenKind.APP,
        actor=Actor.AGENT,
        scp="",
        scopes=frozenset(),
        roles_list=(),
        claims={},
    )
    d = allowed(BARE_API, app)
    assert d.upstream_headers == (
        ("x-user-id", "oid-1"),
        ("x-tenant-id", "tid-1"),
        ("x-client-id", "azp-1"),
        ("x-token-kind", "app"),
        ("x-actor-kind", "agent"),
    )
    assert d.remove_headers == ("x-roles", "x-scopes", "x-user-email", *OVERRIDES, "authorization")


def test_configured_header_names_are_used_lower_case() -> None:
    contract = HeaderContract(user_id="X-Caller", also_strip=("X-Forged",))
    d = allow(
        decision_id="d",
        request_id="",
        api=None,
        route=None,
        principal=None,
        contract=contract,
    )
    assert d.remove_headers == ("x-caller", *STANDARD[1:], "x-forged", *OVERRIDES, "authorization")
    assert (d.api, d.route) == ("", "")


def test_dry_run_allow_carries_the_would_deny_code() -> None:
    d = allowed(API, principal(), would_deny=Forbidden(Code.MISSING_ROLE))
    assert d.allowed
    assert d.status == 200
    assert d.would_deny
    assert d.code == "missing_role"
    assert d.metadata["code"] == "missing_role"
    assert ("x-user-id", "oid-1") in d.upstream_headers


def test_unsafe_values_are_percent_encoded() -> None:
    who = principal(
        oid="a\r\nx-evil: 1",
        roles_list=("Re,ader", "ok"),
        scp=" padded ",
        claims=MappingProxyType({"name": "Jos\u00e9 100%", "groups": ["a,b", "\x00"]}),
    )
    headers = dict(allowed(API, who).upstream_headers)
    assert headers["x-user-id"] == "a%0D%0Ax-evil: 1"
    assert headers["x-roles"] == "Re%2Cader,ok"
    assert headers["x-scopes"] == "%20padded%20"
    assert headers["x-user-name"] == "Jos%C3%A9 100%25"
    assert headers["x-groups"] == "a%2Cb,%00"
    assert unquote(headers["x-user-name"]) == "Jos\u00e9 100%"
    assert [unquote(v) for v in headers["x-roles"].split(",")] == ["Re,ader", "ok"]


SAFE = [
    ("guid", "11111111-1111-4111-8111-111111111111", "11111111-1111-4111-8111-111111111111"),
    ("inner space", "a b", "a b"),
    ("percent", "50%", "50%25"),
    ("tab", "a\tb", "a%09b"),
    ("DEL", "a\x7fb", "a%7Fb"),
    ("emoji", "\U0001f600", "%F0%9F%98%80"),
    ("lone surrogate", "\ud800", "%ED%A0%80"),
    ("leading space", " a", "%20a"),
    ("only a space", " ", "%20"),
    ("comma outside lists", "a,b", "a,b"),
]


@pytest.mark.parametrize(("raw", "expected"), [s[1:] for s in SAFE], ids=[s[0] for s in SAFE])
def test_safe_header_value(raw: str, expected: str) -> None:
    assert safe_header_value(raw) == expected


CLAIMS = [
    ("string", "x", "x"),
    ("list of strings", ["a", "b"], "a,b"),
    ("list of mixed", ["a", 1, True, None], "a,1,true,null"),
    ("tuple", ("a",), "a"),
    ("int", 42, "42"),
    ("bool", False, "false"),
    ("object", {"b": 1, "a": "x"}, '{"a":"x","b":1}'),
    ("non-ascii object", {"n": "\u00e9"}, '{"n":"%C3%A9"}'),
    ("null", None, ""),
    ("empty list", [], ""),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in CLAIMS], ids=[c[0] for c in CLAIMS])
def test_claim_header_value(value: Any, expected: str) -> None:
    assert claim_header_value(value) == expected


# ------------------------------------------------------------------------------------- deny


def denied(denial: Denial, api: ApiSpec | None = API, **kw: Any) -> Any:
    return deny(denial, decision_id="d2", request_id="req-1", api=api, route=ROUTE, **kw)


CLAIMS_JSON = '{"access_token":{"acrs":{"essential":true,"value":"c1"}}}'
CLAIMS_B64 = base64.b64encode(CLAIMS_JSON.encode()).decode()
ENTRA_AUTHORIZE = "https://login.microsoftonline.com/common/oauth2/authorize"

DENIALS = [
    (
        "missing token",
        Unauthenticated(Code.MISSING_TOKEN),
        API,
        401,
        "invalid_token",
        'Bearer realm="orders"',
    ),
    (
        "expired token",
        Unauthenticated(Code.TOKEN_EXPIRED),
        API,
        401,
        "invalid_token",
        'Bearer realm="orders", error="invalid_token", error_description="\'exp\' is in the past '
        'beyond the clock skew"',
    ),
    (
        "unknown key",
        UnknownSigningKey("contoso"),
        API,
        401,
        "invalid_token",
        'Bearer realm="orders", error="invalid_token", error_description="no key with this \'kid\' '
        'for the issuer, even after a refresh"',
    ),
    (
        "claims challenge",
        ClaimsChallenge(Code.AUTH_CONTEXT_REQUIRED, claims_json=CLAIMS_JSON),
        API,
        401,
        "insufficient_claims",
        f'Bearer realm="", authorization_uri="{ENTRA_AUTHORIZE}", error="insufficient_claims", '
        f'claims="{CLAIMS_B64}"',
    ),
    (
        "missing scope",
        Forbidden(Code.MISSING_SCOPE, required_scope="Orders.Read"),
        API,
        403,
        "insufficient_scope",
        'Bearer realm="orders", error="insufficient_scope", scope="Orders.Read"',
    ),
    (
        "missing role with several",
        Forbidden(Code.MISSING_ROLE, required_scope="A B"),
        API,
        403,
        "insufficient_scope",
        'Bearer realm="orders", error="insufficient_scope", scope="A B"',
    ),
    (
        "403 without scope",
        Forbidden(Code.MISSING_GROUP),
        API,
        403,
        "insufficient_scope",
        'Bearer realm="orders", error="insufficient_scope"',
    ),
    ("no matching route", Forbidden(Code.NO_MATCHING_ROUTE), API, 403, "access_denied", None),
    ("unknown api", Forbidden(Code.UNKNOWN_API), None, 403, "access_denied", None),
    (
        "bad path",
        BadRequest(Code.NON_CANONICAL_PATH, "encoded '/' in path"),
        API,
        400,
        "invalid_request",
        'Bearer realm="orders", error="invalid_request"',
    ),
    (
        "realm falls back to the api name",
        BadRequest(Code.INVALID_REQUEST),
        BARE_API,
        400,
        "invalid_request",
        'Bearer realm="orders", error="invalid_request"',
    ),
    (
        "realm falls back to the service",
        Unauthenticated(Code.MISSING_TOKEN),
        None,
        401,
        "invalid_token",
        'Bearer realm="entra-authz"',
    ),
    ("rate limited", RateLimited("per-client", ()), API, 429, "rate_limited", None),
    (
        "keys unavailable",
        Unavailable(Code.KEYS_UNAVAILABLE),
        API,
        503,
        "temporarily_unavailable",
        None,
    ),
]


@pytest.mark.parametrize(
    ("denial", "api", "status", "error", "challenge"),
    [d[1:] for d in DENIALS],
    ids=[d[0] for d in DENIALS],
)
def test_deny(
    denial: Denial, api: ApiSpec | None, status: int, error: str, challenge: str | None
) -> None:
    d = denied(denial, api)
    assert not d.allowed
    assert d.status == status
    assert d.code == denial.code.value
    assert d.reason == denial.reason
    expected_headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    if challenge is not None:
        expected_headers = (("www-authenticate", challenge), *expected_headers)
    assert d.response_headers == expected_headers
    assert d.body == (
        f'{{"error":"{error}","code":"{denial.code.value}","request_id":"req-1"}}'.encode()
    )
    assert d.upstream_headers == ()
    assert d.remove_headers == ()
    assert d.metadata["code"] == denial.code.value
    assert d.metadata["decision_id"] == "d2"


def test_deny_metadata_names_the_principal_when_known() -> None:
    d = denied(Forbidden(Code.MISSING_ROLE), principal=principal())
    assert dict(d.metadata) == {
        "decision_id": "d2",
        "api": "orders",
        "route": "read",
        "code": "missing_role",
        "oid": "oid-1",
        "tid": "tid-1",
        "azp": "azp-1",
        "actor": "human",
    }
    assert d.principal is not None


def test_resource_metadata_is_added_to_every_challenge() -> None:
    suffix = ', resource_metadata="https://orders.example.com/.well-known/oauth-protected-resource"'
    for denial in (
        Unauthenticated(Code.MISSING_TOKEN),
        Unauthenticated(Code.BAD_SIGNATURE),
        Forbidden(Code.MISSING_SCOPE, required_scope="S"),
        BadRequest(Code.INVALID_REQUEST),
        ClaimsChallenge(Code.AUTH_CONTEXT_REQUIRED, claims_json=CLAIMS_JSON),
    ):
        challenge = www_authenticate(denial, METADATA_API)
        assert challenge is not None
        assert challenge.endswith(suffix)
        assert challenge.count("resource_metadata=") == 1


def test_configured_authorization_uri_is_used() -> None:
    d = denied(
        ClaimsChallenge(Code.AUTH_CONTEXT_REQUIRED, claims_json=CLAIMS_JSON),
        authorization_uri="https://login.microsoftonline.us/common/oauth2/authorize",
    )
    challenge = dict(d.response_headers)["www-authenticate"]
    assert (
        'authorization_uri="https://login.microsoftonline.us/common/oauth2/authorize"' in challenge
    )
    claims = challenge.split('claims="')[1].rstrip('"')
    assert json.loads(base64.b64decode(claims)) == json.loads(CLAIMS_JSON)


def test_challenge_values_are_quote_escaped_and_cleaned() -> None:
    odd = replace(API, realm='a "quoted" \\ realm\r\n')
    challenge = www_authenticate(Unauthenticated(Code.MISSING_TOKEN), odd)
    assert challenge == 'Bearer realm="a \\"quoted\\" \\\\ realm"'


def test_error_descriptions_never_contain_quotes_or_backslashes() -> None:
    for code in Code:
        challenge = www_authenticate(Unauthenticated(code), API)
        if challenge is None or "error_description" not in challenge:
            continue
        description = challenge.split('error_description="')[1][:-1]
        assert '"' not in description
        assert "\\" not in description


def test_challenges_are_rendered_ahead_per_api() -> None:
    needs_s = Forbidden(Code.MISSING_SCOPE, required_scope="S")
    plan = ResponsePlan(API, CONTRACT, extra=[needs_s])
    first = plan.challenge(Forbidden(Code.MISSING_SCOPE, required_scope="S"))
    assert first is plan.challenge(Forbidden(Code.MISSING_SCOPE, required_scope="S"))
    assert first == www_authenticate(needs_s, API)
    other = ResponsePlan(BARE_API, CONTRACT, extra=[needs_s]).challenge(needs_s)
    assert other == first  # same realm text, different API: its own plan, rendered separately
    assert other is not first
    assert plan.challenge(Forbidden(Code.MISSING_SCOPE, required_scope="T")) != first


def test_no_token_contents_in_any_deny() -> None:
    d = denied(Unauthenticated(Code.MALFORMED_TOKEN), principal=principal(oid="secret-oid"))
    rendered = repr(d.response_headers) + d.body.decode()
    assert "secret-oid" not in rendered


def test_internal_error_is_a_503_deny() -> None:
    d = internal_error("d9", "req-9")
    assert (d.allowed, d.status, d.code) == (False, 503, "internal_error")
    assert (
        d.body
        == b'{"error":"temporarily_unavailable","code":"internal_error","request_id":"req-9"}'
    )
    assert d.response_headers == (("content-type", "application/json"),)
    assert dict(d.metadata) == {"decision_id": "d9", "code": "internal_error"}


def test_rendered_headers_are_memoised_per_principal_object() -> None:
    who = principal()
    plan = ResponsePlan(API, CONTRACT)
    first = plan.allow(decision_id="d1", route=ROUTE, principal=who)
    again = plan.allow(decision_id="d1", route=ROUTE, principal=who)
    assert first.upstream_headers is again.upstream_headers
    assert first == allowed(API, who)
    other = plan.allow(decision_id="d1", route=ROUTE, principal=replace(who, oid="oid-2"))
    assert ("x-user-id", "oid-2") in other.upstream_headers


def test_a_full_memo_drops_its_oldest_rendering_not_all() -> None:
    # One eviction per new principal (not a clear() of all): see HeaderPlan._memo.
    plan = ResponsePlan(API, CONTRACT)
    who = [principal(oid=f"oid-{i}") for i in range(_MEMO_MAX + 1)]
    first = [plan.allow(decision_id="d", route=ROUTE, principal=p).upstream_headers for p in who]
    assert plan.allow(decision_id="d", route=ROUTE, principal=who[1]).upstream_headers is first[1]
    again = plan.allow(decision_id="d", route=ROUTE, principal=who[0]).upstream_headers
    assert again is not first[0]  # the oldest went when the last came
    assert again == first[0]


def test_a_claim_header_may_replace_a_standard_header() -> None:
    spec = replace(API, claim_headers=(("X-User-Id", "upn"), ("x-roles", "nope")))
    who = principal(claims=MappingProxyType({"upn": "ann@example.com"}))
    d = allowed(spec, who)
    headers = dict(d.upstream_headers)
    assert headers["x-user-id"] == "ann@example.com"
    assert "x-roles" not in headers
    assert d.remove_headers == ("x-roles", "x-user-email", *OVERRIDES, "authorization")


def test_decision_ids_are_unique_128_bit_hex_across_batches() -> None:
    engine._id_pool.clear()
    ids = [new_decision_id() for _ in range(3 * engine._ID_BATCH + 7)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
