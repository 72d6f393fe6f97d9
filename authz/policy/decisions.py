"""Turning outcomes into ``Decision`` objects: allow with the identity-header contract, deny with
the right challenge and JSON body, and the explicit fail-closed internal error.

Deny bodies are compact JSON ``{"error": ..., "code": ..., "request_id": ...}`` where ``error`` is
an OAuth-style error and ``code`` our stable denial code:

    status  error                      WWW-Authenticate (RFC 6750 §3, RFC 9728)
    400     invalid_request            Bearer realm="R", error="invalid_request"
    401     invalid_token              missing_token: Bearer realm="R"   (no error attribute)
                                       otherwise:     Bearer realm="R", error="invalid_token",
                                                      error_description="<fixed text per code>"
    401     insufficient_claims        ClaimsChallenge: Bearer realm="", authorization_uri="U",
                                       error="insufficient_claims", claims="<base64 claims JSON>"
    403     insufficient_scope         Bearer realm="R", error="insufficient_scope", scope="S"
                                       (scope omitted when the denial names none)
    403     access_denied              unknown_api, no_matching_route: none (no token privilege
                                       would help, so no challenge is issued)
    429     rate_limited               none (Retry-After, RateLimit-Policy, RateLimit instead)
    503     temporarily_unavailable    none

``R`` is the API's realm, else its name, else ``entra-authz``; ``U`` is the configured
authorization endpoint (default Entra's ``common``). ``resource_metadata="..."`` is appended to
every challenge when the API sets it. Values are quoted with ``\\`` escapes and stripped of
control characters; nothing in a challenge comes from the request or the token. The engine
renders each API's challenges once, when it is built (``ResponsePlan``).

Dynamic metadata (allow and deny alike): ``decision_id``, ``api``, ``route``, ``code``, ``oid``,
``tid``, ``azp``, ``actor`` (human/agent/app); strings, empty when unknown. A rate-limited
decision (or dry-run would-limit) adds ``rate_limit``: the name of the limit.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from authz.policy.errors import (
    MEANING,
    BadRequest,
    ClaimsChallenge,
    Code,
    Denial,
    Forbidden,
    RateLimited,
    Unauthenticated,
)
from authz.policy.headers import HeaderPlan
from authz.policy.model import ApiSpec, Decision, HeaderContract, Principal, Route

__all__ = [
    "DEFAULT_AUTHORIZATION_URI",
    "DEFAULT_REALM",
    "ResponsePlan",
    "allow",
    "deny",
    "internal_error",
    "www_authenticate",
]

DEFAULT_REALM = "entra-authz"
DEFAULT_AUTHORIZATION_URI = "https://login.microsoftonline.com/common/oauth2/authorize"
_JSON = ("content-type", "application/json")
_NO_CHALLENGE_403 = frozenset({Code.UNKNOWN_API, Code.NO_MATCHING_ROUTE})
_OK = Code.OK.value
_OK_REASON = MEANING[Code.OK]


def _metadata(
    decision_id: str,
    code: str,
    api: ApiSpec | None,
    route: Route | None,
    principal: Principal | None,
    denial: Denial | None = None,
) -> Mapping[str, str]:
    meta = {
        "decision_id": decision_id,
        "api": api.name if api is not None else "",
        "route": route.name if route is not None else "",
        "code": code,
        "oid": principal.oid if principal is not None else "",
        "tid": principal.tid if principal is not None else "",
        "azp": principal.client_id if principal is not None else "",
        "actor": principal.actor.value if principal is not None else "",
    }
    if isinstance(denial, RateLimited):
        meta["rate_limit"] = denial.limit  # the configured limit's name (never the key value)
    return MappingProxyType(meta)


# ---------------------------------------------------------------------------------------- allow


def allow(
    *,
    decision_id: str,
    request_id: str,
    api: ApiSpec | None,
    route: Route | None,
    principal: Principal | None,
    contract: HeaderContract,
    would_deny: Denial | None = None,
) -> Decision:
    """An allow carrying the identity-header contract (see ``authz.policy.headers``), the header
    plan compiled for this one call (tools, tests; the engine uses ``ResponsePlan.allow``).

    ``would_deny`` (dry-run): the request is still allowed, but ``code``/``reason`` are the
    denial's and ``would_deny`` is True. ``request_id`` is accepted for symmetry with ``deny``.
    """
    del request_id  # allows have no body to carry it
    return _allow(HeaderPlan(api, contract), decision_id, api, route, principal, would_deny)


def _allow(
    headers: HeaderPlan,
    decision_id: str,
    api: ApiSpec | None,
    route: Route | None,
    principal: Principal | None,
    would_deny: Denial | None,
) -> Decision:
    upstream, remove = headers.render(principal)
    if would_deny is None:
        code, reason = _OK, _OK_REASON
    else:
        code, reason = would_deny.code.value, would_deny.reason
    return Decision(
        allowed=True,
        status=200,
        code=code,
        reason=reason,
        decision_id=decision_id,
        api=api.name if api is not None else "",
        route=route.name if route is not None else "",
        upstream_headers=upstream,
        remove_headers=remove,
        metadata=_metadata(decision_id, code, api, route, principal, would_deny),
        principal=principal,
        would_deny=would_deny is not None,
    )


# ----------------------------------------------------------------------------------------- deny


def _oauth_error(denial: Denial) -> str:
    if isinstance(denial, ClaimsChallenge):
        return "insufficient_claims"
    if denial.status == 400:
        return "invalid_request"
    if denial.status == 401:
        return "invalid_token"
    if denial.status == 403:
        return "access_denied" if denial.code in _NO_CHALLENGE_403 else "insufficient_scope"
    if denial.status == 429:
        return "rate_limited"
    return "temporarily_unavailable"


def _quote(value: str) -> str:
    """An RFC 9110 quoted-string of printable ASCII (anything else is dropped)."""
    cleaned = "".join(c for c in value if " " <= c <= "~")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _description(code: Code) -> str:
    # RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E, so no '"' or '\' at all.
    text = MEANING[code].replace('"', "'").replace("\\", "/")
    return '"' + "".join(c for c in text if " " <= c <= "~") + '"'


def _render_challenge(denial: Denial, api: ApiSpec | None, authorization_uri: str) -> str | None:
    realm = _quote((api.realm or api.name) if api is not None else DEFAULT_REALM)
    if isinstance(denial, ClaimsChallenge):
        claims = base64.b64encode(denial.claims_json.encode("utf-8")).decode("ascii")
        params = [
            'realm=""',
            f"authorization_uri={_quote(authorization_uri)}",
            'error="insufficient_claims"',
            f"claims={_quote(claims)}",
        ]
    elif denial.status == 400:
        params = [f"realm={realm}", 'error="invalid_request"']
    elif denial.status == 401:
        if denial.code == Code.MISSING_TOKEN:
            params = [f"realm={realm}"]
        else:
            params = [
                f"realm={realm}",
                'error="invalid_token"',
                f"error_description={_description(denial.code)}",
            ]
    elif denial.status == 403 and denial.code not in _NO_CHALLENGE_403:
        params = [f"realm={realm}", 'error="insufficient_scope"']
        scope = denial.required_scope if isinstance(denial, Forbidden) else ""
        if scope:
            params.append(f"scope={_quote(scope)}")
    else:
        return None
    if api is not None and api.resource_metadata:
        params.append(f"resource_metadata={_quote(api.resource_metadata)}")
    return "Bearer " + ", ".join(params)


def www_authenticate(
    denial: Denial,
    api: ApiSpec | None,
    authorization_uri: str = DEFAULT_AUTHORIZATION_URI,
) -> str | None:
    """The ``WWW-Authenticate`` value for ``denial`` (``None`` when it gets no challenge)."""
    return _render_challenge(denial, api, authorization_uri)


# What a challenge depends on besides the API: claims challenge or not, status, code, scope, claims.
_Shape = tuple[bool, int, str, str, str]


def _shape(denial: Denial) -> _Shape:
    claims = isinstance(denial, ClaimsChallenge)
    return (
        claims,
        denial.status,
        denial.code.value,
        denial.required_scope if isinstance(denial, Forbidden) else "",
        denial.claims_json if isinstance(denial, ClaimsChallenge) else "",
    )


def _body(error: str, code: str, request_id: str) -> bytes:
    return json.dumps(
        {"error": error, "code": code, "request_id": request_id},
        separators=(",", ":"),
    ).encode()


def deny(
    denial: Denial,
    *,
    decision_id: str,
    request_id: str,
    api: ApiSpec | None,
    route: Route | None,
    principal: Principal | None = None,
    authorization_uri: str = DEFAULT_AUTHORIZATION_URI,
) -> Decision:
    """A deny with the status the denial's phase fixed, its challenge, and the JSON body; the
    challenge rendered for this one call (the engine uses ``ResponsePlan.deny``)."""
    challenge = _render_challenge(denial, api, authorization_uri)
    return _deny(denial, challenge, decision_id, request_id, api, route, principal)


def _deny(
    denial: Denial,
    challenge: str | None,
    decision_id: str,
    request_id: str,
    api: ApiSpec | None,
    route: Route | None,
    principal: Principal | None,
) -> Decision:
    code = denial.code.value
    headers: tuple[tuple[str, str], ...] = (
        (("www-authenticate", challenge), _JSON) if challenge is not None else (_JSON,)
    )
    if isinstance(denial, RateLimited):
        headers = (*denial.headers, _JSON)
    return Decision(
        allowed=False,
        status=denial.status,
        code=code,
        reason=denial.reason,
        decision_id=decision_id,
        api=api.name if api is not None else "",
        route=route.name if route is not None else "",
        response_headers=headers,
        body=_body(_oauth_error(denial), code, request_id),
        metadata=_metadata(decision_id, code, api, route, principal, denial),
        principal=principal,
    )


class ResponsePlan:
    """What one API's decisions render that configuration alone fixes, prepared once when the
    engine is built: its identity-header plan and its ``WWW-Authenticate`` challenges.

    Challenges are rendered ahead for every code in the three challenge-carrying phases (400,
    401, 403) and for the denials the API's requirements can raise (``extra``: their scope names
    and claims JSON). A denial whose parameters come from data instead (a revocation rule's
    ``nbf`` claims challenge) is rendered when it happens, and not kept."""

    __slots__ = ("_challenges", "api", "authorization_uri", "headers")

    def __init__(
        self,
        api: ApiSpec | None,
        contract: HeaderContract,
        authorization_uri: str = DEFAULT_AUTHORIZATION_URI,
        extra: Iterable[Denial] = (),
    ) -> None:
        self.api = api
        self.authorization_uri = authorization_uri
        self.headers = HeaderPlan(api, contract)
        kinds = (BadRequest, Unauthenticated, Forbidden)
        standard = [kind(code) for code in Code if code is not Code.OK for kind in kinds]
        self._challenges: Mapping[_Shape, str | None] = MappingProxyType(
            {_shape(d): _render_challenge(d, api, authorization_uri) for d in (*standard, *extra)}
        )

    def challenge(self, denial: Denial) -> str | None:
        """The ``WWW-Authenticate`` value for ``denial`` (``None`` when it gets no challenge)."""
        shape = _shape(denial)
        if shape in self._challenges:
            return self._challenges[shape]
        return _render_challenge(denial, self.api, self.authorization_uri)

    def allow(
        self,
        *,
        decision_id: str,
        route: Route | None,
        principal: Principal | None,
        would_deny: Denial | None = None,
    ) -> Decision:
        """``allow`` with this API's prepared header plan."""
        return _allow(self.headers, decision_id, self.api, route, principal, would_deny)

    def deny(
        self,
        denial: Denial,
        *,
        decision_id: str,
        request_id: str,
        route: Route | None,
        principal: Principal | None = None,
    ) -> Decision:
        """``deny`` with this API's prepared challenges."""
        challenge = self.challenge(denial)
        return _deny(denial, challenge, decision_id, request_id, self.api, route, principal)


def internal_error(decision_id: str, request_id: str = "") -> Decision:
    """The explicit deny for any unexpected failure: 503 ``internal_error``, never an allow."""
    code = Code.INTERNAL_ERROR.value
    return Decision(
        allowed=False,
        status=503,
        code=code,
        reason=MEANING[Code.INTERNAL_ERROR],
        decision_id=decision_id,
        response_headers=(_JSON,),
        body=_body("temporarily_unavailable", code, request_id),
        # Only these two keys: the transports precompute this answer (see tests/component).
        metadata=MappingProxyType({"decision_id": decision_id, "code": code}),
    )
