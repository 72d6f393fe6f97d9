"""Through real Envoy, over both ext_authz transports: statuses, challenges, and exactly which
identity headers the backend received — forged ones never among them."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from authz.dev.idp import CONTOSO, FABRIKAM
from authz.dev.stack import ADMINS_GROUP, CLIENT_APP, OTHER_APP, Reply, Stack

pytestmark = pytest.mark.e2e

CONTRACT = {"x-user-id", "x-tenant-id", "x-client-id", "x-roles", "x-scopes", "x-token-kind"}
FORGED = [
    ("x-user-id", "attacker"),
    ("x-tenant-id", "evil"),
    ("x-client-id", "evil"),
    ("x-roles", "Admin"),
    ("x-scopes", "Everything"),
    ("x-token-kind", "app"),
    ("x-user-email", "boss@example.com"),
    ("x-user-name", "Mallory"),
]


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def _identity(received: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in received.items() if k in CONTRACT or k in ("x-user-name", "x-user-email")
    }


def _allowed_identity(r: Reply) -> dict[str, Any]:
    """On an allow: the identity headers the backend received (the raw token never among them).

    Compared with ``==`` against ``_expected``, this is the FULL set: a forged header that
    survived (a second value, or a header that should have been removed) makes it differ."""
    assert r.status == 200, r.body
    got = r.backend_headers
    assert "authorization" not in got
    return _identity(got)


def _expected(
    token: str,
    kind: str,
    *,
    roles: str | None = None,
    scopes: str | None = None,
    tid: str = CONTOSO,
    client: str = CLIENT_APP,
) -> dict[str, str]:
    """The exact identity headers an allow with ``token`` must set: literal tenant, client, kind,
    roles and scopes; absent ones (no roles, no scp, no name claim) must not arrive at all."""
    claims = _claims(token)
    want = {"x-user-id": claims["oid"], "x-tenant-id": tid, "x-client-id": client}
    if roles is not None:
        want["x-roles"] = roles
    if scopes is not None:
        want["x-scopes"] = scopes
    want["x-token-kind"] = kind
    if kind == "user":
        want["x-user-name"] = claims["name"]
    else:
        assert "name" not in claims
    return want


# ------------------------------------------------------------------------------- route kinds


def test_user_token_with_scope_sets_exactly_the_contract(stack: Stack) -> None:
    token = stack.mint(scp="Orders.Read Orders.Extra", roles=("Reader",))
    claims = _claims(token)
    r = stack.request("GET", "/orders/7", token=token)
    assert r.status == 200
    got = r.backend_headers
    assert _identity(got) == {
        "x-user-id": claims["oid"],
        "x-tenant-id": CONTOSO,
        "x-client-id": claims["azp"],
        "x-roles": "Reader",
        "x-scopes": "Orders.Read Orders.Extra",
        "x-token-kind": "user",
        "x-user-name": claims["name"],
    }
    assert "authorization" not in got
    assert r.json()["path"] == "/orders/7"


def test_app_token_alternative(stack: Stack) -> None:
    token = stack.mint(kind="app", roles=("Orders.Read.All",), scp=None)
    r = stack.request("GET", "/orders/42", token=token, headers=FORGED)
    assert _allowed_identity(r) == _expected(token, "app", roles="Orders.Read.All")


def test_app_token_without_the_alternative_role_is_forbidden(stack: Stack) -> None:
    token = stack.mint(kind="app", roles=("Something.Else",), scp=None)
    r = stack.request("GET", "/orders/42", token=token)
    assert r.status == 403
    assert r.json()["code"] in ("missing_role", "wrong_token_kind")


def test_anonymous_route_without_token(stack: Stack) -> None:
    r = stack.request("GET", "/orders/healthz")
    assert r.status == 200
    assert _identity(r.backend_headers) == {}


def test_anonymous_route_with_valid_token_gets_identity(stack: Stack) -> None:
    r = stack.request("GET", "/orders/healthz", token=stack.mint(scp="Orders.Read"))
    assert r.status == 200
    assert r.backend_headers["x-token-kind"] == "user"


def test_anonymous_route_with_bad_token_gets_no_identity(stack: Stack) -> None:
    token = stack.mint(scp="Orders.Read", aud="api://someone-else")
    r = stack.request("GET", "/orders/healthz", token=token, headers=FORGED)
    assert r.status == 200
    assert _identity(r.backend_headers) == {}


def test_no_token_is_401_with_bare_challenge(stack: Stack) -> None:
    r = stack.request("GET", "/orders/7")
    assert r.status == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="orders"'
    body = r.json()
    assert body["code"] == "missing_token"
    assert body["request_id"]


def test_missing_role_is_403_insufficient_scope(stack: Stack) -> None:
    r = stack.request("POST", "/orders", token=stack.mint(scp="Orders.Read"))
    assert r.status == 403
    www = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in www
    assert 'scope="Orders.Write"' in www
    assert r.json()["code"] == "missing_role"


def test_role_route_allows_the_role(stack: Stack) -> None:
    token = stack.mint(scp="Orders.Read", roles=("Orders.Write", "Orders.Audit"))
    r = stack.request("POST", "/orders", token=token, headers=FORGED)
    assert _allowed_identity(r) == _expected(
        token, "user", roles="Orders.Write,Orders.Audit", scopes="Orders.Read"
    )


def test_app_only_route_rejects_delegated_and_other_clients(stack: Stack) -> None:
    user = stack.mint(scp="Orders.Read", roles=("Orders.Sync",))
    assert stack.request("GET", "/orders/sync/now", token=user).json()["code"] == "wrong_token_kind"
    other = stack.mint(kind="app", roles=("Orders.Sync",), scp=None, client_id=OTHER_APP)
    r = stack.request("GET", "/orders/sync/now", token=other)
    assert (r.status, r.json()["code"]) == (403, "client_not_allowed")
    ok = stack.mint(kind="app", roles=("Orders.Sync",), scp=None, client_id=CLIENT_APP)
    r = stack.request("GET", "/orders/sync/now", token=ok, headers=FORGED)
    assert _allowed_identity(r) == _expected(ok, "app", roles="Orders.Sync")


def test_token_for_another_api_is_rejected(stack: Stack) -> None:
    r = stack.request(
        "GET", "/orders/7", token=stack.mint(scp="Orders.Read", aud="api://inventory")
    )
    assert r.status == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json()["code"] == "audience_mismatch"


def test_multi_tenant_allowlist(stack: Stack) -> None:
    ok = stack.mint(tid=FABRIKAM, scp="Orders.Read")
    assert stack.request("GET", "/orders/7", token=ok).status == 200


def test_groups_route(stack: Stack) -> None:
    member = stack.mint(scp="Orders.Read", groups=(ADMINS_GROUP,))
    r = stack.request("GET", "/orders/admin/users", token=member, headers=FORGED)
    # groups decide the route; they are not part of the header contract
    assert _allowed_identity(r) == _expected(member, "user", scopes="Orders.Read")
    assert not any("group" in h for h in r.backend_headers)
    outsider = stack.mint(scp="Orders.Read", groups=())
    r = stack.request("GET", "/orders/admin/users", token=outsider)
    assert (r.status, r.json()["code"]) == (403, "missing_group")
    overage = stack.mint(scp="Orders.Read", extra={"_claim_names": {"groups": "src1"}})
    r = stack.request("GET", "/orders/admin/users", token=overage)
    assert (r.status, r.json()["code"]) == (403, "groups_overage")


@pytest.mark.parametrize(
    "shape", ["user-scope", "user-scope-and-roles", "user-v1", "app", "partner-app"]
)
def test_authenticated_route_sets_exactly_the_contract(stack: Stack, shape: str) -> None:
    # require: authenticated: any valid token for the API, whatever its scopes or roles.
    if shape == "user-scope":
        token = stack.mint(scp="Something.Unrelated")
        want = _expected(token, "user", scopes="Something.Unrelated")
    elif shape == "user-scope-and-roles":
        token = stack.mint(scp="Orders.Read Orders.Extra", roles=("Reader", "Writer"))
        want = _expected(token, "user", roles="Reader,Writer", scopes="Orders.Read Orders.Extra")
    elif shape == "user-v1":
        token = stack.mint(version="1.0", scp="Orders.Read")
        assert "azp" not in _claims(token)  # x-client-id comes from 'appid'
        want = _expected(token, "user", scopes="Orders.Read")
    elif shape == "app":
        token = stack.mint(kind="app", roles=("Something.Else",), scp=None, client_id=OTHER_APP)
        want = _expected(token, "app", roles="Something.Else", client=OTHER_APP)
    else:
        token = stack.mint(tid=FABRIKAM, kind="app", roles=("Orders.Sync",), scp=None)
        want = _expected(token, "app", roles="Orders.Sync", tid=FABRIKAM)
    r = stack.request("GET", "/orders/me/profile", token=token, headers=FORGED)
    assert _allowed_identity(r) == want
    assert r.json()["path"] == "/orders/me/profile"


def test_authenticated_route_still_needs_a_valid_token(stack: Stack) -> None:
    r = stack.request("GET", "/orders/me/profile", headers=FORGED)
    assert (r.status, r.json()["code"]) == (401, "missing_token")
    assert r.headers["www-authenticate"] == 'Bearer realm="orders"'
    token = stack.mint(scp="Orders.Read", aud="api://inventory")
    r = stack.request("GET", "/orders/me/profile", token=token, headers=FORGED)
    assert (r.status, r.json()["code"]) == (401, "audience_mismatch")
    expired = stack.mint(scp="Orders.Read", lifetime=-600, iat_offset=-4200)
    r = stack.request("GET", "/orders/me/profile", token=expired)
    assert (r.status, r.json()["code"]) == (401, "token_expired")
    # the route is GET only, and the prefix /orders/me/ leaves /orders/me to the read route
    app = stack.mint(kind="app", roles=("Something.Else",), scp=None)
    assert stack.request("GET", "/orders/me/profile", token=app).status == 200
    r = stack.request("POST", "/orders/me/profile", token=app)
    assert (r.status, r.json()["code"]) == (403, "no_matching_route")
    r = stack.request("GET", "/orders/me", token=app)
    assert (r.status, r.json()["code"]) == (403, "missing_role")


def test_auth_context_challenge(stack: Stack) -> None:
    capable = stack.mint(scp="Orders.Read", extra={"xms_cc": ["cp1"]})
    r = stack.request("POST", "/orders/9/approve", token=capable)
    assert r.status == 401
    www = r.headers["www-authenticate"]
    assert 'error="insufficient_claims"' in www
    claims_b64 = www.split('claims="', 1)[1].split('"', 1)[0]
    assert json.loads(base64.b64decode(claims_b64)) == {
        "access_token": {"acrs": {"essential": True, "value": "c1"}}
    }
    plain = stack.mint(scp="Orders.Read")
    assert stack.request("POST", "/orders/9/approve", token=plain).status == 403
    stepped_up = stack.mint(scp="Orders.Read", extra={"acrs": ["c1"]})
    assert stack.request("POST", "/orders/9/approve", token=stepped_up).status == 200


def test_dry_run_route_allows_and_reports(stack: Stack) -> None:
    r = stack.request("GET", "/orders/reports/q3", token=stack.mint(scp="Orders.Read"))
    assert r.status == 200
    assert r.backend_headers["x-token-kind"] == "user"
    r = stack.request("GET", "/orders/reports/q3", headers=FORGED)
    assert r.status == 200
    assert _identity(r.backend_headers) == {}


# ------------------------------------------------------------------------------ forgery


@pytest.mark.parametrize("with_token", [True, False], ids=["valid-token", "no-token"])
def test_forged_identity_headers_never_arrive(stack: Stack, with_token: bool) -> None:
    token = stack.mint(scp="Orders.Read") if with_token else None
    path = "/orders/7" if with_token else "/orders/healthz"
    doubled = [*FORGED, ("x-user-id", "attacker2"), ("x-roles", "Root")]
    r = stack.request("GET", path, token=token, headers=doubled)
    assert r.status == 200
    got = _identity(r.backend_headers)
    flat = json.dumps(got)
    for _, forged in doubled:
        assert forged not in flat
    if with_token:
        assert set(got) == CONTRACT - {"x-roles"} | {"x-user-name"}
        assert isinstance(got["x-user-id"], str)  # exactly one value, not an appended list
    else:
        assert got == {}


# ------------------------------------------------------------------------------ hostile tokens


def _hostile(stack: Stack, case: str) -> tuple[str | None, list[tuple[str, str]]]:
    good = stack.mint(scp="Orders.Read")
    h, p, s = good.split(".")
    if case == "alg-none":
        return f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': stack.idp.active_kid})}.{p}.", []
    if case == "tampered-payload":
        claims = _claims(good)
        claims["scp"] = "Orders.Read Orders.Admin"
        return f"{h}.{_b64(claims)}.{s}", []
    if case == "bad-signature":
        return f"{h}.{p}.{s[:-4]}{'AAAA' if not s.endswith('AAAA') else 'BBBB'}", []
    if case == "unknown-kid":
        return stack.mint(scp="Orders.Read", header_extra={"kid": "no-such-key"}), []
    if case == "expired":
        return stack.mint(scp="Orders.Read", lifetime=-600, iat_offset=-4200), []
    if case == "two-authorization-headers":
        return None, [("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}")]
    if case == "crit-header":
        return stack.mint(scp="Orders.Read", header_extra={"crit": ["foo"], "foo": 1}), []
    if case == "id-token-shape":
        return stack.mint(scp=None, roles=None), []
    raise AssertionError(case)


# The hostile-token subset of the attack catalogue that runs through Envoy (also replayed by the
# token-leak test in test_shutdown_and_leaks.py).
HOSTILE_CASES = [
    ("alg-none", 401, "algorithm_not_allowed"),
    ("tampered-payload", 401, "bad_signature"),
    ("bad-signature", 401, "bad_signature"),
    ("unknown-kid", 401, "unknown_signing_key"),
    ("expired", 401, "token_expired"),
    ("two-authorization-headers", 400, "invalid_request"),
    ("crit-header", 401, "forbidden_header_parameter"),
    ("id-token-shape", 401, "no_scope_or_role"),
]


@pytest.mark.parametrize(("case", "status", "code"), HOSTILE_CASES)
def test_hostile_tokens(stack: Stack, case: str, status: int, code: str) -> None:
    token, headers = _hostile(stack, case)
    r = stack.request("GET", "/orders/7", token=token, headers=headers + FORGED)
    assert (r.status, r.json()["code"]) == (status, code)
    assert "eyJ" not in r.body.decode()
    assert "eyJ" not in r.headers.get("www-authenticate", "")


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/orders/healthz/..%2f7", 400),  # encoded slash: Envoy rejects (REJECT_REQUEST)
        ("GET", "/orders/healthz/..%2F..%2Forders%2F7", 400),
        ("GET", "/orders/7;x=1", 400),  # path parameters: authz non_canonical_path
        ("GET", "/orders/healthz%00", 400),
        ("GET", "/ORDERS/healthz", 403),  # case-sensitive: no route, default deny
        # Encoded dot-dot: Envoy decodes %2e and resolves it (normalize_path), so the request is
        # judged as /orders/admin/x, the admin route that needs a token; never the anonymous one.
        ("GET", "/orders/healthz/%2e%2e/admin/x", 401),
        # Leading double slash: merge_slashes makes it /orders/admin/x; same admin route.
        ("GET", "//orders/admin/x", 401),
        ("get", "/orders/healthz", 400),  # Envoy rejects it; authz would not match GET routes
    ],
)
def test_path_bypasses_without_token(stack: Stack, method: str, path: str, status: int) -> None:
    r = stack.request(method, path, headers=FORGED)
    assert r.status == status


@pytest.mark.parametrize(
    "path",
    ["/orders/export:all", "/orders/export%3Aall", "/orders/export%3aall"],
    ids=["raw", "encoded", "encoded-lower-hex"],
)
def test_encoded_colon_selects_the_same_exact_route(stack: Stack, path: str) -> None:
    # The exact 'export' route needs Orders.Export. An encoded ':' must not make the request fall
    # through to the 'read' template (/orders/{id}), which this Orders.Read token satisfies.
    token = stack.mint(scp="Orders.Read")
    r = stack.request("GET", path, token=token, headers=FORGED)
    assert r.status == 403, r.body
    assert r.json()["code"] == "missing_role"
    assert stack.request("GET", "/orders/export-all", token=token).status == 200  # 'read'


def test_method_override_headers_never_reach_the_backend(stack: Stack) -> None:
    overrides = [
        ("x-http-method-override", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
    ]
    for token in (stack.mint(scp="Orders.Read"), None):
        path = "/orders/7" if token else "/orders/healthz"  # a GET rule; authenticated, anonymous
        r = stack.request("GET", path, token=token, headers=overrides)
        assert r.status == 200, r.body
        got = r.backend_headers
        assert not {name for name, _ in overrides} & set(got), got
        assert r.json()["method"] == "GET"


def test_dot_segments_are_normalised_consistently(stack: Stack) -> None:
    # Envoy normalises first; authz decides on what the backend receives.
    r = stack.request("GET", "/orders/admin/../healthz")
    assert r.status == 200
    assert r.json()["path"] == "/orders/healthz"
    r = stack.request("GET", "/orders/healthz/../admin/x")
    assert r.status == 401  # reached the admin route, which needs a token


def test_decision_lands_in_envoy_dynamic_metadata(stack: Stack) -> None:
    r = stack.request(
        "POST",
        "/orders",
        token=stack.mint(scp="Orders.Read"),
        headers=[("x-request-id", "e2e-meta-1")],
    )
    assert r.status == 403
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            ln for ln in stack.logs().splitlines() if "e2e-meta-1" in ln and "authz_code" in ln
        ]
        if lines:
            break
        time.sleep(0.1)
    entry = json.loads(lines[0][lines[0].index("{") :])
    assert entry["authz_code"] == "missing_role"
    assert entry["api"] == "orders"
    assert entry["route"] == "write"
    assert len(entry["decision_id"]) == 32
