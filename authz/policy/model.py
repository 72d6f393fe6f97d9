"""Value objects of the decision core: what a request is, who the caller is, what a route demands,
and what the answer is.

Everything here is frozen, slotted and built once: configuration is parsed into these at startup
(see ``authz.config``), requests are converted into ``RequestAttrs`` at the transport edge
(``authz.server.convert`` for gRPC, ``authz.server.http`` for HTTP), and the engine answers with a
``Decision`` that both transports render without further thought.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})

# One definition each, imported wherever they are needed (config, identity, revocation, dev IdP).
# A tenant or object id as Entra writes it: a lower-case GUID (match with ``fullmatch``).
GUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
GUID_RE = re.compile(GUID_PATTERN)
# The tenant names whose documents carry the {tenantid} template: tokens of many tenants, so an
# explicit allowlist is required. ``consumers`` is NOT one of them: its documents name one
# concrete tenant (the Microsoft-account tenant), so it is a single-tenant issuer.
MULTI_TENANT: frozenset[str] = frozenset({"common", "organizations"})
CONSUMERS = "consumers"
# The token algorithms a configuration may allow (Entra signs with RSA keys; see tokens.algorithms).
SUPPORTED_ALGORITHMS = ("RS256", "RS384", "RS512")


class TokenKind(StrEnum):
    """Who the token speaks for: an application alone, or a user through an application."""

    APP = "app"
    USER = "user"
    ANY = "any"


class Actor(StrEnum):
    """Who acts behind a token (``authz.identity.entra`` decides; docs/token-kinds.md):

    a person through a client app, an Entra Agent ID agent (on its own, through its agent user
    account, or for a person), or an ordinary application acting as itself."""

    HUMAN = "human"
    AGENT = "agent"
    APP = "app"


class ActorRule(StrEnum):
    """A clause's ``actor`` requirement. ``NOT_AGENT`` is the default (the key left out): people
    and ordinary applications pass, as ``token_kind`` allows; an agent passes only a clause that
    names ``agent`` or ``any``."""

    NOT_AGENT = "not_agent"
    HUMAN = "human"
    AGENT = "agent"
    ANY = "any"


class BoundTokens(StrEnum):
    """An API's ``require_bound_tokens`` (RFC 8705 certificate-bound access tokens):

    ``off``: ``cnf`` is ignored (a bound token is accepted as a plain bearer token);
    ``when_present`` (default): a token that carries ``cnf`` must come with its certificate;
    ``always``: every token must be certificate-bound and come with its certificate."""

    OFF = "off"
    WHEN_PRESENT = "when_present"
    ALWAYS = "always"


class Mode(StrEnum):
    ENFORCE = "enforce"
    DRY_RUN = "dry-run"


# --------------------------------------------------------------------------------------- request


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """One request as Envoy described it, independent of the transport that carried it.

    ``headers`` keys are lower-case; a header Envoy merged from repeats is one comma-joined value.
    ``path`` is the raw ``:path`` (query included); canonicalisation happens in the route matcher.
    ``context`` is Envoy's per-route ``context_extensions`` (gRPC only; empty over HTTP).
    """

    method: str
    path: str
    host: str = ""
    scheme: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    context: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    request_id: str = ""
    source_address: str = ""
    # The client certificate Envoy saw on the downstream TLS connection, as its RFC 8705
    # thumbprint: base64url(SHA-256(DER)), unpadded. "" = no certificate; UNREADABLE_CERT = one
    # was forwarded but could not be read (it then matches no token's cnf).
    client_cert_x5t: str = ""


UNREADABLE_CERT = "!unreadable"


# ------------------------------------------------------------------------------------- principal


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. Built only by ``authz.identity.entra`` from a token that passed every
    API-independent check (signature, issuer, key issuer, lifetime, tenant, claim types)."""

    tid: str
    oid: str
    sub: str
    client_id: str  # azp (v2) or appid (v1)
    kind: TokenKind  # APP or USER, never ANY
    version: str  # "1.0" or "2.0"
    issuer: str
    audience: str
    provider: str  # name of the configured issuer (identity provider) that vouched for it
    expires_at: int
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    scp: str = ""  # the 'scp' claim verbatim (space-separated), for the x-scopes header
    roles_list: tuple[str, ...] = ()  # 'roles' in token order, for the x-roles header
    groups: frozenset[str] = frozenset()
    groups_overage: bool = False
    acrs: frozenset[str] = frozenset()
    client_capabilities: frozenset[str] = frozenset()  # xms_cc, e.g. {"cp1"}
    uti: str = ""
    idtyp: str = ""
    # The verified claim set, read-only; used only for configured claim->header mappings.
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    actor: Actor = Actor.HUMAN  # who acts: xms_par_app_azp / facet claims (agents), else kind
    bound: bool = False  # the token carries a 'cnf' claim (it is sender-constrained)
    cnf_x5t: str = ""  # cnf["x5t#S256"]: the certificate thumbprint it is bound to ("" = none)


# ----------------------------------------------------------------------------------- requirements


@dataclass(frozen=True, slots=True)
class Clause:
    """One alternative of a route's requirement; every non-empty field must hold.

    An empty clause means "any valid token". Sets compare exactly (roles, scopes and group object
    ids are case-sensitive in Entra tokens).
    """

    token_kind: TokenKind = TokenKind.ANY
    actor: ActorRule = ActorRule.NOT_AGENT
    roles_any: frozenset[str] = frozenset()
    roles_all: frozenset[str] = frozenset()
    scopes_any: frozenset[str] = frozenset()
    scopes_all: frozenset[str] = frozenset()
    groups_any: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()  # narrows the API's tenants; empty = no narrowing
    clients: frozenset[str] = frozenset()  # allowed azp/appid; empty = any client
    auth_context: str = ""  # required 'acrs' value (c1..c99); empty = none


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a route demands: nothing (anonymous), or a valid token satisfying any one clause."""

    anonymous: bool = False
    any_of: tuple[Clause, ...] = (Clause(),)

    @property
    def authenticated_only(self) -> bool:
        return not self.anonymous and self.any_of == (Clause(),)


ANONYMOUS = Requirement(anonymous=True, any_of=())
AUTHENTICATED = Requirement()

PathKind = Literal["exact", "prefix", "template"]

# What a rate limit counts by: claims of the verified token, or the client address Envoy saw.
LimitKeyPart = Literal["oid", "azp", "tid", "sub", "ip"]


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One rate limit or quota (``authz.policy.ratelimit`` enforces it): at most ``limit``
    allowed requests per ``period_s`` seconds (sliding window) for each value of ``key``."""

    name: str
    key: tuple[LimitKeyPart, ...]
    limit: int
    period_s: int
    mode: Mode | None = None  # None: the route's (or API's) mode


@dataclass(frozen=True, slots=True)
class Route:
    """One configured route. ``methods``/``hosts`` empty = any. Paths are matched after
    canonicalisation, case-sensitively; methods are upper-case and compared exactly."""

    name: str
    path: str
    path_kind: PathKind
    require: Requirement
    methods: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    mode: Mode | None = None  # None: inherit the API's mode
    rate_limits: tuple[LimitSpec, ...] = ()  # counted per route, after the API's own limits


# ------------------------------------------------------------------------------------ APIs, IdPs


@dataclass(frozen=True, slots=True)
class IssuerSpec:
    """One Entra identity provider: a cloud instance and a tenant (GUID, domain, or the
    multi-tenant ``common``/``organizations`` with an explicit allowlist)."""

    name: str
    instance: str  # e.g. https://login.microsoftonline.com (no trailing slash)
    tenant: str
    versions: frozenset[str] = frozenset({"2.0"})  # accepted token versions: "1.0", "2.0"
    allowed_tenants: frozenset[str] = frozenset()  # required for common/organizations
    refresh_interval_s: float = 3600.0
    refresh_jitter_s: float = 300.0
    unknown_kid_min_interval_s: float = 300.0
    fetch_timeout_s: float = 5.0
    metadata_query: str = ""
    # Last-known-good keys older than this are not used (checks answer 503 keys_unavailable).
    max_key_age_s: float = 86400.0  # e.g. "appid=<client id>" for apps with custom signing keys

    @property
    def multi_tenant(self) -> bool:
        return self.tenant in MULTI_TENANT


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """API-independent token rules (the ``tokens:`` section of the config)."""

    algorithms: frozenset[str] = frozenset({"RS256"})
    clock_skew_s: int = 60
    max_token_bytes: int = 16384
    cache_max_entries: int = 10000
    cache_max_ttl_s: float = 300.0
    # How long a check awaits an unknown-kid key refresh before answering unknown_signing_key
    # (the refresh goes on in the background); well under Envoy's ext_authz timeout.
    unknown_kid_wait_s: float = 0.1
    # PEM CA bundle for discovery/JWKS over TLS (None: SSL_CERT_FILE, else certifi's bundle).
    ca_bundle: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderContract:
    """Names of the identity headers set on allow, and the policy around them."""

    user_id: str = "x-user-id"
    tenant_id: str = "x-tenant-id"
    client_id: str = "x-client-id"
    roles: str = "x-roles"
    scopes: str = "x-scopes"
    token_kind: str = "x-token-kind"
    actor_kind: str = "x-actor-kind"
    # Extra headers any client might forge and that we therefore always remove.
    also_strip: tuple[str, ...] = ()

    @property
    def standard(self) -> tuple[str, ...]:
        return (
            self.user_id,
            self.tenant_id,
            self.client_id,
            self.roles,
            self.scopes,
            self.token_kind,
            self.actor_kind,
        )


@dataclass(frozen=True, slots=True)
class ApiSpec:
    """One API behind the authz service: its audiences, issuers, routes and header mappings."""

    name: str
    audiences: frozenset[str]
    issuers: tuple[str, ...]  # names of IssuerSpec that may vouch for callers of this API
    routes: tuple[Route, ...]
    match_hosts: frozenset[str] = frozenset()  # for requests without context_extensions
    match_path_prefixes: tuple[str, ...] = ()
    default: Requirement | None = None  # unmatched requests: None = deny no_matching_route
    mode: Mode = Mode.ENFORCE
    require_scope_or_role: bool = True  # False = "ACL mode": tokens with neither pass
    forward_authorization: bool = False  # keep the Authorization header for the backend
    strip_method_override: bool = True  # remove x-http-method-override & co. on allow
    claim_headers: tuple[tuple[str, str], ...] = ()  # (header name, claim name)
    realm: str = ""  # WWW-Authenticate realm; "" = the API name
    resource_metadata: str = ""  # RFC 9728 URL, added to challenges when set
    rate_limits: tuple[LimitSpec, ...] = ()  # counted per API, for every request of it
    require_bound_tokens: BoundTokens = BoundTokens.WHEN_PRESENT  # RFC 8705 (cnf x5t#S256)


# -------------------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check, ready to be rendered by either transport.

    On allow: ``upstream_headers`` are set on the request to the backend with overwrite semantics,
    ``remove_headers`` are removed from it. On deny: ``status``, ``response_headers`` and ``body``
    go back to the client. ``metadata`` goes to Envoy's dynamic metadata (namespace
    ``envoy.filters.http.ext_authz``). ``code`` is the real decision even when dry-run allowed
    the request (then ``allowed`` is True and ``would_deny`` is True).
    """

    allowed: bool
    status: int
    code: str
    reason: str
    decision_id: str
    api: str = ""
    route: str = ""
    upstream_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    metadata: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    principal: Principal | None = None
    would_deny: bool = False
    # Internal: the issuer whose key cache missed the token's kid; the transport may refresh it
    # (single-flight, rate-limited) and check once more. Never rendered.
    refresh_issuer: str = ""
    refresh_tenant: str = ""  # and the token's tenant (a multi-tenant issuer's per-tenant keys)
