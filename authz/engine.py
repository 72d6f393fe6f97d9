"""The decision engine: request -> API -> route -> bearer token -> verify -> authorize -> Decision.

Synchronous and free of I/O: keys come from an in-memory snapshot (``KeySource``), everything
configurable was compiled when the engine was built, and the answer is a ``Decision`` that either
transport renders. One engine serves one configuration; a reload builds a new engine and swaps it.

Phases and the status they decide (the phase that fails decides, evaluators never pick statuses):
  1. path canonicalisation        400 non_canonical_path (always enforced, even in dry-run)
  2. API selection, route match   403 unknown_api / no_matching_route
  3. identity (bearer + token)    400 invalid_request, 401 ..., 503 keys_unavailable
     certificate binding          401 token_binding_* / token_not_bound (RFC 8705, per API's
                                  require_bound_tokens; ``authz.policy.binding``)
     revocation (deny list)       401 token_revoked (cached claims included: it runs after every
                                  verify, hit or miss)
  4. route requirements           403 missing_role, ... (or a 401 claims challenge)
  5. rate limits (allowed only)   429 rate_limited (``authz.policy.ratelimit``, local counters)
Dry-run (per API or route) turns a denial from phases 2-4 into an allow that still carries the
real code (``would_deny``); identity headers are then set only from a token that verified.
A revoked token is denied even in dry-run (revocation is an emergency brake, not a rule being
tried out), and on an anonymous route it counts as no token at all. The same holds for a bound
token presented without its certificate (token_binding_*: the presenter is not its holder); an
unbound token where bound ones are required (token_not_bound) follows dry-run.

Must not import grpc, prometheus, asyncio or network libraries (a test checks the imports).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from authz.config import Settings
from authz.identity.bearer import extract_bearer
from authz.identity.entra import TokenVerifier
from authz.policy.authorize import CompiledRequirement
from authz.policy.binding import BINDING_CODES, check_binding
from authz.policy.decisions import ResponsePlan
from authz.policy.errors import Code, Denial, Forbidden, Unauthenticated, UnknownSigningKey
from authz.policy.model import (
    ApiSpec,
    Decision,
    HeaderContract,
    Mode,
    Principal,
    RequestAttrs,
    Route,
)
from authz.policy.paths import canonicalize
from authz.policy.ratelimit import Counters, RateLimiter
from authz.policy.revocation import EMPTY, RevocationSet, RevocationView, revocation_denial
from authz.policy.routes import ApiSelector, RouteTable

# Denials that dry-run never turns into an allow (see the module docstring).
_ALWAYS_ENFORCED = frozenset({Code.TOKEN_REVOKED, *BINDING_CODES})
_ID_BATCH = 256  # decision ids per getrandom() call: one syscall per check cost ~3 % of a check
_id_pool: list[str] = []
os.register_at_fork(after_in_child=_id_pool.clear)  # a forked child never reuses the parent's


def new_decision_id() -> str:
    """128 random bits from the OS CSPRNG, hex: unique per decision, and safe to show to callers.

    Drawn in batches (``os.urandom`` of 256 ids at once), handed out once each."""
    try:
        return _id_pool.pop()
    except IndexError:
        hexed = os.urandom(16 * _ID_BATCH).hex()
        _id_pool[:] = [hexed[i : i + 32] for i in range(0, len(hexed), 32)]
        return _id_pool.pop()


@dataclass(frozen=True, slots=True)
class ApiPlan:
    """One API compiled for checking, when the engine is built: its route table, each route's
    requirement compiled (``requirements[i]`` is ``table.routes[i]``'s), the default's, and the
    responses (identity-header plan, challenges). Nothing is compiled on the check path."""

    api: ApiSpec
    table: RouteTable
    requirements: tuple[CompiledRequirement, ...]
    default: CompiledRequirement | None
    responses: ResponsePlan

    @classmethod
    def build(cls, api: ApiSpec, contract: HeaderContract, authorization_uri: str) -> ApiPlan:
        table = RouteTable.build(api)
        requirements = tuple(CompiledRequirement(route.require) for route in table.routes)
        default = CompiledRequirement(api.default) if api.default is not None else None
        compiled = (*requirements, *((default,) if default is not None else ()))
        extra = [denial for req in compiled for denial in req.challenge_denials()]
        responses = ResponsePlan(api, contract, authorization_uri, extra)
        return cls(api, table, requirements, default, responses)


class Engine:
    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        *,
        new_id: Callable[[], str] = new_decision_id,
        counters: Counters | None = None,
        revocations: RevocationView | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._verifier = verifier
        self._new_id = new_id
        # Read once per check (``.current``): the store swaps snapshots beside the check path.
        self._revocations: RevocationView = revocations or _NoRevocations()
        self._clock = clock
        self._selector = ApiSelector(settings.apis)
        # Everything a check needs from the configuration, compiled here and only here.
        uri = settings.authorization_uri
        self.plans: Mapping[str, ApiPlan] = MappingProxyType(
            {api.name: ApiPlan.build(api, settings.headers, uri) for api in settings.apis}
        )
        self._no_api = ResponsePlan(None, settings.headers, uri)  # unknown_api denials
        # Rate-limit counters outlive the engine (a reload keeps them): the service passes its own.
        limiter = RateLimiter(settings.apis, counters if counters is not None else Counters())
        self.limiter: RateLimiter | None = limiter if limiter.active else None
        # Envoy response-cache hints (docs/envoy-cache.md): 0 = none. With any revocation source
        # a rule may arrive at any moment, so no allow is cacheable.
        self._cache_max_ttl = settings.envoy_cache.max_ttl_s
        r = settings.revocation
        self._cache_never = bool(r.file or r.redis or r.admin_api.enabled)

    def check(self, attrs: RequestAttrs) -> Decision:
        """Decide one request. Raises only on bugs; the transport turns those into a 503."""
        decision_id = self._new_id()
        plan: ApiPlan | None = None
        route: Route | None = None
        principal: Principal | None = None
        mode = Mode.ENFORCE
        try:
            path = canonicalize(attrs.path)
            api = self._selector.select(attrs.context, attrs.host, path)
            if api is None:
                raise Forbidden(Code.UNKNOWN_API)
            plan = self.plans[api.name]
            mode = api.mode
            index = plan.table.match_index(attrs.method, attrs.host, path)
            if index is not None:
                route = plan.table.routes[index]
                requirement = plan.requirements[index]
                mode = route.mode or api.mode
            elif plan.default is not None:
                requirement = plan.default
            else:
                raise Forbidden(Code.NO_MATCHING_ROUTE)

            if requirement.anonymous:
                # A token on an anonymous route is optional: it feeds identity headers only if
                # it verifies; anything wrong with it just means "anonymous".
                principal = self._try_identity(attrs, api)
                return self._allow_limited(decision_id, attrs, plan, route, principal)

            token = extract_bearer(attrs.headers, _query(attrs.path))
            if token is None:
                raise Unauthenticated(Code.MISSING_TOKEN)
            principal = self._verifier.verify(token, api)
            check_binding(api.require_bound_tokens, principal, attrs.client_cert_x5t)
            revoked = self._revocations.current.match(principal, self._clock)
            if revoked:
                raise revocation_denial(revoked, principal)
            requirement.check(principal)
            return self._allow_limited(decision_id, attrs, plan, route, principal)
        except Denial as denial:
            if mode is Mode.DRY_RUN and plan is not None and denial.code not in _ALWAYS_ENFORCED:
                allowed = plan.responses.allow(
                    decision_id=decision_id, route=route, principal=principal, would_deny=denial
                )
                if self._cache_max_ttl:  # a dry-run report must reach us every time: no-store
                    return self._cache_hints(allowed, plan.api, route, principal)
                return allowed
            responses = plan.responses if plan is not None else self._no_api
            decision = responses.deny(
                denial,
                decision_id=decision_id,
                request_id=attrs.request_id,
                route=route,
                principal=principal,
            )
            if isinstance(denial, UnknownSigningKey):
                decision = dataclasses.replace(
                    decision, refresh_issuer=denial.issuer, refresh_tenant=denial.tenant
                )
            return decision

    def _try_identity(self, attrs: RequestAttrs, api: ApiSpec) -> Principal | None:
        try:
            token = extract_bearer(attrs.headers, _query(attrs.path))
            principal = None if token is None else self._verifier.verify(token, api)
            if principal is not None:
                # A bound token without its certificate identifies nobody here either.
                check_binding(api.require_bound_tokens, principal, attrs.client_cert_x5t)
        except Denial:
            return None
        if principal is not None and self._revocations.current.match(principal, self._clock):
            return None  # a revoked token yields no identity headers
        return principal

    def _allow_limited(
        self,
        decision_id: str,
        attrs: RequestAttrs,
        plan: ApiPlan,
        route: Route | None,
        principal: Principal | None,
    ) -> Decision:
        """Phase 5: an allowed request meets its rate limits (a dry-run limit only reports)."""
        limiter = self.limiter
        over = (
            None
            if limiter is None
            else limiter.check(plan.api, route, principal, attrs, self._clock())
        )
        if over is not None and not over.dry_run:
            raise over
        decision = plan.responses.allow(
            decision_id=decision_id, route=route, principal=principal, would_deny=over
        )
        if self._cache_max_ttl:
            return self._cache_hints(decision, plan.api, route, principal)
        return decision

    def _cache_hints(
        self, d: Decision, api: ApiSpec, route: Route | None, principal: Principal | None
    ) -> Decision:
        """An allow with ``cache_ttl_seconds`` and ``cache_control``: how long a response cache
        in Envoy may reuse it for the same token and request, never past the token's ``exp``;
        0 / ``no-store`` when a cached allow would be wrong (counted rate limits, revocation,
        dry-run reporting)."""
        ttl = self._cache_max_ttl
        if principal is not None:
            ttl = min(ttl, int(principal.expires_at - self._clock()))
        limited = api.rate_limits or (route is not None and route.rate_limits)
        if self._cache_never or limited or d.would_deny or ttl <= 0:
            hints = {"cache_ttl_seconds": "0", "cache_control": "no-store"}
        else:
            hints = {"cache_ttl_seconds": str(ttl), "cache_control": f"private, max-age={ttl}"}
        return dataclasses.replace(d, metadata=MappingProxyType({**d.metadata, **hints}))


class _NoRevocations:
    current: RevocationSet = EMPTY


def _query(path: str) -> str:
    q = path.find("?")
    return "" if q < 0 else path[q + 1 :].partition("#")[0]
