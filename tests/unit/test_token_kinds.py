"""Issue 15: who acts behind a token (human / agent / app) and certificate-bound tokens (RFC 8705),
over the pure core: detection in the verifier, the ``actor`` requirement, the binding check, and
both through the engine (headers, metadata, dry-run, anonymous routes)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from authz import config as authz_config
from authz.engine import Engine
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.policy.authorize import authorize
from authz.policy.binding import check_binding
from authz.policy.errors import Code, Forbidden, Unauthenticated
from authz.policy.model import (
    UNREADABLE_CERT,
    Actor,
    ActorRule,
    BoundTokens,
    Clause,
    Principal,
    RequestAttrs,
    Requirement,
    TokenKind,
)

BLUEPRINT = "30cf4c22-9985-4ef7-8756-91cc888176bd"
THUMB = "q3ZtnS6ScmD4m1ADaZcwcfW2wO5iTL3wJNuHXJKf6_g"
OTHER_THUMB = "AAAAnS6ScmD4m1ADaZcwcfW2wO5iTL3wJNuHXJKf6_g"

# The four kinds of caller (docs/token-kinds.md), as the minter's claim overrides.
KINDS: dict[str, dict[str, Any]] = {
    # a person through a client app
    "human-user": {"kind": "user"},
    # an agent through its own agent user account: it looks like a person (idtyp=user, scp)
    "agent-as-user": {
        "kind": "user",
        "idtyp": "user",
        "xms_par_app_azp": BLUEPRINT,
        "xms_sub_fct": "13",
        "xms_act_fct": "11",
    },
    # an agent acting autonomously: an app-only token with the agent markers
    "agent-app": {
        "kind": "app",
        "xms_par_app_azp": BLUEPRINT,
        "xms_act_fct": "3 9 11",
        "xms_sub_fct": "9 3 11",
    },
    # an ordinary application (client credentials)
    "plain-app": {"kind": "app"},
}
EXPECTED = {
    "human-user": (TokenKind.USER, Actor.HUMAN),
    "agent-as-user": (TokenKind.USER, Actor.AGENT),
    "agent-app": (TokenKind.APP, Actor.AGENT),
    "plain-app": (TokenKind.APP, Actor.APP),
}


# ----------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_kind_is_detected(
    name: str, verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    p = verifier.verify(minter.token(**KINDS[name]), env.make_api())
    assert (p.kind, p.actor) == EXPECTED[name]


@pytest.mark.parametrize(
    "claims",
    [
        {"xms_par_app_azp": BLUEPRINT},  # the blueprint alone marks an agent
        {"xms_act_fct": "11"},  # an agent acting for a person (on-behalf-of): the actor facet
        {"xms_sub_fct": "1 13"},  # the subject is an agent user
        {"xms_act_fct": "3 9", "xms_sub_fct": "13"},
    ],
    ids=["blueprint", "actor-facet", "subject-facet", "second-claim"],
)
def test_any_agent_marker_makes_an_agent(
    claims: dict[str, Any], verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    p = verifier.verify(minter.token(**claims), env.make_api())
    assert (p.kind, p.actor) == (TokenKind.USER, Actor.AGENT)


@pytest.mark.parametrize(
    "claims",
    [
        {"xms_par_app_azp": ""},
        {"xms_act_fct": "1 3 9"},
        {"xms_sub_fct": ""},
        {"xms_act_fct": "111"},
    ],
    ids=["empty-blueprint", "other-facets", "no-facets", "not-a-facet"],
)
def test_other_facet_values_are_not_agents(
    claims: dict[str, Any], verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    assert verifier.verify(minter.token(**claims), env.make_api()).actor is Actor.HUMAN


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("xms_par_app_azp", 1),
        ("xms_par_app_azp", None),
        ("xms_act_fct", ["11"]),
        ("xms_act_fct", 11),
        ("xms_sub_fct", None),
        ("cnf", "x"),
        ("cnf", None),
        ("cnf", {"x5t#S256": 1}),
    ],
)
def test_mistyped_agent_and_cnf_claims_are_refused(
    claim: str, value: Any, verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    """An agent marker we cannot read could hide an agent: refused, not read as 'no agent'."""
    with pytest.raises(Unauthenticated) as denied:
        verifier.verify(minter.token(**{claim: value}), env.make_api())
    assert denied.value.code is Code.INVALID_CLAIM


@pytest.mark.parametrize(
    ("cnf", "bound", "x5t"),
    [
        (None, False, ""),
        ({"x5t#S256": THUMB}, True, THUMB),
        ({"jkt": "dpop-key-thumbprint"}, True, ""),
    ],
    ids=["unbound", "x5t", "other-method"],
)
def test_the_cnf_claim_is_read(
    cnf: dict[str, Any] | None,
    bound: bool,
    x5t: str,
    verifier: TokenVerifier,
    minter: Any,
    env: SimpleNamespace,
) -> None:
    claims = {} if cnf is None else {"cnf": cnf}
    p = verifier.verify(minter.token(**claims), env.make_api())
    assert (p.bound, p.cnf_x5t) == (bound, x5t)


# ------------------------------------------------------------------------- actor requirement


def _who(actor: Actor) -> Principal:
    return Principal(
        tid="t",
        oid="o",
        sub="s",
        client_id="c",
        kind=TokenKind.APP if actor is Actor.APP else TokenKind.USER,
        version="2.0",
        issuer="i",
        audience="a",
        provider="p",
        expires_at=2_000_000_000,
        actor=actor,
    )


ACTOR_TABLE = [
    (ActorRule.NOT_AGENT, {Actor.HUMAN, Actor.APP}),
    (ActorRule.HUMAN, {Actor.HUMAN}),
    (ActorRule.AGENT, {Actor.AGENT}),
    (ActorRule.ANY, {Actor.HUMAN, Actor.APP, Actor.AGENT}),
]


@pytest.mark.parametrize(("rule", "admitted"), ACTOR_TABLE, ids=[r.value for r, _ in ACTOR_TABLE])
@pytest.mark.parametrize("actor", list(Actor), ids=[a.value for a in Actor])
def test_actor_rule(rule: ActorRule, admitted: set[Actor], actor: Actor) -> None:
    requirement = Requirement(any_of=(Clause(actor=rule),))
    if actor in admitted:
        authorize(requirement, _who(actor))
        return
    with pytest.raises(Forbidden) as denied:
        authorize(requirement, _who(actor))
    assert denied.value.code is Code.ACTOR_NOT_ALLOWED
    assert denied.value.status == 403


def test_the_default_clause_admits_no_agent() -> None:
    assert Clause().actor is ActorRule.NOT_AGENT
    with pytest.raises(Forbidden) as denied:
        authorize(Requirement(), _who(Actor.AGENT))  # `require: authenticated`
    assert denied.value.code is Code.ACTOR_NOT_ALLOWED


def test_actor_is_checked_after_token_kind_and_before_the_rest() -> None:
    agent_app = replace(_who(Actor.AGENT), kind=TokenKind.APP)
    user_only = Requirement(any_of=(Clause(token_kind=TokenKind.USER, roles_any=frozenset("R")),))
    with pytest.raises(Forbidden) as denied:
        authorize(user_only, agent_app)
    assert denied.value.code is Code.WRONG_TOKEN_KIND
    with pytest.raises(Forbidden) as denied:
        authorize(Requirement(any_of=(Clause(roles_any=frozenset("R")),)), agent_app)
    assert denied.value.code is Code.ACTOR_NOT_ALLOWED
    # the closest clause wins: an agent clause that fails later (missing_role) beats it
    either = Requirement(any_of=(Clause(), Clause(actor=ActorRule.AGENT, roles_any=frozenset("R"))))
    with pytest.raises(Forbidden) as denied:
        authorize(either, agent_app)
    assert denied.value.code is Code.MISSING_ROLE


# ----------------------------------------------------------------------------- binding check


def _bound(x5t: str | None) -> Principal:
    """None: an unbound token; "": bound by another method; else bound to that thumbprint."""
    p = _who(Actor.APP)
    return p if x5t is None else replace(p, bound=True, cnf_x5t=x5t)


OFF, WHEN, ALWAYS = BoundTokens.OFF, BoundTokens.WHEN_PRESENT, BoundTokens.ALWAYS
BINDING_TABLE = [
    # mode, token's binding, presented certificate, expected code (None = passes)
    (OFF, THUMB, "", None),
    (OFF, "", "", None),
    (OFF, None, "", None),
    (WHEN, None, "", None),
    (WHEN, None, THUMB, None),
    (WHEN, THUMB, THUMB, None),
    (WHEN, THUMB, "", Code.TOKEN_BINDING_MISSING),
    (WHEN, THUMB, OTHER_THUMB, Code.TOKEN_BINDING_MISMATCH),
    (WHEN, THUMB, UNREADABLE_CERT, Code.TOKEN_BINDING_MISMATCH),
    (WHEN, "", THUMB, Code.TOKEN_BINDING_UNSUPPORTED),
    (WHEN, "é", THUMB, Code.TOKEN_BINDING_MISMATCH),  # non-ASCII cnf: compared, never crashes
    (ALWAYS, THUMB, THUMB, None),
    (ALWAYS, None, THUMB, Code.TOKEN_NOT_BOUND),
    (ALWAYS, None, "", Code.TOKEN_NOT_BOUND),
    (ALWAYS, THUMB, "", Code.TOKEN_BINDING_MISSING),
    (ALWAYS, "", THUMB, Code.TOKEN_BINDING_UNSUPPORTED),
]


@pytest.mark.parametrize(
    ("mode", "x5t", "presented", "code"),
    BINDING_TABLE,
    ids=[
        f"{m.value}-{(x is None and 'unbound') or x or 'other'}-{p or 'nocert'}"
        for m, x, p, _ in BINDING_TABLE
    ],
)
def test_binding(mode: BoundTokens, x5t: str | None, presented: str, code: Code | None) -> None:
    if code is None:
        check_binding(mode, _bound(x5t), presented)
        return
    with pytest.raises(Unauthenticated) as denied:
        check_binding(mode, _bound(x5t), presented)
    assert denied.value.code is code
    assert denied.value.status == 401


# ------------------------------------------------------------------------------- the engine

CONFIG = """
issuers:
  - name: contoso
    instance: "https://login.example.test"
    tenant: "11111111-1111-4111-8111-111111111111"
    versions: ["1.0", "2.0"]
apis:
  - name: orders
    audiences: ["api://orders"]
    issuers: [contoso]
    require_bound_tokens: {binding}
    routes:
      - {{name: health, path: /orders/healthz, require: anonymous}}
      - {{name: people, path: /orders/people, require: {{token_kind: user}}}}
      - {{name: agents, path: /orders/agents, require: {{actor: agent}}}}
      - {{name: humans, path: /orders/humans, require: {{actor: human}}}}
      - {{name: anyone, path: /orders/anyone, require: {{actor: any}}}}
      - {{name: trial, path: /orders/trial, mode: dry-run, require: authenticated}}
      - {{name: read, path: "/orders/{{id}}", require: authenticated}}
"""


def engine_for(env: SimpleNamespace, memory_keys: Any, binding: str = "when_present") -> Engine:
    settings = authz_config.parse(CONFIG.format(binding=binding), env={})
    cache = ClaimsCache(100, 300, clock=lambda: float(env.NOW))
    verifier = TokenVerifier(
        settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW), cache=cache
    )
    return Engine(settings, verifier, clock=lambda: float(env.NOW))


def check(engine: Engine, token: str, path: str, cert: str = "") -> Any:
    return engine.check(
        RequestAttrs(
            method="GET",
            path=path,
            headers={"authorization": f"Bearer {token}"},
            context={"api": "orders"},
            client_cert_x5t=cert,
        )
    )


ROUTES = {  # route -> the kinds it admits
    "/orders/people": {"human-user"},  # token_kind: user no longer admits agents
    "/orders/7": {"human-user", "plain-app"},  # authenticated: no agents by default
    "/orders/agents": {"agent-as-user", "agent-app"},
    "/orders/humans": {"human-user"},
    "/orders/anyone": set(KINDS),
}


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("path", sorted(ROUTES))
def test_each_kind_on_each_route(
    name: str, path: str, env: SimpleNamespace, memory_keys: Any, minter: Any
) -> None:
    d = check(engine_for(env, memory_keys), minter.token(aud="api://orders", **KINDS[name]), path)
    actor = EXPECTED[name][1].value
    assert d.metadata["actor"] == actor
    if name in ROUTES[path]:
        assert (d.allowed, d.code) == (True, "ok")
        assert ("x-actor-kind", actor) in d.upstream_headers
        return
    expected = (
        "wrong_token_kind" if path == "/orders/people" and "app" in name else "actor_not_allowed"
    )
    assert (d.allowed, d.status, d.code) == (False, 403, expected)
    assert json.loads(d.body)["code"] == expected


def test_the_actor_header_is_removed_when_no_identity_is_set(
    env: SimpleNamespace, memory_keys: Any
) -> None:
    d = engine_for(env, memory_keys).check(
        RequestAttrs(method="GET", path="/orders/healthz", context={"api": "orders"})
    )
    assert d.allowed
    assert "x-actor-kind" in d.remove_headers
    assert d.metadata["actor"] == ""


@pytest.mark.parametrize(
    ("binding", "cnf", "cert", "code"),
    [
        ("when_present", THUMB, THUMB, "ok"),
        ("when_present", THUMB, OTHER_THUMB, "token_binding_mismatch"),
        ("when_present", THUMB, "", "token_binding_missing"),
        ("when_present", None, "", "ok"),
        ("always", None, THUMB, "token_not_bound"),
        ("off", THUMB, "", "ok"),
    ],
)
def test_binding_through_the_engine(
    binding: str,
    cnf: str | None,
    cert: str,
    code: str,
    env: SimpleNamespace,
    memory_keys: Any,
    minter: Any,
) -> None:
    engine = engine_for(env, memory_keys, binding)
    claims = {} if cnf is None else {"cnf": {"x5t#S256": cnf}}
    token = minter.token(aud="api://orders", **claims)
    for _ in range(2):  # the second check decides from the cached claims
        d = check(engine, token, "/orders/7", cert)
        assert d.code == code
        if code != "ok":
            assert (d.allowed, d.status) == (False, 401)
            www = dict(d.response_headers)["www-authenticate"]
            assert 'error="invalid_token"' in www
            assert d.metadata["oid"] == env.USER_OID  # who presented it, for the audit line


def test_a_binding_failure_is_enforced_in_dry_run_but_an_unbound_token_is_not(
    env: SimpleNamespace, memory_keys: Any, minter: Any
) -> None:
    stolen = minter.token(aud="api://orders", cnf={"x5t#S256": THUMB})
    d = check(engine_for(env, memory_keys), stolen, "/orders/trial", OTHER_THUMB)
    assert (d.allowed, d.code) == (False, "token_binding_mismatch")
    unbound = minter.token(aud="api://orders")
    d = check(engine_for(env, memory_keys, "always"), unbound, "/orders/trial")
    assert (d.allowed, d.would_deny, d.code) == (True, True, "token_not_bound")


def test_a_bound_token_without_its_certificate_is_no_identity_on_an_anonymous_route(
    env: SimpleNamespace, memory_keys: Any, minter: Any
) -> None:
    engine = engine_for(env, memory_keys)
    token = minter.token(aud="api://orders", cnf={"x5t#S256": THUMB})
    with_cert = check(engine, token, "/orders/healthz", THUMB)
    assert ("x-user-id", env.USER_OID) in with_cert.upstream_headers
    without = check(engine, token, "/orders/healthz")
    assert without.allowed
    assert "x-user-id" in without.remove_headers
    assert not [h for h, _ in without.upstream_headers if h == "x-user-id"]


# ------------------------------------------------------------------------------------ config


def test_config_reads_actor_and_binding(env: SimpleNamespace) -> None:
    api = authz_config.parse(CONFIG.format(binding="off"), env={}).apis[0]
    assert api.require_bound_tokens is BoundTokens.OFF  # unquoted YAML `off` is false
    rules = {r.name: r.require.any_of[0].actor for r in api.routes if not r.require.anonymous}
    assert rules == {
        "people": ActorRule.NOT_AGENT,
        "agents": ActorRule.AGENT,
        "humans": ActorRule.HUMAN,
        "anyone": ActorRule.ANY,
        "trial": ActorRule.NOT_AGENT,
        "read": ActorRule.NOT_AGENT,
    }
    default = authz_config.parse(
        CONFIG.format(binding="off").replace("    require_bound_tokens: off\n", ""), env={}
    )
    assert default.apis[0].require_bound_tokens is BoundTokens.WHEN_PRESENT


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("require_bound_tokens: off", "require_bound_tokens: true", "apis[0].require_bound_tokens"),
        ("{actor: agent}", "{actor: robot}", "apis[0].routes[2].require.actor"),
        ("{actor: agent}", "{actor: not_agent}", "apis[0].routes[2].require.actor"),
    ],
)
def test_config_rejects_bad_actor_and_binding_values(old: str, new: str, problem: str) -> None:
    text = CONFIG.format(binding="off").replace(old, new)
    with pytest.raises(authz_config.ConfigError) as err:
        authz_config.parse(text, env={})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


# ---------------------------------------------------------------------------- observability


def test_actor_is_a_metric_label_and_an_audit_field() -> None:
    import io

    import prometheus_client as prom

    from authz.observability import AuditLog, Metrics
    from authz.policy.model import Decision

    registry = prom.CollectorRegistry()
    metrics = Metrics(registry)
    agent = Decision(True, 200, "ok", "r", "d1", api="orders", principal=_who(Actor.AGENT))
    anonymous = Decision(False, 401, "missing_token", "r", "d2", api="orders")
    for d in (agent, agent, anonymous):
        metrics.record_check(d, 0.001)
    value = registry.get_sample_value
    assert (
        value(
            "authz_checks_by_actor_total", {"api": "orders", "decision": "allow", "actor": "agent"}
        )
        == 2
    )
    assert (
        value("authz_checks_by_actor_total", {"api": "orders", "decision": "deny", "actor": "none"})
        == 1
    )
    buf = io.StringIO()
    log = AuditLog(buf)
    log.record(RequestAttrs(method="GET", path="/"), agent, 0.001)
    log.record(RequestAttrs(method="GET", path="/"), anonymous, 0.001)
    log.flush()
    assert [json.loads(line)["actor"] for line in buf.getvalue().splitlines()] == ["agent", ""]
