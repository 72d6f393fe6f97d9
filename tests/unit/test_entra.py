"""TokenVerifier: valid tokens yield the right Principal; cache behaviour; exception mapping."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidSignature

from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier, crypto_denial
from authz.policy.errors import Code, Denial, Unauthenticated, Unavailable, UnknownSigningKey
from authz.policy.model import SUPPORTED_ALGORITHMS, TokenKind, TokenSettings
from tests.unit.conftest import DROP


def make(env: SimpleNamespace, keys: Any, clock: list[float], cache: bool = False) -> TokenVerifier:
    c = ClaimsCache(100, 300.0, clock=lambda: clock[0]) if cache else None
    return TokenVerifier(TokenSettings(), env.ISSUERS, keys, clock=lambda: clock[0], cache=c)


# ------------------------------------------------------------------------------- valid tokens


def test_v2_user_token(verifier: TokenVerifier, minter: Any, env: SimpleNamespace) -> None:
    p = verifier.verify(
        minter.token(groups=["g1", "g2"], acrs=["c1"], xms_cc=["cp1"]), env.make_api()
    )
    assert p.tid == env.TENANT
    assert p.oid == env.USER_OID
    assert p.client_id == env.CLIENT_ID
    assert p.kind is TokenKind.USER
    assert p.version == "2.0"
    assert p.issuer == env.v2_issuer(env.TENANT)
    assert p.audience == env.API_ID
    assert p.provider == "contoso"
    assert p.expires_at == env.NOW + 3600
    assert p.scopes == {"Orders.Read", "Orders.Write"}
    assert p.scp == "Orders.Read Orders.Write"
    assert p.roles == frozenset()
    assert p.groups == {"g1", "g2"}
    assert p.acrs == {"c1"}
    assert p.client_capabilities == {"cp1"}
    assert not p.groups_overage
    assert p.claims["tid"] == env.TENANT


def test_v1_user_token(verifier: TokenVerifier, minter: Any, env: SimpleNamespace) -> None:
    token = minter.sign(
        minter.header(x5t=env.KID), minter.claims(version="1.0", aud="api://orders")
    )
    p = verifier.verify(token, env.make_api())
    assert p.version == "1.0"
    assert p.issuer == env.v1_issuer(env.TENANT)
    assert p.client_id == env.CLIENT_ID  # from appid
    assert p.audience == "api://orders"


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_app_token(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace, version: str
) -> None:
    p = verifier.verify(minter.token(kind="app", version=version), env.make_api())
    assert p.kind is TokenKind.APP
    assert p.roles_list == ("Orders.Read.All",)
    assert p.idtyp == "app"


def test_app_token_without_idtyp_is_app(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    p = verifier.verify(minter.token(kind="app", idtyp=env.DROP), env.make_api())
    assert p.kind is TokenKind.APP


def test_user_with_roles_only_is_user(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    p = verifier.verify(minter.token(scp=env.DROP, roles=["Admin"], idtyp="user"), env.make_api())
    assert p.kind is TokenKind.USER
    assert p.roles == {"Admin"}


def test_multi_tenant_allowed(verifier: TokenVerifier, minter: Any, env: SimpleNamespace) -> None:
    p = verifier.verify(minter.token(), env.make_api("multi"))
    assert p.provider == "multi"


def test_multi_tenant_issuer_uses_the_tenants_own_key_set(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float], attacker_key: Any
) -> None:
    """Keys are per tenant even for a multi-tenant issuer: a key the shared (template) documents
    publish does not sign for a tenant whose own documents do not publish it."""
    from authz.identity.keys import parse_jwks
    from tests.unit.conftest import public_jwk

    template = memory_keys.snapshots["multi"]
    own = parse_jwks(
        json.dumps({"keys": [public_jwk(attacker_key, "tenant-only")]}).encode(), "1.0"
    )
    memory_keys.snapshots["multi"] = dataclasses.replace(template, tenant_keys={env.TENANT: own})
    verifier = make(env, memory_keys, clock)
    with pytest.raises(UnknownSigningKey) as info:
        verifier.verify(minter.token(), env.make_api("multi"))
    assert info.value.issuer == "multi"
    memory_keys.snapshots["multi"] = dataclasses.replace(
        template, tenant_keys={env.TENANT: template.keys}
    )
    assert verifier.verify(minter.token(), env.make_api("multi")).provider == "multi"


def test_second_issuer_of_api_is_used(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    # the first issuer (v2 only) does not accept v1; the second one does
    token = minter.token(version="1.0")
    assert verifier.verify(token, env.make_api("contoso-v2", "contoso")).provider == "contoso"


def test_groups_overage(verifier: TokenVerifier, minter: Any, env: SimpleNamespace) -> None:
    token = minter.token(_claim_names={"groups": "src1"}, _claim_sources={"src1": {}})
    assert verifier.verify(token, env.make_api()).groups_overage


@pytest.mark.parametrize("names", ["groups", ["groups"], None], ids=["string", "list", "null"])
def test_claim_names_that_are_not_an_object_are_invalid(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace, names: Any
) -> None:
    """``_claim_names`` (the groups overage pointer) must be a JSON object: anything else is a
    token no Entra issues, refused rather than read as "no overage"."""
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(minter.token(_claim_names=names), env.make_api())
    assert info.value.code == Code.INVALID_CLAIM


@pytest.mark.parametrize(
    "claims",
    [{"exp": 1_700_000_000 - 59}, {"nbf": 1_700_000_000 + 59}, {"iat": 1_700_000_000 + 59}],
    ids=["exp-within-skew", "nbf-within-skew", "iat-within-skew"],
)
def test_clock_skew_tolerated(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace, claims: dict[str, int]
) -> None:
    verifier.verify(minter.token(**claims), env.make_api())


def test_acl_mode_accepts_tokens_without_scope_or_role(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    api = env.make_api(require_scope_or_role=False)
    assert verifier.verify(minter.token(scp=env.DROP), api).scopes == frozenset()
    assert verifier.verify(minter.token(kind="app", roles=env.DROP), api).kind is TokenKind.APP


def test_one_issuer_unloaded_cannot_decide(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    del memory_keys.snapshots["contoso"]
    verifier = make(env, memory_keys, clock)
    with pytest.raises(Unavailable) as info:  # it may be the unloaded issuer's token
        verifier.verify(minter.token(version="1.0"), env.make_api("contoso-v2", "contoso"))
    assert info.value.code == Code.KEYS_UNAVAILABLE


def test_a_version_whose_documents_are_not_loaded_verifies_no_token(
    rsa_key: Any, msa_key: Any, minter: Any, env: SimpleNamespace, clock: list[float]
) -> None:
    """An issuer configured for v1 and v2 whose snapshot holds only the v2 documents: a v1 token
    has no issuer template to match, so it is refused (issuer_mismatch), never checked against
    the v2 keys; its v2 tokens still verify."""
    from tests.unit.conftest import MemoryKeys, snapshot_for

    keys = MemoryKeys({"contoso": snapshot_for("contoso", rsa_key, msa_key, versions=("2.0",))})
    verifier = make(env, keys, clock)
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(minter.token(version="1.0"), env.make_api())
    assert info.value.code == Code.ISSUER_MISMATCH
    assert verifier.verify(minter.token(), env.make_api()).version == "2.0"


def test_non_rsa_algorithms_cannot_be_configured(env: SimpleNamespace, memory_keys: Any) -> None:
    for alg in ("HS256", "none", "ES256"):
        with pytest.raises(ValueError, match="unsupported"):
            TokenVerifier(
                TokenSettings(algorithms=frozenset({"RS256", alg})), env.ISSUERS, memory_keys
            )


def test_the_verifier_accepts_exactly_the_configurable_algorithms(
    env: SimpleNamespace, memory_keys: Any
) -> None:
    """One list (``model.SUPPORTED_ALGORITHMS``) for config and verifier: PS256, which config
    never accepted, is refused here too; each supported one builds a verifier."""
    with pytest.raises(ValueError, match="unsupported"):
        TokenVerifier(TokenSettings(algorithms=frozenset({"PS256"})), env.ISSUERS, memory_keys)
    for alg in SUPPORTED_ALGORITHMS:
        TokenVerifier(TokenSettings(algorithms=frozenset({alg})), env.ISSUERS, memory_keys)


# -------------------------------------------------------------------------- exception mapping


def _all_subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


@pytest.mark.parametrize(
    "exc_type",
    sorted(_all_subclasses(jwt.PyJWTError) | {jwt.PyJWTError}, key=lambda c: c.__name__),
    ids=lambda c: c.__name__,
)
def test_every_pyjwt_exception_maps_to_a_401(exc_type: type[BaseException]) -> None:
    exc = exc_type("x") if exc_type is not jwt.MissingRequiredClaimError else exc_type("exp")
    denial = crypto_denial(exc)
    assert isinstance(denial, Unauthenticated)
    assert denial.code != Code.OK


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidSignature(), Code.BAD_SIGNATURE),
        (jwt.ExpiredSignatureError(), Code.TOKEN_EXPIRED),
        (jwt.InvalidKeyError(), Code.BAD_SIGNATURE),
        (ValueError("odd key"), Code.BAD_SIGNATURE),
        (RuntimeError(), Code.BAD_SIGNATURE),
    ],
    ids=["invalid-signature", "expired", "invalid-key", "value-error", "anything-else"],
)
def test_crypto_denial_codes(exc: BaseException, code: Code) -> None:
    assert crypto_denial(exc).code == code


def test_unexpected_crypto_error_is_a_deny(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    class Exploding:
        def verify(self, msg: bytes, key: object, sig: bytes) -> bool:
            raise TypeError("boom")

    verifier = make(env, memory_keys, clock)
    verifier._algorithms["RS256"] = Exploding()  # type: ignore[assignment]
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(minter.token(), env.make_api())
    assert info.value.code == Code.BAD_SIGNATURE


# ------------------------------------------------------------------------------------- cache


def test_cache_hit_and_miss(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    verifier = make(env, memory_keys, clock, cache=True)
    cache = verifier.cache
    assert cache is not None
    token = minter.token()
    first = verifier.verify(token, env.make_api())
    second = verifier.verify(token, env.make_api())
    assert second is first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_cache_hit_still_checks_the_api(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    verifier = make(env, memory_keys, clock, cache=True)
    token = minter.token()
    verifier.verify(token, env.make_api())
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token, env.make_api(audiences=("api://billing",)))
    assert info.value.code == Code.AUDIENCE_MISMATCH
    scopeless = minter.token(scp=env.DROP)
    verifier.verify(scopeless, env.make_api(require_scope_or_role=False))  # cached now
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(scopeless, env.make_api())
    assert info.value.code == Code.NO_SCOPE_OR_ROLE


def test_cache_hit_for_an_api_with_other_issuers_verifies_again(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    verifier = make(env, memory_keys, clock, cache=True)
    token = minter.token()
    assert verifier.verify(token, env.make_api("contoso")).provider == "contoso"
    assert verifier.verify(token, env.make_api("multi")).provider == "multi"
    assert verifier.verify(token, env.make_api("contoso-v2")).provider == "contoso-v2"


def test_cache_entry_expires_with_the_token(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    verifier = make(env, memory_keys, clock, cache=True)
    token = minter.token(exp=env.NOW + 100)
    verifier.verify(token, env.make_api())
    clock[0] = env.NOW + 100 + 61
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token, env.make_api())
    assert info.value.code == Code.TOKEN_EXPIRED


def test_retired_key_voids_cached_tokens(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    verifier = make(env, memory_keys, clock, cache=True)
    token = minter.token()
    verifier.verify(token, env.make_api())
    snap = memory_keys.snapshots["contoso"]
    keys = {k: v for k, v in snap.keys.items() if k != env.KID}
    memory_keys.snapshots["contoso"] = dataclasses.replace(snap, keys=keys)
    with pytest.raises(UnknownSigningKey) as info:
        verifier.verify(token, env.make_api())
    assert info.value.issuer == "contoso"


def test_same_kid_with_new_key_material_voids_cached_tokens(
    minter: Any,
    env: SimpleNamespace,
    memory_keys: Any,
    clock: list[float],
    attacker_key: Any,
    msa_key: Any,
) -> None:
    """A refresh where the kid stays but names another key: tokens cached under the old key
    must go through the full path again (and fail its signature check), not ride the cache."""
    from tests.unit.conftest import snapshot_for

    verifier = make(env, memory_keys, clock, cache=True)
    token = minter.token()
    verifier.verify(token, env.make_api())
    assert verifier.cache is not None
    assert verifier.cache.hits == 0
    verifier.verify(token, env.make_api())
    assert verifier.cache.hits == 1
    memory_keys.snapshots["contoso"] = snapshot_for("contoso", attacker_key, msa_key)
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token, env.make_api())
    assert info.value.code == Code.BAD_SIGNATURE


def test_denials_are_not_cached(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    verifier = make(env, memory_keys, clock, cache=True)
    with pytest.raises(Denial):
        verifier.verify(minter.token(exp=env.NOW - 1000), env.make_api())
    assert verifier.cache is not None
    assert len(verifier.cache) == 0


def test_multi_tenant_issuer_listed_first_does_not_shadow_a_single_tenant_one(
    minter: Any, env: SimpleNamespace, rsa_key: Any, msa_key: Any, clock: list[float]
) -> None:
    # "partners" is multi-tenant for another tenant only; its {tenantid} template matches every
    # tenant's iss, so it must not capture a contoso token that "contoso" (listed later) accepts.
    from authz.policy.model import IssuerSpec

    partners = IssuerSpec(
        name="partners",
        instance=env.INSTANCE,
        tenant="organizations",
        allowed_tenants=frozenset({env.OTHER_TENANT}),
    )
    issuers = {**env.ISSUERS, "partners": partners}
    keys = env.MemoryKeys(
        {
            "contoso": env.snapshot_for("contoso", rsa_key, msa_key),
            "partners": env.snapshot_for(
                "partners", rsa_key, msa_key, tenant=None, versions=("2.0",)
            ),
        }
    )
    v = TokenVerifier(TokenSettings(), issuers, keys, clock=lambda: clock[0])
    assert v.verify(minter.token(), env.make_api("partners", "contoso")).provider == "contoso"
    # with no issuer accepting the tenant, the answer is still tenant_not_allowed
    with pytest.raises(Denial) as err:
        v.verify(minter.token(), env.make_api("partners"))
    assert err.value.code is Code.TENANT_NOT_ALLOWED


# ------------------------------------------------------- client id by version, hasgroups (issue 11)


@pytest.mark.parametrize(
    ("version", "claims", "expected"),
    [
        ("1.0", {"appid": "v1-app", "azp": "forged-azp"}, "v1-app"),
        ("1.0", {"appid": DROP, "azp": "forged-azp"}, ""),
        ("2.0", {"azp": "v2-app", "appid": "forged-appid"}, "v2-app"),
        ("2.0", {"azp": DROP, "appid": "forged-appid"}, ""),
    ],
    ids=["v1-appid-wins", "v1-azp-ignored", "v2-azp-wins", "v2-appid-ignored"],
)
def test_client_id_comes_from_the_versions_own_claim(
    verifier: TokenVerifier,
    minter: Any,
    env: SimpleNamespace,
    version: str,
    claims: dict[str, str],
    expected: str,
) -> None:
    """v1 tokens name the client in 'appid', v2 in 'azp': the other claim never stands in for it
    (it feeds the client allowlist and x-client-id)."""
    p = verifier.verify(minter.token(version=version, **claims), env.make_api())
    assert p.client_id == expected


@pytest.mark.parametrize(
    ("claims", "overage"),
    [
        ({"hasgroups": True}, True),
        ({"hasgroups": False}, False),
        ({"_claim_names": {"groups": "src1"}}, True),
        ({}, False),
    ],
    ids=["hasgroups-true", "hasgroups-false", "claim-names", "neither"],
)
def test_hasgroups_is_groups_overage(
    verifier: TokenVerifier,
    minter: Any,
    env: SimpleNamespace,
    claims: dict[str, Any],
    overage: bool,
) -> None:
    p = verifier.verify(minter.token(**claims), env.make_api())
    assert p.groups_overage is overage


@pytest.mark.parametrize("value", ["true", 1, None, []], ids=["string", "int", "null", "list"])
def test_hasgroups_of_another_type_is_invalid(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace, value: Any
) -> None:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(minter.token(hasgroups=value), env.make_api())
    assert info.value.code is Code.INVALID_CLAIM


def test_hasgroups_denies_group_rules_as_overage(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    """A token that says hasgroups: true carries no usable groups: group rules answer
    groups_overage (decide elsewhere), not missing_group (a wrong, definitive answer)."""
    from authz.policy.authorize import authorize
    from authz.policy.errors import Forbidden
    from authz.policy.model import Clause, Requirement

    p = verifier.verify(minter.token(hasgroups=True), env.make_api())
    need = Requirement(any_of=(Clause(groups_any=frozenset({env.TENANT})),))
    with pytest.raises(Forbidden) as info:
        authorize(need, p)
    assert info.value.code is Code.GROUPS_OVERAGE


# ------------------------------------------------ keys_unavailable: only for the token's own issuer

UNLOADED = {
    # single-tenant by GUID, never loaded: it can issue only for OTHER_TENANT
    "fabrikam": ("22222222-2222-4222-8222-222222222222", frozenset()),
    # multi-tenant, never loaded: only its allowed tenant
    "partners": ("organizations", frozenset({"22222222-2222-4222-8222-222222222222"})),
    # single-tenant by domain, never loaded: its tenant id is unknown until its documents load
    "by-domain": ("fabrikam.example.com", frozenset()),
}


@pytest.mark.parametrize(
    ("unloaded", "claims", "code"),
    [
        ("fabrikam", {}, Code.OK),  # the token's own issuer is loaded: verified
        ("partners", {}, Code.OK),
        ("fabrikam", {"tid": "77777777-7777-4777-8777-777777777777"}, Code.ISSUER_MISMATCH),
        ("partners", {"tid": "77777777-7777-4777-8777-777777777777"}, Code.ISSUER_MISMATCH),
        ("fabrikam", {"tid": "22222222-2222-4222-8222-222222222222"}, Code.KEYS_UNAVAILABLE),
        ("partners", {"tid": "22222222-2222-4222-8222-222222222222"}, Code.KEYS_UNAVAILABLE),
        ("by-domain", {"tid": "77777777-7777-4777-8777-777777777777"}, Code.KEYS_UNAVAILABLE),
        # iss does not name tid: no Entra issuer issued it
        (
            "fabrikam",
            {
                "tid": "22222222-2222-4222-8222-222222222222",
                "iss": "https://login.example.test/77777777-7777-4777-8777-777777777777/v2.0",
            },
            Code.ISSUER_MISMATCH,
        ),
        ("fabrikam", {"version": "1.0"}, Code.TOKEN_VERSION_NOT_ACCEPTED),
    ],
    ids=[
        "own-loaded-single",
        "own-loaded-multi",
        "foreign-tenant-single",
        "foreign-tenant-multi",
        "its-tenant-single",
        "its-tenant-multi",
        "domain-tenant",
        "iss-names-another-tenant",
        "version-nobody-accepts",
    ],
)
def test_keys_unavailable_only_when_the_tokens_own_issuer_has_no_keys(
    minter: Any,
    env: SimpleNamespace,
    memory_keys: Any,
    clock: list[float],
    unloaded: str,
    claims: dict[str, Any],
    code: Code,
) -> None:
    """An API trusting a loaded v2 issuer and one that never loaded: a token that the unloaded
    issuer could not have issued is decided (verified or rejected), never 503."""
    from authz.policy.model import IssuerSpec

    tenant, allowed = UNLOADED[unloaded]
    issuers = {
        **env.ISSUERS,
        unloaded: IssuerSpec(
            name=unloaded, instance=env.INSTANCE, tenant=tenant, allowed_tenants=allowed
        ),
    }
    v = TokenVerifier(TokenSettings(), issuers, memory_keys, clock=lambda: clock[0])
    api = env.make_api("contoso-v2", unloaded)
    if "tid" in claims and "iss" not in claims:
        claims = {**claims, "iss": env.v2_issuer(claims["tid"])}
    iss = claims.get("iss")
    token = minter.token(
        **{k: val for k, val in claims.items() if k != "iss"}, **({"iss": iss} if iss else {})
    )
    if code is Code.OK:
        assert v.verify(token, api).provider == "contoso-v2"
        return
    with pytest.raises(Denial) as info:
        v.verify(token, api)
    assert info.value.code is code


def test_a_multi_tenant_tenant_without_keys_is_unavailable_alone(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float], rsa_key: Any
) -> None:
    """Keys per tenant: an allowed tenant whose own key set never loaded answers 503; another
    allowed tenant of the same issuer verifies; a tenant that is not allowed is still 401."""
    from authz.policy.model import IssuerSpec

    multi = IssuerSpec(
        name="multi",
        instance=env.INSTANCE,
        tenant="organizations",
        allowed_tenants=frozenset({env.TENANT, env.OTHER_TENANT}),
    )
    v = TokenVerifier(
        TokenSettings(), {**env.ISSUERS, "multi": multi}, memory_keys, clock=lambda: clock[0]
    )
    api = env.make_api("multi")
    assert v.verify(minter.token(), api).tid == env.TENANT
    with pytest.raises(Unavailable) as info:
        v.verify(minter.token(tid=env.OTHER_TENANT), api)
    assert info.value.code is Code.KEYS_UNAVAILABLE
    with pytest.raises(Denial) as denied:
        v.verify(minter.token(tid="77777777-7777-4777-8777-777777777777"), api)
    assert denied.value.code is Code.TENANT_NOT_ALLOWED


# ------------------------------------------------------------- v1-only issuers and key issuers


def test_a_key_no_v2_jwks_vouches_for_signs_for_no_one(
    minter: Any, env: SimpleNamespace, clock: list[float], rsa_key: Any, msa_key: Any
) -> None:
    """A key only a v1 JWKS lists carries no issuer: it cannot pass the signing-key issuer rule,
    so it is refused for v1 tokens too (before: v1 keys skipped the rule)."""
    from authz.identity.keys import build_snapshot, parse_jwks

    v1_only = parse_jwks(
        env.jwks_bytes(env.public_jwk(rsa_key, env.KID), env.public_jwk(msa_key, env.MSA_KID)),
        "1.0",
    )
    spec = env.ISSUERS["contoso"]
    snap = build_snapshot(spec, {"1.0": (env.v1_issuer(env.TENANT), v1_only)}, float(env.NOW))
    v = make(env, env.MemoryKeys({"contoso": snap}), clock)
    with pytest.raises(Unauthenticated) as info:
        v.verify(minter.token(version="1.0"), env.make_api("contoso"))
    assert info.value.code is Code.KEY_ISSUER_MISMATCH


def test_v1_tokens_get_the_key_issuer_rule_from_the_v2_jwks(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float]
) -> None:
    v = make(env, memory_keys, clock)
    assert v.verify(minter.token(version="1.0"), env.make_api("contoso")).version == "1.0"
    with pytest.raises(Unauthenticated) as info:  # the MSA key signing for contoso's tenant
        v.verify(minter.token(version="1.0", kid=env.MSA_KID), env.make_api("contoso"))
    assert info.value.code is Code.KEY_ISSUER_MISMATCH


# ---------------------------------------------------------------- last-known-good maximum age


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "cached"])
def test_keys_past_their_maximum_age_are_not_used(
    minter: Any, env: SimpleNamespace, memory_keys: Any, clock: list[float], cached: bool
) -> None:
    """Shorter than the cache's TTL here, so a cached identity must be refused too."""
    issuers = {
        **env.ISSUERS,
        "contoso": dataclasses.replace(env.ISSUERS["contoso"], max_key_age_s=100),
    }
    cache = ClaimsCache(100, 300.0, clock=lambda: clock[0]) if cached else None
    v = TokenVerifier(TokenSettings(), issuers, memory_keys, clock=lambda: clock[0], cache=cache)
    api = env.make_api("contoso")
    token = minter.token()
    v.verify(token, api)  # fetched at NOW: fresh (and now cached, if a cache is on)
    clock[0] = env.NOW + 100  # exactly the maximum age: still used
    v.verify(token, api)
    clock[0] = env.NOW + 101
    with pytest.raises(Unavailable) as info:
        v.verify(token, api)
    assert (info.value.status, info.value.code) == (503, Code.KEYS_UNAVAILABLE)
    assert "too old" in info.value.reason
