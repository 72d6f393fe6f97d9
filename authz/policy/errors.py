"""Denials: every way a check ends in "no", each with a status, a stable code and a public reason.

The phase that fails decides the status (the Authorino rule): a request that cannot even be read
is a 400, an identity failure (no token, a bad token) is a 401, a rule failure on a valid identity
is a 403, and a failure of ours is a 503. Evaluators raise the class of their phase with a code;
they never pick HTTP statuses themselves.

    Denial                      (abstract; never raised directly)
    ├── BadRequest          400 invalid_request, non_canonical_path
    ├── Unauthenticated     401 missing_token, malformed_token, bad_signature, token_expired, ...
    │   │                       token_binding_missing, token_binding_mismatch, ... (RFC 8705)
    │   ├── UnknownSigningKey 401 unknown_signing_key (names the issuer to refresh)
    │   └── ClaimsChallenge 401 auth_context_required, when the client can answer a claims challenge
    │                           (and token_revoked, when a newer token would pass: CAE's nbf)
    ├── Forbidden           403 no_matching_route, missing_role, actor_not_allowed, ...
    ├── RateLimited         429 rate_limited, with Retry-After and the RateLimit headers
    └── Unavailable         503 keys_unavailable, internal_error

The code is a stable snake_case string: it is the Prometheus label, the audit-log field, the Envoy
dynamic-metadata value and the key of the table in README.md. Public reasons are short, fixed
phrases chosen by us: they never contain token contents, claim values or secrets.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Every decision code. ``ok`` is the only allow; the rest are denials."""

    OK = "ok"
    # 400: the request itself is unacceptable
    INVALID_REQUEST = "invalid_request"
    NON_CANONICAL_PATH = "non_canonical_path"
    # 401: no acceptable identity
    MISSING_TOKEN = "missing_token"
    MALFORMED_TOKEN = "malformed_token"
    TOKEN_TOO_LARGE = "token_too_large"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    FORBIDDEN_HEADER_PARAMETER = "forbidden_header_parameter"
    UNKNOWN_SIGNING_KEY = "unknown_signing_key"
    BAD_SIGNATURE = "bad_signature"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    MISSING_CLAIM = "missing_claim"
    INVALID_CLAIM = "invalid_claim"
    DUPLICATE_CLAIM = "duplicate_claim"
    ISSUER_MISMATCH = "issuer_mismatch"
    KEY_ISSUER_MISMATCH = "key_issuer_mismatch"
    AUDIENCE_MISMATCH = "audience_mismatch"
    TENANT_NOT_ALLOWED = "tenant_not_allowed"
    TOKEN_VERSION_NOT_ACCEPTED = "token_version_not_accepted"
    NO_SCOPE_OR_ROLE = "no_scope_or_role"
    APP_TOKEN_WITHOUT_ROLES = "app_token_without_roles"
    AUTH_CONTEXT_REQUIRED = "auth_context_required"
    TOKEN_REVOKED = "token_revoked"
    TOKEN_BINDING_MISSING = "token_binding_missing"
    TOKEN_BINDING_MISMATCH = "token_binding_mismatch"
    TOKEN_BINDING_UNSUPPORTED = "token_binding_unsupported"
    TOKEN_NOT_BOUND = "token_not_bound"
    # 403: a valid identity that the route does not admit
    UNKNOWN_API = "unknown_api"
    NO_MATCHING_ROUTE = "no_matching_route"
    MISSING_ROLE = "missing_role"
    MISSING_SCOPE = "missing_scope"
    MISSING_GROUP = "missing_group"
    GROUPS_OVERAGE = "groups_overage"
    WRONG_TOKEN_KIND = "wrong_token_kind"
    ACTOR_NOT_ALLOWED = "actor_not_allowed"
    CLIENT_NOT_ALLOWED = "client_not_allowed"
    TENANT_NOT_PERMITTED = "tenant_not_permitted"
    # 429
    RATE_LIMITED = "rate_limited"
    # 503: our failure, never the caller's
    KEYS_UNAVAILABLE = "keys_unavailable"
    INTERNAL_ERROR = "internal_error"


# What each code means, in one place: README's table is checked against this mapping by a test.
MEANING: dict[Code, str] = {
    Code.OK: "allowed",
    Code.INVALID_REQUEST: "the request carries the credential more than once or in a broken form",
    Code.NON_CANONICAL_PATH: "the path cannot be canonicalised safely (encoded '/', '\\', NUL, "
    "control characters, ';' parameters, '..' above the root)",
    Code.MISSING_TOKEN: "no bearer token on a route that needs one",
    Code.MALFORMED_TOKEN: "not a well-formed compact JWS (segments, base64url, JSON)",
    Code.TOKEN_TOO_LARGE: "the token exceeds the configured size cap",
    Code.ALGORITHM_NOT_ALLOWED: "the header 'alg' is not in the allowlist (default RS256)",
    Code.FORBIDDEN_HEADER_PARAMETER: "the header carries crit, jku, x5u, jwk, x5c, b64 or nonce",
    Code.UNKNOWN_SIGNING_KEY: "no key with this 'kid' for the issuer, even after a refresh",
    Code.BAD_SIGNATURE: "the signature does not verify with the issuer's key",
    Code.TOKEN_EXPIRED: "'exp' is in the past beyond the clock skew",
    Code.TOKEN_NOT_YET_VALID: "'nbf' or 'iat' is in the future beyond the clock skew",
    Code.MISSING_CLAIM: "a required claim (exp, nbf, iat, iss, aud, tid, ver) is absent",
    Code.INVALID_CLAIM: "a claim has the wrong type or form (e.g. string 'exp', non-GUID 'tid')",
    Code.DUPLICATE_CLAIM: "a claim or header parameter appears twice",
    Code.ISSUER_MISMATCH: "'iss' is not the exact issuer for the token's tenant and version",
    Code.KEY_ISSUER_MISMATCH: "the signing key's 'issuer' does not match the token's issuer",
    Code.AUDIENCE_MISMATCH: "'aud' is not one of this API's audiences",
    Code.TENANT_NOT_ALLOWED: "'tid' is not an allowed tenant of the issuer",
    Code.TOKEN_VERSION_NOT_ACCEPTED: "'ver' is not a token version this issuer accepts",
    Code.NO_SCOPE_OR_ROLE: "the token has neither 'scp' nor 'roles' (e.g. an ID token)",
    Code.APP_TOKEN_WITHOUT_ROLES: "an app-only token without 'roles'",
    Code.AUTH_CONTEXT_REQUIRED: "the route needs a Conditional Access auth context ('acrs')",
    Code.TOKEN_REVOKED: "the token matches a revocation rule (revoked by an administrator)",
    Code.TOKEN_BINDING_MISSING: "the token is certificate-bound ('cnf') but the request came "
    "without a client certificate",
    Code.TOKEN_BINDING_MISMATCH: "the token is bound to another client certificate than the "
    "one presented (cnf x5t#S256 differs)",
    Code.TOKEN_BINDING_UNSUPPORTED: "the token is bound ('cnf') by a method other than a "
    "certificate thumbprint (x5t#S256): its binding cannot be checked",
    Code.TOKEN_NOT_BOUND: "the API requires certificate-bound tokens and this one has no "
    "'cnf' x5t#S256",
    Code.UNKNOWN_API: "the request could not be assigned to a configured API",
    Code.NO_MATCHING_ROUTE: "no route of the API matches the method and path",
    Code.MISSING_ROLE: "the token lacks the role(s) the route requires",
    Code.MISSING_SCOPE: "the token lacks the scope(s) the route requires",
    Code.MISSING_GROUP: "the token is in none of the groups the route requires",
    Code.GROUPS_OVERAGE: "the token has too many groups to embed; group rules cannot be decided",
    Code.WRONG_TOKEN_KIND: "app-only token on a delegated-only route, or the reverse",
    Code.ACTOR_NOT_ALLOWED: "the route does not admit this kind of actor (an AI agent where "
    "only people or apps may call, or the reverse)",
    Code.CLIENT_NOT_ALLOWED: "the calling client app (azp/appid) is not allowed on the route",
    Code.TENANT_NOT_PERMITTED: "the token's tenant is not allowed on this route",
    Code.RATE_LIMITED: "the caller exceeded its rate limit",
    Code.KEYS_UNAVAILABLE: "no usable signing keys for the token's issuer or tenant (never "
    "loaded, or the last good ones are past their maximum age)",
    Code.INTERNAL_ERROR: "an unexpected error in the authorization service (fail closed)",
}


class Denial(Exception):
    """Base of every denial. Subclasses fix the status; instances carry code and reason."""

    status: int = 403

    def __init__(self, code: Code, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason if reason is not None else MEANING[code]
        super().__init__(f"{code}: {self.reason}")


class BadRequest(Denial):
    status = 400


class Unauthenticated(Denial):
    status = 401


class UnknownSigningKey(Unauthenticated):
    """No key with the token's kid in the issuer's snapshot. ``issuer`` names the configured
    issuer whose keys the transport may refresh (single-flight, rate-limited) before re-checking;
    ``tenant`` the token's (unverified) tenant, whose own key set that is for a multi-tenant
    issuer."""

    def __init__(self, issuer: str, reason: str | None = None, *, tenant: str = "") -> None:
        super().__init__(Code.UNKNOWN_SIGNING_KEY, reason)
        self.issuer = issuer
        self.tenant = tenant


class ClaimsChallenge(Unauthenticated):
    """A 401 that asks the client to get a token satisfying ``claims`` (an auth context)."""

    def __init__(self, code: Code, claims_json: str, reason: str | None = None) -> None:
        super().__init__(code, reason)
        self.claims_json = claims_json


class Forbidden(Denial):
    status = 403

    def __init__(self, code: Code, reason: str | None = None, *, required_scope: str = "") -> None:
        super().__init__(code, reason)
        # What the route required, for WWW-Authenticate: Bearer error="insufficient_scope",
        # scope="...". Built from configuration only, never from the token.
        self.required_scope = required_scope


class RateLimited(Denial):
    """A rate limit was exceeded (``authz.policy.ratelimit``). ``headers`` are the
    ``Retry-After``/``RateLimit-Policy``/``RateLimit`` response headers (from configuration and
    counters only); ``limit`` names the limit, ``dry_run`` says it is only counted and logged."""

    status = 429

    def __init__(
        self, limit: str, headers: tuple[tuple[str, str], ...], *, dry_run: bool = False
    ) -> None:
        super().__init__(Code.RATE_LIMITED)
        self.limit = limit
        self.headers = headers
        self.dry_run = dry_run


class Unavailable(Denial):
    status = 503
