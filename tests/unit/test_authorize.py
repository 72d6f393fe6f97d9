"""Requirement evaluation: clause fields, alternatives, overage, auth context, closest denial."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from authz.policy.authorize import CompiledRequirement, authorize
from authz.policy.errors import ClaimsChallenge, Code, Forbidden
from authz.policy.model import (
    ANONYMOUS,
    AUTHENTICATED,
    Clause,
    Principal,
    Requirement,
    TokenKind,
)

TENANT = "11111111-1111-4111-8111-111111111111"
OTHER_TENANT = "22222222-2222-4222-8222-222222222222"
CLIENT = "bbbbbbbb-0000-4000-8000-00000000000b"
GROUP = "33333333-3333-4333-8333-333333333333"


def principal(**kw: Any) -> Principal:
    base = Principal(
        tid=TENANT,
        oid="oid-1",
        sub="sub-1",
        client_id=CLIENT,
        kind=TokenKind.USER,
        version="2.0",
        issuer=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        audience="api://orders",
        provider="contoso",
        expires_at=2_000_000_000,
    )
    return replace(base, **kw)


USER = principal(scopes=frozenset({"Orders.Read"}), scp="Orders.Read")
APP = principal(kind=TokenKind.APP, roles=frozenset({"Orders.Read.All"}))


def req(**kw: Any) -> Requirement:
    return Requirement(any_of=(Clause(**kw),))


fs = frozenset


@pytest.mark.parametrize(
    ("requirement", "only"),
    [
        (AUTHENTICATED, True),
        (Requirement(), True),
        (ANONYMOUS, False),
        (req(roles_any=frozenset({"A"})), False),
        (Requirement(any_of=(Clause(), Clause(token_kind=TokenKind.APP))), False),
    ],
    ids=["authenticated", "default", "anonymous", "a-role", "two-clauses"],
)
def test_authenticated_only_means_any_valid_token_and_nothing_more(
    requirement: Requirement, only: bool
) -> None:
    """What ``authz explain`` prints as "any valid token"."""
    assert requirement.authenticated_only is only


PASSING = [
    ("anonymous", ANONYMOUS, principal()),
    ("authenticated only", AUTHENTICATED, principal()),
    ("token kind user", req(token_kind=TokenKind.USER), USER),
    ("token kind any", req(token_kind=TokenKind.ANY), APP),
    ("tenant listed", req(tenants=fs({TENANT})), USER),
    ("client listed", req(clients=fs({CLIENT, "other"})), USER),
    ("roles any", req(roles_any=fs({"A", "B"})), principal(roles=fs({"B"}))),
    ("roles all", req(roles_all=fs({"A", "B"})), principal(roles=fs({"A", "B", "C"}))),
    ("scopes any", req(scopes_any=fs({"Orders.Read", "X"})), USER),
    ("scopes all", req(scopes_all=fs({"a", "b"})), principal(scopes=fs({"a", "b"}))),
    ("group member", req(groups_any=fs({GROUP, "g2"})), principal(groups=fs({GROUP}))),
    ("auth context present", req(auth_context="c1"), principal(acrs=fs({"c1", "c2"}))),
    (
        "every field at once",
        req(
            token_kind=TokenKind.USER,
            tenants=fs({TENANT}),
            clients=fs({CLIENT}),
            roles_any=fs({"R"}),
            roles_all=fs({"R"}),
            scopes_any=fs({"S"}),
            scopes_all=fs({"S"}),
            groups_any=fs({GROUP}),
            auth_context="c1",
        ),
        principal(roles=fs({"R"}), scopes=fs({"S"}), groups=fs({GROUP}), acrs=fs({"c1"})),
    ),
]


@pytest.mark.parametrize(
    ("requirement", "who"), [p[1:] for p in PASSING], ids=[p[0] for p in PASSING]
)
def test_passes(requirement: Requirement, who: Principal) -> None:
    authorize(requirement, who)


FAILING = [
    (
        "wrong kind app on user route",
        req(token_kind=TokenKind.USER),
        APP,
        Code.WRONG_TOKEN_KIND,
        "",
    ),
    (
        "wrong kind user on app route",
        req(token_kind=TokenKind.APP),
        USER,
        Code.WRONG_TOKEN_KIND,
        "",
    ),
    ("tenant not listed", req(tenants=fs({OTHER_TENANT})), USER, Code.TENANT_NOT_PERMITTED, ""),
    ("client not listed", req(clients=fs({"other"})), USER, Code.CLIENT_NOT_ALLOWED, ""),
    ("roles any missing", req(roles_any=fs({"B", "A"})), USER, Code.MISSING_ROLE, "A B"),
    (
        "roles all partial",
        req(roles_all=fs({"A", "B"})),
        principal(roles=fs({"A"})),
        Code.MISSING_ROLE,
        "A B",
    ),
    (
        "scopes any missing",
        req(scopes_any=fs({"Orders.Write"})),
        USER,
        Code.MISSING_SCOPE,
        "Orders.Write",
    ),
    (
        "scopes all partial",
        req(scopes_all=fs({"Orders.Read", "Orders.Write"})),
        USER,
        Code.MISSING_SCOPE,
        "Orders.Read Orders.Write",
    ),
    (
        "scope names are case-sensitive",
        req(scopes_any=fs({"orders.read"})),
        USER,
        Code.MISSING_SCOPE,
        "orders.read",
    ),
    (
        "roles do not satisfy scopes",
        req(scopes_any=fs({"X"})),
        principal(roles=fs({"X"})),
        Code.MISSING_SCOPE,
        "X",
    ),
    (
        "scopes do not satisfy roles",
        req(roles_any=fs({"X"})),
        principal(scopes=fs({"X"})),
        Code.MISSING_ROLE,
        "X",
    ),
    ("not in group", req(groups_any=fs({GROUP})), USER, Code.MISSING_GROUP, ""),
    (
        "groups overage",
        req(groups_any=fs({GROUP})),
        principal(groups_overage=True),
        Code.GROUPS_OVERAGE,
        "",
    ),
    (
        "groups overage even with a listed group",
        req(groups_any=fs({GROUP})),
        principal(groups=fs({GROUP}), groups_overage=True),
        Code.GROUPS_OVERAGE,
        "",
    ),
    (
        "auth context without cp1",
        req(auth_context="c1"),
        principal(acrs=fs({"c2"})),
        Code.AUTH_CONTEXT_REQUIRED,
        "",
    ),
    (
        "check order: kind before tenant",
        req(token_kind=TokenKind.APP, tenants=fs({OTHER_TENANT})),
        USER,
        Code.WRONG_TOKEN_KIND,
        "",
    ),
    (
        "check order: role before scope",
        req(roles_any=fs({"R"}), scopes_any=fs({"S"})),
        principal(),
        Code.MISSING_ROLE,
        "R",
    ),
]


@pytest.mark.parametrize(
    ("requirement", "who", "code", "scope"), [f[1:] for f in FAILING], ids=[f[0] for f in FAILING]
)
def test_forbidden(requirement: Requirement, who: Principal, code: Code, scope: str) -> None:
    with pytest.raises(Forbidden) as info:
        authorize(requirement, who)
    assert info.value.code is code
    assert info.value.status == 403
    assert info.value.required_scope == scope


# "delegated token with scope Orders.Read OR app token with role Orders.Read.All"
READ = Requirement(
    any_of=(
        Clause(token_kind=TokenKind.USER, scopes_any=fs({"Orders.Read"})),
        Clause(token_kind=TokenKind.APP, roles_any=fs({"Orders.Read.All"})),
    )
)

ALTERNATIVES = [
    ("user with scope", USER, None),
    ("app with role", APP, None),
    ("user without scope: closest is the user clause", principal(), Code.MISSING_SCOPE),
    (
        "app without role: closest is the app clause",
        principal(kind=TokenKind.APP),
        Code.MISSING_ROLE,
    ),
    (
        "user holding only the app role",
        principal(roles=fs({"Orders.Read.All"})),
        Code.MISSING_SCOPE,
    ),
]


@pytest.mark.parametrize(
    ("who", "code"), [a[1:] for a in ALTERNATIVES], ids=[a[0] for a in ALTERNATIVES]
)
def test_alternatives(who: Principal, code: Code | None) -> None:
    if code is None:
        authorize(READ, who)
        return
    with pytest.raises(Forbidden) as info:
        authorize(READ, who)
    assert info.value.code is code


def test_ties_go_to_the_first_clause() -> None:
    both_fail_at_roles = Requirement(
        any_of=(
            Clause(roles_any=fs({"First"})),
            Clause(scopes_any=fs({"x"}), roles_any=fs({"Second"})),
        )
    )
    with pytest.raises(Forbidden) as info:
        authorize(both_fail_at_roles, principal())
    assert info.value.required_scope == "First"


def test_auth_context_with_cp1_is_a_claims_challenge() -> None:
    who = principal(acrs=fs({"c2"}), client_capabilities=fs({"cp1"}))
    with pytest.raises(ClaimsChallenge) as info:
        authorize(req(auth_context="c1"), who)
    assert info.value.code is Code.AUTH_CONTEXT_REQUIRED
    assert info.value.status == 401
    assert info.value.claims_json == '{"access_token":{"acrs":{"essential":true,"value":"c1"}}}'
    assert json.loads(info.value.claims_json)["access_token"]["acrs"]["value"] == "c1"


def test_claims_challenge_only_when_everything_else_holds() -> None:
    """The challenge is the last check: a client is never sent to step up for nothing."""
    who = principal(client_capabilities=fs({"cp1"}))
    with pytest.raises(Forbidden) as info:
        authorize(req(roles_any=fs({"R"}), auth_context="c1"), who)
    assert info.value.code is Code.MISSING_ROLE


def test_auth_context_value_is_taken_from_config() -> None:
    who = principal(client_capabilities=fs({"cp1"}))
    with pytest.raises(ClaimsChallenge) as info:
        authorize(req(auth_context="c25"), who)
    assert '"value":"c25"' in info.value.claims_json


def test_requirement_without_clauses_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one clause"):
        CompiledRequirement(Requirement(any_of=()))


def test_challenge_denials_name_what_the_clauses_require() -> None:
    compiled = CompiledRequirement(
        Requirement(
            any_of=(
                Clause(roles_any=fs({"B", "A"}), scopes_all=fs({"S"})),
                Clause(auth_context="c1"),
            )
        )
    )
    shapes = [
        (d.code, getattr(d, "required_scope", ""), getattr(d, "claims_json", ""))
        for d in compiled.challenge_denials()
    ]
    assert shapes == [
        (Code.MISSING_ROLE, "A B", ""),
        (Code.MISSING_SCOPE, "S", ""),
        (
            Code.AUTH_CONTEXT_REQUIRED,
            "",
            '{"access_token":{"acrs":{"essential":true,"value":"c1"}}}',
        ),
    ]
