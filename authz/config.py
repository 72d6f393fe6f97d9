"""The configuration file: YAML in, frozen and validated ``Settings`` out, or a ``ConfigError`` that
names every bad key by its path (``apis[0].routes[2].require.roles_any: expected a list of
strings``).

Size: the YAML schema and its conversion to Settings, side by side, key by key.

The YAML is checked by pydantic models with ``extra="forbid"`` and strict types, then converted
into the frozen value objects of ``authz.policy.model`` (tuples, frozensets). Nothing here is
consulted per request: route templates are compiled and checked here once, so a config that loads
cannot fail later. Listen addresses may be overridden by environment variables for containers.

The YAML is read by ``_Loader`` (a ``SafeLoader``) and the composed node graph is checked before
anything is built from it: a key set twice in one mapping is an error (PyYAML would silently keep
the last one: ``require: authenticated`` then ``require: anonymous`` would fail open), nesting is
limited to ``MAX_DEPTH`` levels and aliases (``&a``/``*a``) may be used but the document they
expand to is limited to ``MAX_NODES`` nodes (an alias bomb is refused, not expanded). Every
problem is reported in one pass, and every message is bounded (values are shown abridged, at most
``MAX_PROBLEMS`` lines).

Must not import grpc, prometheus, asyncio or network libraries.
"""

from __future__ import annotations

import importlib.util
import os
import re
import reprlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from authz.policy.headers import METHOD_OVERRIDE_HEADERS
from authz.policy.model import (
    ANONYMOUS,
    AUTHENTICATED,
    CONSUMERS,
    GUID_RE,
    MULTI_TENANT,
    SUPPORTED_ALGORITHMS,
    ActorRule,
    ApiSpec,
    BoundTokens,
    Clause,
    HeaderContract,
    IssuerSpec,
    LimitKeyPart,
    LimitSpec,
    Mode,
    Requirement,
    Route,
    TokenKind,
    TokenSettings,
)
from authz.policy.revocation import DEFAULT_MAX_RULE_LIFETIME_S
from authz.policy.routes import split_host_port

ENV_OVERRIDES = {
    "AUTHZ_GRPC_LISTEN": "grpc_listen",
    "AUTHZ_HTTP_LISTEN": "http_listen",
    "AUTHZ_ADMIN_LISTEN": "admin_listen",
    "AUTHZ_WORKERS": "workers",
}

DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
METHOD_RE = re.compile(r"^[A-Z]+$")
LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
ACRS_RE = re.compile(r"^c[1-9][0-9]?$")
ASCII_DIGITS_RE = re.compile(r"^[0-9]{1,6}$")
PERIOD_RE = re.compile(r"^([1-9][0-9]*)(s|m|h|d)$")
PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_PERIOD_S = 31 * 86400
LIMIT_KEYS: dict[str, LimitKeyPart] = {
    "oid": "oid",
    "azp": "azp",
    "appid": "azp",  # v1 name of the same client id
    "tid": "tid",
    "sub": "sub",
    "ip": "ip",
}
RESERVED_HEADERS = frozenset(
    {"authorization", "host", "content-length", "transfer-encoding", "connection", "te"}
)
# Names a header we SET (contract, claim_headers) may not have: what Envoy or HTTP treats
# specially (hop-by-hop, framing, request identity, forwarding), our own HTTP-transport metadata
# (x-authz-*), Envoy's internal x-envoy-*, pseudo-headers, and the method overrides we strip.
SET_RESERVED_HEADERS = RESERVED_HEADERS | {
    "keep-alive",
    "trailer",
    "upgrade",
    "expect",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-client-cert",
    *METHOD_OVERRIDE_HEADERS,
}
SET_RESERVED_PREFIXES = (":", "x-envoy-", "x-authz-", "proxy-")
ROUTE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


# Limits of the loader (see the module docstring and docs/configuration.md).
MAX_DEPTH = 32  # nesting levels; the real schema needs 8
MAX_NODES = 200_000  # YAML nodes after alias expansion (a large config has a few thousand)
MAX_PROBLEMS = 100  # lines of one ConfigError
MAX_PROBLEM_CHARS = 400  # characters of one line

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4


def short(value: Any) -> str:
    """A bounded repr for messages: a huge value must not make a huge error."""
    return _SHORT.repr(value)


def _bounded(problems: Sequence[str]) -> tuple[str, ...]:
    out = [
        p if len(p) <= MAX_PROBLEM_CHARS else p[: MAX_PROBLEM_CHARS - 3] + "..."
        for p in problems[:MAX_PROBLEMS]
    ]
    if len(problems) > MAX_PROBLEMS:
        out.append(f"... and {len(problems) - MAX_PROBLEMS} more problem(s)")
    return tuple(out)


class ConfigError(Exception):
    """A configuration that must not be served. ``problems`` are ``key.path: message`` lines."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = _bounded(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


# ------------------------------------------------------------------------------ settings objects


@dataclass(frozen=True, slots=True)
class ServerSettings:
    grpc_listen: str = "127.0.0.1:9001"
    http_listen: str = ""
    admin_listen: str = "127.0.0.1:9090"
    shutdown_grace_s: float = 10.0
    workers: int = 0  # 0 = one per available CPU (cgroup-aware)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    log_allows: bool = True
    allow_sample_rate: float = 1.0


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where shared state lives (``redis:``); ``url == ""``: nowhere, every process on its own.
    The password itself is read by ``authz.state.redisconn`` (from ``password_file`` at connect
    time, so a rotated secret file is picked up) and never kept in a repr."""

    url: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    tls_ca_file: str = ""
    key_prefix: str = "authz:"
    connect_timeout_s: float = 0.5
    timeout_s: float = 0.25
    sync_interval_s: float = 0.1

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True, slots=True)
class AdminApiSettings:
    """The revocation admin API on the admin listener, protected by an Entra token (an app
    role for the API named by ``audiences``/``issuers``), checked by our own engine."""

    enabled: bool = False
    audiences: frozenset[str] = frozenset()
    issuers: tuple[str, ...] = ()
    role: str = ""
    max_body_bytes: int = 65536


@dataclass(frozen=True, slots=True)
class RevocationSettings:
    file: str = ""  # "" = no file source; relative paths are resolved against the config's dir
    poll_interval_s: float = 1.0
    max_rule_lifetime_s: float = float(DEFAULT_MAX_RULE_LIFETIME_S)
    admin_api: AdminApiSettings = AdminApiSettings()
    redis: bool = False  # rules shared through redis: (RedisFeed)
    redis_poll_interval_s: float = 0.2


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry spans per check (``tracing:``; docs/tracing.md). Off by default; ``enabled``
    needs the ``[otel]`` extra installed (checked when the config loads)."""

    enabled: bool = False
    service_name: str = "entra-authz"
    sample_ratio: float = 1.0  # of traces without a sampled parent (ParentBased(TraceIdRatio))
    otlp_endpoint: str = ""  # "" = the exporter's default (OTEL_EXPORTER_OTLP_* environment)
    otlp_protocol: str = "grpc"  # grpc | http/protobuf
    otlp_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class EnvoyCacheSettings:
    """Hints for a response cache in Envoy (``envoy_cache:``; docs/envoy-cache.md). ``max_ttl_s``
    0 = no hints: a cache that sees no ``cache_ttl_seconds`` must not store the answer."""

    max_ttl_s: int = 0


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    tokens: TokenSettings
    issuers: tuple[IssuerSpec, ...]
    apis: tuple[ApiSpec, ...]
    headers: HeaderContract
    audit: AuditSettings
    authorization_uri: str
    warnings: tuple[str, ...] = ()
    redis: RedisSettings = RedisSettings()
    revocation: RevocationSettings = RevocationSettings()
    tracing: TracingSettings = TracingSettings()
    envoy_cache: EnvoyCacheSettings = EnvoyCacheSettings()

    def issuer(self, name: str) -> IssuerSpec:
        for spec in self.issuers:
            if spec.name == name:
                return spec
        raise KeyError(name)


# -------------------------------------------------------------------------------- YAML schema

StrictStr = Annotated[str, Field(strict=True)]
StrList = list[StrictStr]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _listen(value: str) -> str:
    if value == "":
        return value
    m = LISTEN_RE.fullmatch(value)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9001), got {value!r}")
    return value


class _Server(_Model):
    grpc_listen: StrictStr = "127.0.0.1:9001"
    http_listen: StrictStr = ""
    admin_listen: StrictStr = "127.0.0.1:9090"
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=600)
    workers: int = Field(default=0, ge=0, le=256)

    _check_listen = field_validator("grpc_listen", "http_listen", "admin_listen")(_listen)


class _Cache(_Model):
    max_entries: int = Field(default=10000, ge=0, le=10_000_000)
    max_ttl_seconds: float = Field(default=300.0, ge=0, le=3600)


class _Tokens(_Model):
    algorithms: StrList = Field(default_factory=lambda: ["RS256"], min_length=1)
    clock_skew_seconds: int = Field(default=60, ge=0, le=300)
    max_token_bytes: int = Field(default=16384, ge=1024, le=262144)
    cache: _Cache = Field(default_factory=_Cache)
    # At most 0.15 s: well under Envoy's ext_authz timeout (200 ms default, 250 ms in envoy/).
    unknown_kid_wait_seconds: float = Field(default=0.1, ge=0, le=0.15)
    ca_bundle: StrictStr | None = None

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            with open(v, "rb") as f, warnings.catch_warnings():
                # real bundles (certifi's) hold old roots that cryptography warns about
                warnings.simplefilter("ignore")
                certs = x509.load_pem_x509_certificates(f.read())
        except OSError as e:
            raise ValueError(f"cannot read the CA bundle {v!r}: {e.strerror or e}") from None
        except ValueError:
            raise ValueError(f"{v!r} is not a PEM bundle of CA certificates") from None
        if not certs:
            raise ValueError(f"{v!r} holds no certificate")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in SUPPORTED_ALGORITHMS]
        if bad:
            raise ValueError(f"unsupported algorithm(s) {bad}; supported: {SUPPORTED_ALGORITHMS}")
        return v


class _Issuer(_Model):
    name: StrictStr
    instance: StrictStr = "https://login.microsoftonline.com"
    tenant: StrictStr
    versions: StrList = Field(default_factory=lambda: ["2.0"], min_length=1)
    allowed_tenants: StrList = Field(default_factory=list)
    refresh_interval_seconds: float = Field(default=3600.0, ge=1, le=86400)
    refresh_jitter_seconds: float = Field(default=300.0, ge=0, le=3600)
    # The floor keeps a flood of random kids from forcing a fetch per request.
    unknown_kid_min_interval_seconds: float = Field(default=300.0, ge=30, le=86400)
    fetch_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    metadata_query: StrictStr = ""
    max_key_age_seconds: float = Field(default=86400.0, ge=600, le=7 * 86400)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"expected a lower-case name like 'contoso', got {v!r}")
        return v

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str) -> str:
        v = v.rstrip("/")
        m = re.fullmatch(r"(https?)://([^/?#]+)(/[^?#]*)?", v)
        if not m:
            raise ValueError(f"expected an https URL like https://login.microsoftonline.com: {v!r}")
        # The host is what follows any 'user@': http://127.0.0.1:80@remote.example is remote.
        userinfo, at, hostport = m.group(2).rpartition("@")
        host = split_host_port(hostport)[0]
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if m.group(1) == "http" and host.lower() not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("plain http is only allowed for a local dev-idp (127.0.0.1)")
        if at:
            raise ValueError(f"must not carry user info ('{userinfo}@'): {v!r}")
        return v

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        v = v.lower()
        if v in MULTI_TENANT or v == CONSUMERS or GUID_RE.fullmatch(v) or DOMAIN_RE.fullmatch(v):
            return v
        raise ValueError(
            f"expected a tenant GUID, a domain, 'common', 'organizations' or 'consumers': {v!r}"
        )

    @field_validator("versions")
    @classmethod
    def _versions(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in ("1.0", "2.0")]
        if bad:
            raise ValueError(f"token versions must be '1.0' and/or '2.0', got {bad}")
        return v

    @field_validator("allowed_tenants")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not GUID_RE.fullmatch(x.lower())]
        if bad:
            raise ValueError(f"allowed tenants must be tenant id GUIDs, got {bad}")
        return [x.lower() for x in v]


class _Headers(_Model):
    user_id: StrictStr = "x-user-id"
    tenant_id: StrictStr = "x-tenant-id"
    client_id: StrictStr = "x-client-id"
    roles: StrictStr = "x-roles"
    scopes: StrictStr = "x-scopes"
    token_kind: StrictStr = "x-token-kind"
    actor_kind: StrictStr = "x-actor-kind"
    also_strip: StrList = Field(default_factory=list)


class _Audit(_Model):
    log_allows: bool = True
    allow_sample_rate: float = Field(default=1.0, ge=0, le=1)


class _RateLimit(_Model):
    name: StrictStr
    key: StrictStr | StrList
    limit: int = Field(ge=1, le=1_000_000_000)
    period: int | StrictStr
    mode: Literal["enforce", "dry-run"] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"expected a lower-case name like 'per-user', got {v!r}")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | list[str]) -> list[str]:
        parts = [v] if isinstance(v, str) else v
        bad = [p for p in parts if p not in LIMIT_KEYS]
        if not parts or bad:
            raise ValueError(
                f"expected one or a list of {sorted(LIMIT_KEYS)}, got {bad or 'nothing'}"
            )
        if len({LIMIT_KEYS[p] for p in parts}) != len(parts):
            raise ValueError(f"a key part is repeated: {parts}")
        return parts

    @field_validator("period")
    @classmethod
    def _period(cls, v: int | str) -> int:
        if isinstance(v, str):
            m = PERIOD_RE.fullmatch(v)
            if not m:
                raise ValueError(f"expected seconds or a duration like 30s, 1m, 1h, 1d: {v!r}")
            v = int(m.group(1)) * PERIOD_UNITS[m.group(2)]
        if not 1 <= v <= MAX_PERIOD_S:
            raise ValueError(f"a period is 1 second to 31 days, got {v} s")
        return v


class _Clause(_Model):
    token_kind: Literal["app", "user", "any"] = "any"
    # Left out: no agent passes (people and ordinary apps do); docs/token-kinds.md.
    actor: Literal["human", "agent", "any"] | None = None
    roles_any: StrList = Field(default_factory=list)
    roles_all: StrList = Field(default_factory=list)
    scopes_any: StrList = Field(default_factory=list)
    scopes_all: StrList = Field(default_factory=list)
    groups_any: StrList = Field(default_factory=list)
    tenants: StrList = Field(default_factory=list)
    clients: StrList = Field(default_factory=list)
    auth_context: StrictStr = ""

    @field_validator("auth_context")
    @classmethod
    def _acrs(cls, v: str) -> str:
        if v and not ACRS_RE.fullmatch(v):
            raise ValueError(f"expected an auth context id like 'c1', got {v!r}")
        return v

    @field_validator("tenants", "groups_any", "clients")
    @classmethod
    def _guids(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not GUID_RE.fullmatch(x.lower())]
        if bad:
            raise ValueError(f"expected object id GUIDs, got {bad}")
        return [x.lower() for x in v]


class _AnyOf(_Model):
    any_of: list[_Clause] = Field(min_length=1)


class _Route(_Model):
    name: StrictStr
    path: StrictStr | None = None
    path_prefix: StrictStr | None = None
    methods: StrList = Field(default_factory=list)
    hosts: StrList = Field(default_factory=list)
    mode: Literal["enforce", "dry-run"] | None = None
    require: Any = None
    rate_limits: list[_RateLimit] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # Route names become metric labels, log fields, dynamic metadata and (HTTP transport)
        # the x-authz-route header: printable, no spaces, no CR/LF.
        if not ROUTE_NAME_RE.fullmatch(v):
            raise ValueError(
                "expected 1-128 letters, digits, '_', '.', ':' or '-' starting with a letter or "
                f"digit, like 'read-orders', got {v!r}"
            )
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not METHOD_RE.fullmatch(m)]
        if bad:
            raise ValueError(f"methods are upper-case tokens like GET, got {bad}")
        return v


class _Match(_Model):
    hosts: StrList = Field(default_factory=list)
    path_prefixes: StrList = Field(default_factory=list)


class _Api(_Model):
    name: StrictStr
    audiences: StrList = Field(min_length=1)
    issuers: StrList = Field(min_length=1)
    match: _Match = Field(default_factory=_Match)
    mode: Literal["enforce", "dry-run"] = "enforce"
    require_scope_or_role: bool = True
    require_bound_tokens: Literal["off", "when_present", "always"] = "when_present"
    forward_authorization: bool = False
    strip_method_override: bool = True
    claim_headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    realm: StrictStr = ""
    resource_metadata: StrictStr = ""
    default: Any = "deny"
    rate_limits: list[_RateLimit] = Field(default_factory=list)
    routes: list[_Route] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"expected a lower-case name like 'orders', got {v!r}")
        return v

    @field_validator("require_bound_tokens", mode="before")
    @classmethod
    def _bound(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false: that is what the operator wrote.
        return "off" if v is False else v

    @field_validator("resource_metadata")
    @classmethod
    def _rm(cls, v: str) -> str:
        if v and not v.startswith("https://"):
            raise ValueError("resource_metadata must be an https URL (RFC 9728)")
        return v


class _Redis(_Model):
    url: StrictStr = ""
    username: StrictStr = ""
    password: StrictStr = ""
    password_file: StrictStr = ""
    tls_ca_file: StrictStr = ""
    key_prefix: StrictStr = "authz:"
    connect_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    timeout_seconds: float = Field(default=0.25, gt=0, le=30)
    sync_interval_seconds: float = Field(default=0.1, ge=0.01, le=10)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^rediss?://[^/?#\s]+(/[0-9]{1,2})?$", v):
            raise ValueError("expected redis://host:port[/db] or rediss://host:port[/db] (TLS)")
        if "@" in v:
            raise ValueError("put credentials in username/password(_file), not in the URL")
        return v

    @field_validator("password_file", "tls_ca_file")
    @classmethod
    def _file(cls, v: str) -> str:
        if v and not os.path.isfile(v):
            raise ValueError(f"no such file: {v!r}")
        return v


class _RevocationAdminApi(_Model):
    enabled: bool = False
    audiences: StrList = Field(default_factory=list)
    issuers: StrList = Field(default_factory=list)
    role: StrictStr = ""
    max_body_bytes: int = Field(default=65536, ge=1024, le=1_048_576)


class _Revocation(_Model):
    file: StrictStr = ""
    poll_interval_seconds: float = Field(default=1.0, ge=0.1, le=60)
    max_rule_lifetime_seconds: float = Field(
        default=float(DEFAULT_MAX_RULE_LIFETIME_S), ge=60, le=7 * 86400
    )
    admin_api: _RevocationAdminApi = Field(default_factory=_RevocationAdminApi)
    redis: bool = False
    redis_poll_interval_seconds: float = Field(default=0.2, ge=0.05, le=5)


class _Otlp(_Model):
    endpoint: StrictStr = ""
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/?#\s@]+(/[^?#\s]*)?$", v):
            raise ValueError(f"expected an http(s)://host:port URL without credentials: {short(v)}")
        return v


class _Tracing(_Model):
    enabled: bool = False
    service_name: StrictStr = Field(default="entra-authz", min_length=1, max_length=128)
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    otlp: _Otlp = Field(default_factory=_Otlp)

    @field_validator("enabled")
    @classmethod
    def _installed(cls, v: bool) -> bool:
        if v and importlib.util.find_spec("opentelemetry.sdk") is None:
            raise ValueError("needs the [otel] extra: pip install 'entra-authz[otel]'")
        return v


class _EnvoyCache(_Model):
    # At most 1 h: a reload that makes a route stricter reaches every cached allow within it.
    max_ttl_seconds: int = Field(default=0, ge=0, le=3600)


class _Root(_Model):
    server: _Server = Field(default_factory=_Server)
    tokens: _Tokens = Field(default_factory=_Tokens)
    issuers: list[_Issuer] = Field(min_length=1)
    headers: _Headers = Field(default_factory=_Headers)
    audit: _Audit = Field(default_factory=_Audit)
    authorization_uri: StrictStr = "https://login.microsoftonline.com/common/oauth2/authorize"
    redis: _Redis = Field(default_factory=_Redis)
    apis: list[_Api] = Field(min_length=1)
    revocation: _Revocation = Field(default_factory=_Revocation)
    tracing: _Tracing = Field(default_factory=_Tracing)
    envoy_cache: _EnvoyCache = Field(default_factory=_EnvoyCache)


# ---------------------------------------------------------------------------------- conversion


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


_TYPE_HINTS = {
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


_LISTS_OF_MAPPINGS = frozenset({"issuers", "apis", "routes", "any_of", "rate_limits"})


def _problems(err: ValidationError, prefix: Sequence[int | str] = ()) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc = [*prefix, *e["loc"]]
        # pydantic reports list-of-str failures at the item; name the list, as operators write it
        msg = _TYPE_HINTS.get(e["type"], e["msg"])
        if e["type"] == "string_type" and loc and isinstance(loc[-1], int):
            loc, msg = loc[:-1], "expected a list of strings"
        if e["type"] == "list_type" and loc and loc[-1] not in _LISTS_OF_MAPPINGS:
            msg = "expected a list of strings"
        value = e.get("input")
        shown = (
            ""
            if e["type"] in ("missing", "value_error") or isinstance(value, dict | list)
            else f" (got {short(value)})"
        )
        msg = msg.removeprefix("Value error, ")
        out.append(f"{_loc(loc)}: {msg}{shown}")
    return out


def _clause(model: _Clause) -> Clause:
    return Clause(
        token_kind=TokenKind(model.token_kind),
        actor=ActorRule.NOT_AGENT if model.actor is None else ActorRule(model.actor),
        roles_any=frozenset(model.roles_any),
        roles_all=frozenset(model.roles_all),
        scopes_any=frozenset(model.scopes_any),
        scopes_all=frozenset(model.scopes_all),
        groups_any=frozenset(model.groups_any),
        tenants=frozenset(model.tenants),
        clients=frozenset(model.clients),
        auth_context=model.auth_context,
    )


def _requirement(raw: Any, where: list[int | str], problems: list[str]) -> Requirement:
    if raw == "anonymous":
        return ANONYMOUS
    if raw == "authenticated":
        return AUTHENTICATED
    if isinstance(raw, dict):
        try:
            if "any_of" in raw:
                alts = _AnyOf.model_validate(raw)
                return Requirement(any_of=tuple(_clause(c) for c in alts.any_of))
            return Requirement(any_of=(_clause(_Clause.model_validate(raw)),))
        except ValidationError as e:
            problems.extend(_problems(e, where))
            return AUTHENTICATED
    problems.append(
        f"{_loc(where)}: expected 'anonymous', 'authenticated', a mapping of requirements "
        f"or {{any_of: [...]}} (got {short(raw)})"
    )
    return AUTHENTICATED


def _limits(models: Sequence[_RateLimit], where: str, problems: list[str]) -> tuple[LimitSpec, ...]:
    out = []
    seen: set[str] = set()
    for j, m in enumerate(models):
        if m.name in seen:
            problems.append(f"{where}[{j}].name: duplicate rate limit name {m.name!r}")
        seen.add(m.name)
        parts = [m.key] if isinstance(m.key, str) else m.key
        assert isinstance(m.period, int)  # converted by _RateLimit._period
        out.append(
            LimitSpec(
                name=m.name,
                key=tuple(LIMIT_KEYS[p] for p in parts),
                limit=m.limit,
                period_s=m.period,
                mode=Mode(m.mode) if m.mode else None,
            )
        )
    return tuple(out)


def _issuer(m: _Issuer, i: int, problems: list[str]) -> IssuerSpec:
    where = f"issuers[{i}]"
    multi = m.tenant in MULTI_TENANT
    if multi and not m.allowed_tenants:
        problems.append(
            f"{where}.allowed_tenants: required for a multi-tenant issuer ({m.tenant!r}); "
            "list the tenant ids you accept (there is no 'any tenant')"
        )
    if m.max_key_age_seconds <= m.refresh_interval_seconds + m.refresh_jitter_seconds:
        problems.append(
            f"{where}.max_key_age_seconds: must exceed refresh_interval_seconds + "
            "refresh_jitter_seconds (keys would expire between two healthy refreshes)"
        )
    if not multi and m.allowed_tenants:
        problems.append(
            f"{where}.allowed_tenants: only for common/organizations; a single-tenant issuer "
            f"accepts exactly its own tenant ({m.tenant!r})"
        )
    return IssuerSpec(
        name=m.name,
        instance=m.instance,
        tenant=m.tenant,
        versions=frozenset(m.versions),
        allowed_tenants=frozenset(m.allowed_tenants),
        refresh_interval_s=m.refresh_interval_seconds,
        refresh_jitter_s=m.refresh_jitter_seconds,
        unknown_kid_min_interval_s=m.unknown_kid_min_interval_seconds,
        fetch_timeout_s=m.fetch_timeout_seconds,
        metadata_query=m.metadata_query,
        max_key_age_s=m.max_key_age_seconds,
    )


ROLE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,119}")


def _revocation(
    m: _Revocation, issuer_names: set[str], source: str, problems: list[str]
) -> RevocationSettings:
    """The ``revocation:`` section; the admin API needs a file to write to, an app role and
    the API (audiences, issuers) whose tokens may carry it."""
    path = m.file
    if path and source and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(source)), path)
    a = m.admin_api
    where = "revocation.admin_api"
    if a.enabled:
        if not m.file and not m.redis:
            problems.append(
                f"{where}.enabled: needs revocation.file or revocation.redis (where added rules "
                "are kept)"
            )
        if not a.audiences:
            problems.append(f"{where}.audiences: required when enabled (the admin API's app id)")
        if not a.issuers:
            problems.append(f"{where}.issuers: required when enabled")
        if not ROLE_RE.fullmatch(a.role):
            problems.append(f"{where}.role: required when enabled: the app role, e.g. Authz.Revoke")
    for j, name in enumerate(a.issuers):
        if name not in issuer_names:
            problems.append(f"{where}.issuers[{j}]: no issuer named {name!r} is configured")
    return RevocationSettings(
        file=path,
        poll_interval_s=m.poll_interval_seconds,
        max_rule_lifetime_s=m.max_rule_lifetime_seconds,
        admin_api=AdminApiSettings(
            enabled=a.enabled,
            audiences=frozenset(a.audiences),
            issuers=tuple(a.issuers),
            role=a.role,
            max_body_bytes=a.max_body_bytes,
        ),
        redis=m.redis,
        redis_poll_interval_s=m.redis_poll_interval_seconds,
    )


def _header_name(value: str, where: str, problems: list[str], *, set_by_us: bool = True) -> str:
    """A configured header name, lower-cased. ``set_by_us``: a name we put a value in (contract
    and claim headers), which must also avoid every name Envoy or HTTP treats specially."""
    v = value.lower()
    if v.startswith(":"):
        problems.append(f"{where}: {v!r} is reserved (a pseudo-header)")
    elif not HEADER_RE.fullmatch(v):
        problems.append(f"{where}: not a valid header name ({value!r})")
    elif v in RESERVED_HEADERS:
        problems.append(f"{where}: {v!r} is reserved and cannot be used as an identity header")
    elif set_by_us and (v in SET_RESERVED_HEADERS or v.startswith(SET_RESERVED_PREFIXES)):
        problems.append(
            f"{where}: {v!r} is reserved (hop-by-hop, framing, forwarding, method-override, "
            "x-envoy-*, x-authz-* or proxy-* names cannot carry identity)"
        )
    return v


def _contract(m: _Headers, problems: list[str]) -> HeaderContract:
    names = {
        k: _header_name(getattr(m, k), f"headers.{k}", problems)
        for k in (
            "user_id",
            "tenant_id",
            "client_id",
            "roles",
            "scopes",
            "token_kind",
            "actor_kind",
        )
    }
    if len(set(names.values())) != len(names):
        problems.append("headers: the contract header names must be distinct")
    strip = tuple(
        _header_name(h, f"headers.also_strip[{i}]", problems, set_by_us=False)
        for i, h in enumerate(m.also_strip)
    )
    return HeaderContract(**names, also_strip=strip)


def _api(
    m: _Api, i: int, issuer_names: set[str], contract: HeaderContract, problems: list[str]
) -> ApiSpec:
    where: list[int | str] = ["apis", i]
    for j, name in enumerate(m.issuers):
        if name not in issuer_names:
            problems.append(f"apis[{i}].issuers[{j}]: no issuer named {name!r} is configured")
    claim_headers: list[tuple[str, str]] = []
    for header, claim in m.claim_headers.items():
        shown = header if header.isascii() and header.isprintable() else repr(header)
        hwhere = f"apis[{i}].claim_headers.{shown}"
        h = _header_name(header, hwhere, problems)
        if h in contract.standard:
            problems.append(f"{hwhere}: collides with the contract header")
        if any(h == seen_name for seen_name, _ in claim_headers):
            problems.append(f"{hwhere}: {h!r} is configured twice (names are case-insensitive)")
        claim_headers.append((h, claim))
    routes = []
    seen: set[str] = set()
    for j, r in enumerate(m.routes):
        rwhere = f"apis[{i}].routes[{j}]"
        if r.name in seen:
            problems.append(f"{rwhere}.name: duplicate route name {r.name!r}")
        seen.add(r.name)
        if (r.path is None) == (r.path_prefix is None):
            problems.append(f"{rwhere}: set exactly one of 'path' and 'path_prefix'")
            continue
        pattern = r.path if r.path is not None else r.path_prefix
        assert pattern is not None
        if not pattern.startswith("/"):
            problems.append(f"{rwhere}.{'path' if r.path else 'path_prefix'}: must start with '/'")
        kind: Literal["exact", "prefix", "template"]
        kind = "prefix" if r.path_prefix is not None else "template" if "{" in pattern else "exact"
        if r.require is None:
            problems.append(f"{rwhere}.require: required key is missing")
        req = _requirement(r.require, [*where, "routes", j, "require"], problems)
        routes.append(
            Route(
                name=r.name,
                path=pattern,
                path_kind=kind,
                require=req,
                methods=frozenset(r.methods),
                hosts=frozenset(h.lower() for h in r.hosts),
                mode=Mode(r.mode) if r.mode else None,
                rate_limits=_limits(r.rate_limits, f"{rwhere}.rate_limits", problems),
            )
        )
    default: Requirement | None = None
    if m.default != "deny":
        default = _requirement(m.default, [*where, "default"], problems)
    return ApiSpec(
        name=m.name,
        audiences=frozenset(m.audiences),
        issuers=tuple(m.issuers),
        routes=tuple(routes),
        match_hosts=frozenset(h.lower() for h in m.match.hosts),
        match_path_prefixes=tuple(m.match.path_prefixes),
        default=default,
        mode=Mode(m.mode),
        require_scope_or_role=m.require_scope_or_role,
        forward_authorization=m.forward_authorization,
        strip_method_override=m.strip_method_override,
        claim_headers=tuple(claim_headers),
        realm=m.realm,
        resource_metadata=m.resource_metadata,
        rate_limits=_limits(m.rate_limits, f"apis[{i}].rate_limits", problems),
        require_bound_tokens=BoundTokens(m.require_bound_tokens),
    )


def _compile_check(apis: Sequence[ApiSpec], problems: list[str], warnings: list[str]) -> None:
    """Compile every route table once, so a config that loads can always be served."""
    from authz.policy import routes as routes_mod  # noqa: PLC0415  (keeps import cycles out)

    for i, api in enumerate(apis):
        try:
            routes_mod.RouteTable.build(api)
        except ValueError as e:
            problems.append(f"apis[{i}].routes: {e}")
            continue
        warnings.extend(routes_mod.unreachable_routes(api))
        if not api.require_scope_or_role:
            warnings.extend(_acl_mode_warnings(i, api))


def _acl_mode_warnings(i: int, api: ApiSpec) -> list[str]:
    """ACL mode accepts app tokens without roles (any client in the allowed tenants can get one
    when the API does not require assignment): every requirement should then name its clients
    or demand roles or scopes."""
    wide = [(f"routes[{j}] ({route.name})", route.require) for j, route in enumerate(api.routes)]
    if api.default is not None:
        wide.append(("default", api.default))
    out = []
    for where, req in wide:
        if req.anonymous:
            continue
        if any(
            not (c.clients or c.roles_any or c.roles_all or c.scopes_any or c.scopes_all)
            for c in req.any_of
        ):
            out.append(
                f"apis[{i}].{where}: require_scope_or_role is false (ACL mode), and a clause "
                "names no clients, roles or scopes: an app-only token without roles from any "
                "client of an allowed tenant passes it"
            )
    return out


def from_mapping(
    data: Any,
    *,
    source: str = "",
    env: Mapping[str, str] | None = None,
    early: Sequence[str] = (),
) -> Settings:
    """Validate an already-parsed document. Raises ConfigError listing every problem found, with
    ``early`` ones (found while reading the YAML, e.g. duplicate keys) first."""
    if not isinstance(data, dict):
        raise ConfigError([*early, "(top level): expected a mapping of sections"], source)
    data = dict(data)
    env = os.environ if env is None else env
    problems: list[str] = list(early)
    server = data.get("server")
    server = {} if server is None else server
    if isinstance(server, dict):  # anything else: the schema names it (server: expected a mapping)
        server = dict(server)
        for var, key in ENV_OVERRIDES.items():
            if var not in env:
                continue
            if key != "workers":
                server[key] = env[var]
            elif ASCII_DIGITS_RE.fullmatch(env[var]):  # str.isdigit() is True for '²' and '٣'
                server[key] = int(env[var])
            else:
                problems.append(
                    f"{var} (environment): expected a number of workers (got {short(env[var])})"
                )
        if server:
            data["server"] = server
    try:
        root = _Root.model_validate(data)
    except ValidationError as e:
        raise ConfigError([*problems, *_problems(e)], source) from None
    warnings: list[str] = []
    issuers = tuple(_issuer(m, i, problems) for i, m in enumerate(root.issuers))
    names = [s.name for s in issuers]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"issuers: duplicate issuer name {dup!r}")
    contract = _contract(root.headers, problems)
    revocation = _revocation(root.revocation, set(names), source, problems)
    if root.revocation.redis and not root.redis.url:
        problems.append("revocation.redis: needs redis.url (the Redis the rules are shared in)")
    apis = tuple(_api(m, i, set(names), contract, problems) for i, m in enumerate(root.apis))
    api_names = [a.name for a in apis]
    for dup in sorted({n for n in api_names if api_names.count(n) > 1}):
        problems.append(f"apis: duplicate API name {dup!r}")
    if not problems:
        _compile_check(apis, problems, warnings)
    if not root.server.grpc_listen and not root.server.http_listen:
        problems.append("server: enable at least one of grpc_listen and http_listen")
    r = root.redis
    if r.password and r.password_file:
        problems.append("redis: set at most one of 'password' and 'password_file'")
    if r.tls_ca_file and not r.url.startswith("rediss://"):
        problems.append("redis.tls_ca_file: only for a rediss:// (TLS) url")
    if problems:
        raise ConfigError(problems, source)
    s = root.server
    return Settings(
        server=ServerSettings(
            grpc_listen=s.grpc_listen,
            http_listen=s.http_listen,
            admin_listen=s.admin_listen,
            shutdown_grace_s=s.shutdown_grace_seconds,
            workers=s.workers,
        ),
        tokens=TokenSettings(
            algorithms=frozenset(root.tokens.algorithms),
            clock_skew_s=root.tokens.clock_skew_seconds,
            max_token_bytes=root.tokens.max_token_bytes,
            cache_max_entries=root.tokens.cache.max_entries,
            cache_max_ttl_s=root.tokens.cache.max_ttl_seconds,
            unknown_kid_wait_s=root.tokens.unknown_kid_wait_seconds,
            ca_bundle=root.tokens.ca_bundle,
        ),
        issuers=issuers,
        apis=apis,
        headers=contract,
        audit=AuditSettings(root.audit.log_allows, root.audit.allow_sample_rate),
        authorization_uri=root.authorization_uri,
        warnings=tuple(warnings),
        redis=RedisSettings(
            url=r.url,
            username=r.username,
            password=r.password,
            password_file=r.password_file,
            tls_ca_file=r.tls_ca_file,
            key_prefix=r.key_prefix,
            connect_timeout_s=r.connect_timeout_seconds,
            timeout_s=r.timeout_seconds,
            sync_interval_s=r.sync_interval_seconds,
        ),
        revocation=revocation,
        tracing=_tracing(root.tracing),
        envoy_cache=EnvoyCacheSettings(max_ttl_s=root.envoy_cache.max_ttl_seconds),
    )


def _tracing(m: _Tracing) -> TracingSettings:
    return TracingSettings(
        enabled=m.enabled,
        service_name=m.service_name,
        sample_ratio=m.sample_ratio,
        otlp_endpoint=m.otlp.endpoint,
        otlp_protocol=m.otlp.protocol,
        otlp_timeout_s=m.otlp.timeout_seconds,
    )


class _Loader(yaml.SafeLoader):
    """SafeLoader with a nesting limit while composing (the composer recurses per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _TooLarge(Exception):
    pass


def _check_nodes(root: yaml.Node) -> list[str]:
    """Walk the composed graph once (shared alias targets once, memoised): refuse a document that
    expands beyond MAX_NODES nodes or MAX_DEPTH levels or that refers to itself; return every key
    set twice in one mapping, by key path and line."""
    duplicates: list[str] = []
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    active: set[int] = set()

    def walk(node: yaml.Node, path: list[int | str], depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise _TooLarge(f"line {node.start_mark.line + 1}: an alias refers to itself")
        if key in memo:
            size, height = memo[key]
        else:
            active.add(key)
            size, height = 1, 0
            children: list[tuple[int | str, yaml.Node]] = []
            if isinstance(node, yaml.MappingNode):
                seen: dict[tuple[str, str], int] = {}
                for k, v in node.value:
                    name: int | str = "<<" if k.tag == _MERGE_TAG else short(k.value)
                    if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                        name = k.value if isinstance(k.value, str) else short(k.value)
                        ident = (k.tag, k.value)
                        if ident in seen:
                            duplicates.append(
                                f"{_loc([*path, name])}: duplicate key {short(k.value)} on line "
                                f"{k.start_mark.line + 1} (first set on line {seen[ident]})"
                            )
                        else:
                            seen[ident] = k.start_mark.line + 1
                    children += [(name, k), (name, v)]
            elif isinstance(node, yaml.SequenceNode):
                children = list(enumerate(node.value))
            for name, child in children:
                if depth + 1 > MAX_DEPTH:
                    raise _TooLarge(
                        f"line {child.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels "
                        "(counting what aliases expand to)"
                    )
                s, h = walk(child, [*path, name], depth + 1)
                size, height = size + s, max(height, h + 1)
                if size > MAX_NODES:
                    raise _TooLarge(
                        f"line {node.start_mark.line + 1}: the document expands to more than "
                        f"{MAX_NODES} nodes (aliases of aliases?); refusing to build it"
                    )
            active.discard(key)
            memo[key] = (size, height)
        if depth + height > MAX_DEPTH:
            raise _TooLarge(
                f"line {node.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels "
                "(counting what aliases expand to)"
            )
        return size, height

    walk(root, [], 0)
    return duplicates


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``line L, column C: problem`` at the mark where the parser gave up (``problem_mark``),
    with the construct it was reading (``context``, ``context_mark``) when that is elsewhere."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or "not valid YAML"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and (mark is None or cmark.line != mark.line):
        problem += f" ({context} on line {cmark.line + 1})"
    return f"{where}{problem}"


def read_yaml(text: str, source: str = "") -> tuple[Any, list[str]]:
    """The document and the problems found while reading it (duplicate keys); raises
    ConfigError when it cannot be read at all (syntax, nesting, size)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        duplicates = _check_nodes(node)
        return loader.construct_document(node), duplicates
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(e)], source) from None
    except _TooLarge as e:
        raise ConfigError([str(e)], source) from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps the composer far from the limit
        raise ConfigError([f"nested deeper than {MAX_DEPTH} levels"], source) from None
    finally:
        loader.dispose()


def parse(text: str, *, source: str = "", env: Mapping[str, str] | None = None) -> Settings:
    data, early = read_yaml(text, source)
    return from_mapping(data, source=source, env=env, early=early)


def load(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read the file: {e}"], str(p)) from None
    return parse(text, source=str(p), env=env)
