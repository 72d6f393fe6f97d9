"""Revocation, the pure core: rule matching, issued_before, expiry, the lifetime cap, the index,
and the engine's enforcement (cached claims included, cp1 claims challenge, dry-run, anonymous)."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from authz import config as authz_config
from authz.engine import Engine
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.policy.errors import ClaimsChallenge, Code, Unauthenticated
from authz.policy.model import Principal, RequestAttrs, TokenKind
from authz.policy.revocation import (
    DEFAULT_MAX_RULE_LIFETIME_S,
    EMPTY,
    RevocationRule,
    RevocationSet,
    format_time,
    nbf_claims,
    revocation_denial,
    rule_problems,
)

NOW = 1_700_000_000
OID = "55555555-5555-4555-8555-555555555555"
OTHER_OID = "77777777-7777-4777-8777-777777777777"
TID = "11111111-1111-4111-8111-111111111111"
AZP = "44444444-4444-4444-8444-444444444444"


def who(**kw: Any) -> Principal:
    claims = {"iat": NOW - 60, "sid": "sess-1", **kw.pop("claims", {})}
    base = Principal(
        tid=TID,
        oid=OID,
        sub="pairwise-sub",
        client_id=AZP,
        kind=TokenKind.USER,
        version="2.0",
        issuer=f"https://login.example.test/{TID}/v2.0",
        audience="api://orders",
        provider="contoso",
        expires_at=NOW + 3600,
        uti="token-id-1",
        claims=MappingProxyType(claims),
    )
    return replace(base, **kw)


def rule(**kw: Any) -> RevocationRule:
    kw.setdefault("id", "r1")
    kw.setdefault("reason", "test")
    kw.setdefault("expires_at", NOW + 3600)
    return RevocationRule(**kw)


def at(now: float) -> Any:
    return lambda: now


# ------------------------------------------------------------------------------ matching


@pytest.mark.parametrize(
    ("fields", "matches"),
    [
        ({"oid": OID}, True),
        ({"oid": OTHER_OID}, False),
        ({"sub": "pairwise-sub"}, True),
        ({"sub": "other"}, False),
        ({"azp": AZP}, True),
        ({"azp": OTHER_OID}, False),
        ({"tid": TID}, True),
        ({"uti": "token-id-1"}, True),
        ({"uti": "token-id-2"}, False),
        ({"sid": "sess-1"}, True),
        ({"sid": "sess-2"}, False),
        ({"oid": OID, "tid": TID}, True),  # every named claim must match ...
        ({"oid": OID, "tid": OTHER_OID}, False),  # ... not just one
        ({"azp": AZP, "sid": "sess-2"}, False),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_a_rule_matches_when_every_named_claim_equals(
    fields: dict[str, str], matches: bool
) -> None:
    rules = RevocationSet([rule(**fields)])
    assert bool(rules.match(who(), at(NOW))) is matches


MINE = {
    "uti": "token-id-1",
    "sid": "sess-1",
    "oid": OID,
    "sub": "pairwise-sub",
    "azp": AZP,
    "tid": TID,
}


@pytest.mark.parametrize("claim", list(MINE))
def test_matches_checks_every_claim_it_names(claim: str) -> None:
    """``matches`` itself, whichever claim the index found the rule by: one differing claim is
    enough to spare the token."""
    assert rule(**MINE).matches(who())
    assert not rule(**{**MINE, claim: "someone-else"}).matches(who())


def test_a_rule_naming_no_claim_is_filed_nowhere_and_matches_nothing() -> None:
    """Validation refuses such a rule ("(rule)": it must name a claim); the set, handed one
    anyway, does not let it revoke every token."""
    naked = rule(issued_before=NOW)
    assert "(rule)" in {k for k, _ in problems(issued_before=NOW)}
    assert RevocationSet([naked]).match(who(), at(NOW)) == ()


@pytest.mark.parametrize(
    ("iat", "revoked"),
    [(NOW - 1, True), (NOW, False), (NOW + 10, False)],
    ids=["issued-before", "issued-at-T", "issued-after"],
)
def test_issued_before_compares_the_tokens_iat(iat: int, revoked: bool) -> None:
    rules = RevocationSet([rule(oid=OID, issued_before=NOW)])
    assert bool(rules.match(who(claims={"iat": iat}), at(NOW))) is revoked


def test_a_token_without_an_integer_iat_counts_as_issued_before() -> None:
    """iat is verified as an integer; were it ever missing, "issued after" is unproven."""
    rules = RevocationSet([rule(oid=OID, issued_before=NOW)])
    assert rules.match(who(claims={"iat": "late"}), at(NOW))


def test_a_non_string_sid_matches_no_sid_rule_and_does_not_break_the_lookup() -> None:
    rules = RevocationSet([rule(sid="sess-1"), rule(id="r2", oid=OTHER_OID)])
    assert rules.match(who(claims={"sid": ["sess-1"]}), at(NOW)) == ()


def test_expired_rules_are_ignored_at_lookup_time() -> None:
    rules = RevocationSet([rule(oid=OID, expires_at=NOW + 10)])
    assert rules.match(who(), at(NOW + 9.9))
    assert rules.match(who(), at(NOW + 10)) == ()


def test_the_clock_is_read_only_when_a_rule_matched() -> None:
    reads: list[int] = []

    def clock() -> float:
        reads.append(1)
        return NOW

    rules = RevocationSet([rule(oid=OTHER_OID)])
    assert rules.match(who(), clock) == ()
    assert reads == []
    assert RevocationSet([rule(oid=OID)]).match(who(), clock)
    assert reads == [1]


def test_live_prunes_expired_rules() -> None:
    rules = RevocationSet([rule(id="a", oid=OID, expires_at=NOW + 5), rule(id="b", tid=TID)])
    assert rules.next_expiry == NOW + 5
    assert rules.live(NOW) is rules
    pruned = rules.live(NOW + 5)
    assert [r.id for r in pruned.rules] == ["b"]
    assert EMPTY.live(NOW) is EMPTY


def test_every_matching_rule_is_reported() -> None:
    rules = RevocationSet(
        [rule(id="by-oid", oid=OID), rule(id="by-tid", tid=TID), rule(id="other", oid=OTHER_OID)]
    )
    assert {r.id for r in rules.match(who(), at(NOW))} == {"by-oid", "by-tid"}


def test_the_index_files_each_rule_under_its_most_selective_claim() -> None:
    """A lookup never compares a rule filed under another value: 100 000 rules on other users
    cost the same as none (the probes touch only the token's own buckets)."""
    many = [rule(id=f"u{i}", oid=f"00000000-0000-4000-8000-{i:012d}") for i in range(100_000)]
    compared: list[str] = []

    class Spy(RevocationRule):
        __slots__ = ()

        def matches(self, p: Principal) -> bool:
            compared.append(self.id)
            return RevocationRule.matches(self, p)

    spy = Spy(id="mine", reason="x", expires_at=NOW + 60, oid=OID, tid=TID)
    rules = RevocationSet([*many, spy])
    assert [r.id for r in rules.match(who(), at(NOW))] == ["mine"]
    assert compared == ["mine"]
    assert rules.bucket("oid", OID) == (spy,)  # filed under oid, not tid
    assert rules.bucket("tid", TID) == ()
    assert rules.probed() == ("oid",)  # only claim kinds in use are probed


def test_a_bucket_of_older_issued_before_rules_is_skipped_in_one_comparison() -> None:
    """Rules filed under the token's own tenant, all for tokens issued before it: none is
    compared in full (the bucket's latest issued_before is earlier than the token's iat)."""
    compared: list[str] = []

    class Spy(RevocationRule):
        __slots__ = ()

        def matches(self, p: Principal) -> bool:
            compared.append(self.id)
            return RevocationRule.matches(self, p)

    old = [Spy(id=f"t{i}", reason="x", expires_at=NOW + 60, tid=TID, issued_before=NOW - 600 - i)
           for i in range(3)]  # fmt: skip
    rules = RevocationSet(old)
    assert rules.match(who(), at(NOW)) == ()  # iat = NOW - 60
    assert compared == []
    assert rules.match(who(claims={"iat": NOW - 601}), at(NOW)) == (old[0],)
    assert compared == ["t0", "t1", "t2"]  # one rule could match: the bucket is compared
    mixed = RevocationSet([*old, Spy(id="all", reason="x", expires_at=NOW + 60, tid=TID)])
    assert [r.id for r in mixed.match(who(), at(NOW))] == ["all"]


# ----------------------------------------------------------------------------- validation


def problems(**kw: Any) -> list[tuple[str, str]]:
    return rule_problems(rule(**kw), now=NOW, max_lifetime_s=DEFAULT_MAX_RULE_LIFETIME_S)


def test_a_good_rule_has_no_problems() -> None:
    assert problems(oid=OID, issued_before=NOW, created_at=NOW, created_by="ops") == []


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({}, "(rule)"),
        ({"oid": "AAAAAAAA-0000-4000-8000-00000000000A"}, "oid"),
        ({"tid": "contoso.onmicrosoft.com"}, "tid"),
        ({"azp": "not-a-guid"}, "azp"),
        ({"uti": "has space"}, "uti"),
        ({"sub": "x" * 257}, "sub"),
        ({"oid": OID, "id": "-leading-dash"}, "id"),
        ({"oid": OID, "reason": "  "}, "reason"),
        ({"oid": OID, "reason": "line\nbreak"}, "reason"),
        ({"oid": OID, "created_by": "x" * 300}, "created_by"),
        ({"oid": OID, "expires_at": NOW + DEFAULT_MAX_RULE_LIFETIME_S + 1}, "expires_at"),
        ({"oid": OID, "issued_before": NOW + 7200}, "issued_before"),
        ({"oid": OID, "created_at": -1}, "created_at"),
    ],
    ids=[
        "no-matcher",
        "upper-case-guid",
        "domain-tid",
        "bad-azp",
        "space-in-uti",
        "long-sub",
        "bad-id",
        "blank-reason",
        "control-in-reason",
        "long-created-by",
        "beyond-max-lifetime",
        "issued-before-after-expiry",
        "negative-created-at",
    ],
)
def test_bad_rules_are_named_by_key(fields: dict[str, Any], key: str) -> None:
    assert [k for k, _ in problems(**fields)] == [key]


def test_the_lifetime_cap_is_measured_from_now() -> None:
    r = rule(oid=OID, expires_at=NOW + 3600)
    assert rule_problems(r, now=NOW, max_lifetime_s=3600) == []
    assert [k for k, _ in rule_problems(r, now=NOW, max_lifetime_s=3599)] == ["expires_at"]


def test_to_dict_writes_times_in_utc_and_only_what_is_set() -> None:
    r = rule(oid=OID, issued_before=NOW, created_at=NOW, created_by="ops")
    assert r.to_dict() == {
        "id": "r1",
        "oid": OID,
        "issued_before": "2023-11-14T22:13:20Z",
        "reason": "test",
        "expires_at": format_time(NOW + 3600),
        "created_at": "2023-11-14T22:13:20Z",
        "created_by": "ops",
    }
    assert rule(uti="u").to_dict() == {
        "id": "r1",
        "uti": "u",
        "reason": "test",
        "expires_at": format_time(NOW + 3600),
    }


# ------------------------------------------------------------------------------- denials


def decoded_claims(denial: ClaimsChallenge) -> Any:
    return json.loads(denial.claims_json)


def test_a_plain_client_gets_invalid_token() -> None:
    denial = revocation_denial([rule(oid=OID, issued_before=NOW)], who())
    assert type(denial) is Unauthenticated
    assert (denial.status, denial.code) == (401, Code.TOKEN_REVOKED)


def test_a_cp1_client_gets_the_cae_nbf_challenge_at_issued_before() -> None:
    denial = revocation_denial(
        [rule(oid=OID, issued_before=NOW)], who(client_capabilities=frozenset({"cp1"}))
    )
    assert isinstance(denial, ClaimsChallenge)
    assert (denial.status, denial.code) == (401, Code.TOKEN_REVOKED)
    assert denial.claims_json == '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'
    assert denial.claims_json == nbf_claims(NOW)


def test_a_revoked_token_id_challenges_for_a_token_newer_than_the_revoked_one() -> None:
    p = who(client_capabilities=frozenset({"cp1"}))
    denial = revocation_denial([rule(uti="token-id-1")], p)
    assert isinstance(denial, ClaimsChallenge)
    assert decoded_claims(denial)["access_token"]["nbf"]["value"] == str(NOW - 60 + 1)
    made_later = revocation_denial([rule(uti="token-id-1", created_at=NOW + 30)], p)
    assert isinstance(made_later, ClaimsChallenge)
    assert decoded_claims(made_later)["access_token"]["nbf"]["value"] == str(NOW + 30)


@pytest.mark.parametrize(
    "rules",
    [
        [rule(oid=OID)],  # blocks every token of the user: a new one would fail too
        [rule(sid="sess-1")],  # a new token of the same session carries the same sid
        [rule(uti="token-id-1", oid=OID)],
        [rule(oid=OID, issued_before=NOW), rule(id="r2", tid=TID)],  # one full block decides
    ],
    ids=["user-block", "session-block", "uti-and-oid", "mixed"],
)
def test_no_challenge_a_new_token_cannot_satisfy(rules: list[RevocationRule]) -> None:
    denial = revocation_denial(rules, who(client_capabilities=frozenset({"cp1"})))
    assert type(denial) is Unauthenticated


# -------------------------------------------------------------------------------- engine

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
    routes:
      - {name: health, path: /orders/healthz, require: anonymous}
      - {name: read, path: "/orders/{id}", require: authenticated}
      - {name: trial, path_prefix: /orders/trial, mode: dry-run, require: {roles_any: [Nope]}}
"""


class Holder:
    """The ``RevocationView`` seam: tests swap snapshots as the store does."""

    def __init__(self) -> None:
        self.current = EMPTY


@pytest.fixture
def wired(env: SimpleNamespace, memory_keys: Any) -> SimpleNamespace:
    settings = authz_config.parse(CONFIG, env={})
    cache = ClaimsCache(100, 300, clock=lambda: float(env.NOW))
    verifier = TokenVerifier(
        settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW), cache=cache
    )
    holder = Holder()
    engine = Engine(settings, verifier, revocations=holder, clock=lambda: float(env.NOW))
    return SimpleNamespace(engine=engine, cache=cache, holder=holder)


def check(engine: Engine, token: str, path: str = "/orders/7") -> Any:
    return engine.check(
        RequestAttrs(
            method="GET",
            path=path,
            headers={"authorization": f"Bearer {token}"},
            context={"api": "orders"},
        )
    )


def test_a_revoked_token_is_denied_even_when_its_claims_are_cached(
    wired: SimpleNamespace, minter: Any, env: SimpleNamespace
) -> None:
    token = minter.token(aud="api://orders")
    assert check(wired.engine, token).allowed
    assert len(wired.cache) == 1
    hits = wired.cache.hits
    wired.holder.current = RevocationSet([rule(oid=env.USER_OID, issued_before=env.NOW)])
    d = check(wired.engine, token)
    assert wired.cache.hits == hits + 1  # decided from the cached claims
    assert (d.allowed, d.status, d.code) == (False, 401, "token_revoked")
    www = dict(d.response_headers)["www-authenticate"]
    assert www.startswith('Bearer realm="orders", error="invalid_token", error_description=')
    assert json.loads(d.body)["error"] == "invalid_token"
    assert d.metadata["oid"] == env.USER_OID  # who was denied, for the audit line
    wired.holder.current = EMPTY  # the rule gone: the same cached token passes again
    assert check(wired.engine, token).allowed


def test_a_cp1_client_gets_the_claims_challenge_through_the_engine(
    wired: SimpleNamespace, minter: Any, env: SimpleNamespace
) -> None:
    token = minter.token(aud="api://orders", xms_cc=["cp1"])
    wired.holder.current = RevocationSet([rule(oid=env.USER_OID, issued_before=env.NOW)])
    d = check(wired.engine, token)
    assert (d.status, d.code) == (401, "token_revoked")
    www = dict(d.response_headers)["www-authenticate"]
    claims = base64.b64encode(nbf_claims(env.NOW).encode()).decode()
    assert www == (
        'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/'
        f'authorize", error="insufficient_claims", claims="{claims}"'
    )
    assert json.loads(d.body) == {
        "error": "insufficient_claims",
        "code": "token_revoked",
        "request_id": "",
    }


def test_a_token_issued_after_issued_before_passes(
    wired: SimpleNamespace, minter: Any, env: SimpleNamespace
) -> None:
    wired.holder.current = RevocationSet([rule(oid=env.USER_OID, issued_before=env.NOW - 61)])
    assert check(wired.engine, minter.token(aud="api://orders")).allowed  # iat = NOW - 60


def test_revocation_is_enforced_in_dry_run(
    wired: SimpleNamespace, minter: Any, env: SimpleNamespace
) -> None:
    token = minter.token(aud="api://orders")
    assert check(wired.engine, token, "/orders/trial/x").would_deny  # the dry-run route
    wired.holder.current = RevocationSet([rule(oid=env.USER_OID)])
    d = check(wired.engine, token, "/orders/trial/x")
    assert (d.allowed, d.code) == (False, "token_revoked")


def test_a_revoked_token_on_an_anonymous_route_is_no_identity(
    wired: SimpleNamespace, minter: Any, env: SimpleNamespace
) -> None:
    token = minter.token(aud="api://orders")
    before = check(wired.engine, token, "/orders/healthz")
    assert ("x-user-id", env.USER_OID) in before.upstream_headers
    wired.holder.current = RevocationSet([rule(oid=env.USER_OID)])
    after = check(wired.engine, token, "/orders/healthz")
    assert after.allowed
    assert not [h for h, _ in after.upstream_headers if h == "x-user-id"]
    assert "x-user-id" in after.remove_headers


def test_an_expired_rule_restores_access(
    env: SimpleNamespace, memory_keys: Any, minter: Any
) -> None:
    settings = authz_config.parse(CONFIG, env={})
    verifier = TokenVerifier(
        settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW)
    )
    now = [float(env.NOW)]
    holder = Holder()
    holder.current = RevocationSet([rule(oid=env.USER_OID, expires_at=env.NOW + 30)])
    engine = Engine(settings, verifier, revocations=holder, clock=lambda: now[0])
    token = minter.token(aud="api://orders")
    assert check(engine, token).code == "token_revoked"
    now[0] = env.NOW + 30
    assert check(engine, token).allowed


def test_an_engine_without_revocations_allows(
    env: SimpleNamespace, memory_keys: Any, minter: Any
) -> None:
    settings = authz_config.parse(CONFIG, env={})
    verifier = TokenVerifier(
        settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW)
    )
    assert check(Engine(settings, verifier), minter.token(aud="api://orders")).allowed
