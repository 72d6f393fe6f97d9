"""Route requirements against a verified principal: pass, or raise the denial that explains why not.

A ``Requirement`` is anonymous (always passes) or a list of alternative ``Clause``s; it passes
when ANY clause holds. A clause holds when every non-empty field holds, checked in this order:

    1 token_kind   -> wrong_token_kind        (app vs user)
    2 actor        -> actor_not_allowed       (human / agent / app; by default no agent passes:
                                               ``ActorRule.NOT_AGENT``, docs/token-kinds.md)
    3 tenants      -> tenant_not_permitted    (tid in the set)
    4 clients      -> client_not_allowed      (azp/appid in the set)
    5 roles_any / roles_all -> missing_role   (at least one / every one)
    6 scopes_any / scopes_all -> missing_scope (against the token's 'scp' names)
    7 groups_any   -> groups_overage when the token's groups did not fit in it, else missing_group
    8 auth_context -> auth_context_required   (the 'acrs' claim lacks the value): a 401
                      ClaimsChallenge when the client declared it can answer one (xms_cc has
                      "cp1"), else a 403 Forbidden

When no clause holds, the denial raised is that of the *closest* clause: the one that failed at
the latest step (it got furthest); ties go to the clause listed first. So "delegated with scope
Orders.Read OR app with role Orders.Read.All" tells a user token without the scope
``missing_scope`` and an app token without the role ``missing_role``, not ``wrong_token_kind``.

``Forbidden.required_scope`` (rendered as ``scope="..."`` in the 403 challenge) lists the role or
scope names the failing clause required, sorted, space-separated, and only for missing_role and
missing_scope: it comes from configuration, never from the token, and allowlists of tenants,
clients and groups are not advertised.

The engine compiles every configured requirement once, when it is built (``CompiledRequirement``),
so a check is a few set operations; nothing here caches.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from authz.policy.errors import ClaimsChallenge, Code, Denial, Forbidden
from authz.policy.model import Actor, ActorRule, Clause, Principal, Requirement, TokenKind

__all__ = ["ACTORS_ADMITTED", "CompiledRequirement", "authorize"]

_TOKEN_KIND, _ACTOR, _TENANT, _CLIENT, _ROLE, _SCOPE, _GROUP, _AUTH_CONTEXT = range(1, 9)
# The actors each rule admits (None: every actor, no check).
ACTORS_ADMITTED: dict[ActorRule, frozenset[Actor] | None] = {
    ActorRule.NOT_AGENT: frozenset({Actor.HUMAN, Actor.APP}),
    ActorRule.HUMAN: frozenset({Actor.HUMAN}),
    ActorRule.AGENT: frozenset({Actor.AGENT}),
    ActorRule.ANY: None,
}
_CAN_ANSWER_CLAIMS_CHALLENGE = "cp1"


@dataclass(frozen=True, slots=True)
class _CompiledClause:
    kind: TokenKind | None
    actors: frozenset[Actor] | None
    tenants: frozenset[str]
    clients: frozenset[str]
    roles_any: frozenset[str]
    roles_all: frozenset[str]
    scopes_any: frozenset[str]
    scopes_all: frozenset[str]
    groups_any: frozenset[str]
    auth_context: str
    claims_json: str
    role_names: str
    scope_names: str

    @classmethod
    def of(cls, clause: Clause) -> _CompiledClause:
        claims_json = ""
        if clause.auth_context:
            claims_json = json.dumps(
                {"access_token": {"acrs": {"essential": True, "value": clause.auth_context}}},
                separators=(",", ":"),
            )
        return cls(
            kind=None if clause.token_kind == TokenKind.ANY else clause.token_kind,
            actors=ACTORS_ADMITTED[clause.actor],
            tenants=clause.tenants,
            clients=clause.clients,
            roles_any=clause.roles_any,
            roles_all=clause.roles_all,
            scopes_any=clause.scopes_any,
            scopes_all=clause.scopes_all,
            groups_any=clause.groups_any,
            auth_context=clause.auth_context,
            claims_json=claims_json,
            role_names=" ".join(sorted(clause.roles_any | clause.roles_all)),
            scope_names=" ".join(sorted(clause.scopes_any | clause.scopes_all)),
        )

    def failing_step(self, p: Principal) -> int:
        """0 when the clause holds, else the number of the first check that fails."""
        if self.kind is not None and p.kind != self.kind:
            return _TOKEN_KIND
        if self.actors is not None and p.actor not in self.actors:
            return _ACTOR
        if self.tenants and p.tid not in self.tenants:
            return _TENANT
        if self.clients and p.client_id not in self.clients:
            return _CLIENT
        if (self.roles_any and self.roles_any.isdisjoint(p.roles)) or not (
            self.roles_all <= p.roles
        ):
            return _ROLE
        if (self.scopes_any and self.scopes_any.isdisjoint(p.scopes)) or not (
            self.scopes_all <= p.scopes
        ):
            return _SCOPE
        if self.groups_any and (p.groups_overage or self.groups_any.isdisjoint(p.groups)):
            return _GROUP
        if self.auth_context and self.auth_context not in p.acrs:
            return _AUTH_CONTEXT
        return 0

    def denial(self, step: int, p: Principal) -> Denial:
        if step == _TOKEN_KIND:
            return Forbidden(Code.WRONG_TOKEN_KIND)
        if step == _ACTOR:
            return Forbidden(Code.ACTOR_NOT_ALLOWED)
        if step == _TENANT:
            return Forbidden(Code.TENANT_NOT_PERMITTED)
        if step == _CLIENT:
            return Forbidden(Code.CLIENT_NOT_ALLOWED)
        if step == _ROLE:
            return Forbidden(Code.MISSING_ROLE, required_scope=self.role_names)
        if step == _SCOPE:
            return Forbidden(Code.MISSING_SCOPE, required_scope=self.scope_names)
        if step == _GROUP:
            return Forbidden(Code.GROUPS_OVERAGE if p.groups_overage else Code.MISSING_GROUP)
        if _CAN_ANSWER_CLAIMS_CHALLENGE in p.client_capabilities:
            return ClaimsChallenge(Code.AUTH_CONTEXT_REQUIRED, claims_json=self.claims_json)
        return Forbidden(Code.AUTH_CONTEXT_REQUIRED)


class CompiledRequirement:
    """A ``Requirement`` prepared for cheap evaluation."""

    __slots__ = ("_clauses", "anonymous", "requirement")

    def __init__(self, requirement: Requirement) -> None:
        if not requirement.anonymous and not requirement.any_of:
            raise ValueError("a requirement that is not anonymous needs at least one clause")
        self.requirement = requirement
        self.anonymous = requirement.anonymous
        self._clauses = tuple(_CompiledClause.of(c) for c in requirement.any_of)

    def check(self, p: Principal) -> None:
        """Return when some clause holds; raise the closest clause's denial otherwise."""
        if self.anonymous:
            return
        best_step = 0
        best: _CompiledClause | None = None
        for clause in self._clauses:
            step = clause.failing_step(p)
            if step == 0:
                return
            if step > best_step:
                best_step, best = step, clause
        assert best is not None
        raise best.denial(best_step, p)

    def challenge_denials(self) -> tuple[Denial, ...]:
        """The denials carrying configuration-derived challenge parameters this requirement can
        raise (scope names, claims JSON), so their ``WWW-Authenticate`` can be rendered ahead."""
        out: list[Denial] = []
        for clause in self._clauses:
            if clause.role_names:
                out.append(Forbidden(Code.MISSING_ROLE, required_scope=clause.role_names))
            if clause.scope_names:
                out.append(Forbidden(Code.MISSING_SCOPE, required_scope=clause.scope_names))
            if clause.claims_json:
                out.append(ClaimsChallenge(Code.AUTH_CONTEXT_REQUIRED, clause.claims_json))
        return tuple(out)


def authorize(req: Requirement, p: Principal) -> None:
    """Raise ``Forbidden`` or ``ClaimsChallenge`` unless ``p`` satisfies ``req``.

    Compiles ``req`` for this one call (tools, tests); the engine compiles every configured
    requirement once, when it is built, and calls ``CompiledRequirement.check``."""
    CompiledRequirement(req).check(p)
