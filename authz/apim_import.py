"""``authz import-apim POLICY.xml``: an Azure API Management policy -> this product's YAML config.

Translates, from the policy's ``<inbound>`` section, one ``validate-jwt`` or
``validate-azure-ad-token`` (issuer, audiences, issuers, required claims, client application ids,
clock skew) and every ``rate-limit-by-key`` / ``quota-by-key`` whose counter key names something
our rate limits can key on (``ip``, ``oid``, ``azp``, ``tid``, ``sub``). The result is printed
only after ``authz.config`` loaded it; what was not translated is listed on stderr (docs/apim-
import.md lists the mapping).

Outcomes (``ImportResult``/``ImportRefused``):
- translated: the YAML, and notes for everything left out that cannot make the result admit a
  token APIM would reject (error messages, output variables, custom headers, policies other than
  the ones above, a rate limit keyed on a subscription, ...);
- refused (exit 2, nothing printed): anything that would make the translation *looser* than the
  policy or that is unsafe on its own: a multi-tenant issuer (``common``/``organizations``)
  without an allowlist of tenants, no audience to check, a required claim or a match mode our
  rules cannot express, a policy expression where a restriction's value should be, a token
  validation under a condition, several token validations, static signing keys, a non-Entra
  openid-config URL.

The policy file is operator input but is parsed as untrusted XML: ``defusedxml`` forbids DTDs,
entity declarations and external references (a billion-laughs file is refused, not expanded).

Size: one translation table per APIM element (validation, claims, issuers, limits) and the
refusal rules beside the element they guard; splitting them would scatter the safety argument.

Must not import grpc, prometheus, asyncio or network libraries; it reads one file and prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
import yaml
from defusedxml import DefusedXmlException

from authz import config as config_mod

__all__ = ["ImportRefused", "ImportResult", "main", "register", "translate"]

APIM_DEFAULT_CLOCK_SKEW_S = 0  # APIM's default for validate-jwt's clock-skew
MAX_POLICY_BYTES = 1_048_576
GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
MULTI_TENANT = frozenset({"common", "organizations"})
# https://{host}/{tenant}[/v2.0]/.well-known/openid-configuration[?query]
_OPENID_RE = re.compile(
    r"^(?P<instance>https?://[^/?#@\s]+)/(?P<tenant>[^/?#\s]+)(?P<v2>/v2\.0)?"
    r"/\.well-known/openid-configuration(?:\?(?P<query>[^#\s]*))?$",
    re.IGNORECASE,
)
_V2_ISSUER_RE = re.compile(r"^https?://[^/?#@\s]+/(?P<tenant>[^/?#\s]+)/v2\.0/?$")
_V1_ISSUER_RE = re.compile(r"^https://sts\.(?:windows\.net|chinacloudapi\.cn)/(?P<tenant>[^/]+)/$")
_IP_KEY = re.compile(r"^@\(\s*context\.Request\.IpAddress\s*\)$")
_JWT = r'context\.Request\.Headers\.GetValueOrDefault\(\s*"Authorization"\s*(?:,\s*"[^"]*"\s*)?\)'
_JWT_SUBJECT = re.compile(r"^@\(\s*" + _JWT + r"\s*\.AsJwt\(\)\s*\??\.Subject\s*\)$")
_JWT_CLAIM = re.compile(
    r"^@\(\s*" + _JWT + r"\s*\.AsJwt\(\)\s*\??\.Claims"
    r'(?:\.GetValueOrDefault\(\s*"(?P<a>[a-z]+)"\s*(?:,\s*"[^"]*"\s*)?\)|\[\s*"(?P<b>[a-z]+)"\s*\])'
    r"(?:\s*\??\.FirstOrDefault\(\))?\s*\)$"
)
# Token claim -> rate-limit key (docs/rate-limiting.md).
_CLAIM_KEYS = {"oid": "oid", "azp": "azp", "appid": "azp", "tid": "tid", "sub": "sub"}
_VALIDATORS = ("validate-jwt", "validate-azure-ad-token")
_LIMITS = ("rate-limit-by-key", "quota-by-key")
_QUIET = frozenset({"base"})  # expected, and says nothing we could translate


class ImportRefused(Exception):
    """The policy cannot be translated safely; ``problems`` say why (each one line)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class ImportResult:
    yaml_text: str
    notes: tuple[str, ...]


@dataclass
class _Work:
    api: str
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def refuse(self, text: str) -> None:
        self.refusals.append(text)


def _expr(value: str | None) -> bool:
    return value is not None and value.strip().startswith("@")


def _tag(el: Element) -> str:
    tag = el.tag if isinstance(el.tag, str) else ""
    return tag.rsplit("}", 1)[-1]


def _texts(el: Element | None, child: str, where: str, w: _Work) -> list[str]:
    """The text of each ``child`` of ``el``; a policy expression there is refused (a restriction
    whose value we cannot know)."""
    if el is None:
        return []
    out = []
    for item in el:
        if _tag(item) != child:
            w.note(f"{where}: <{_tag(item)}> not translated")
            continue
        text = (item.text or "").strip()
        if _expr(text):
            w.refuse(f"{where}: a policy expression ({_short(text)}) cannot be translated")
        elif text:
            out.append(text)
    return out


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------- identity


@dataclass
class _Issuer:
    instance: str
    tenant: str
    versions: set[str]
    metadata_query: str = ""
    allowed_tenants: set[str] = field(default_factory=set)


def _issuer_from_openid(url: str, w: _Work) -> _Issuer | None:
    if _expr(url):
        w.refuse(f"openid-config url: a policy expression ({_short(url)}) cannot be translated")
        return None
    m = _OPENID_RE.fullmatch(url.strip())
    if not m:
        w.refuse(
            f"openid-config url {_short(url)!r} is not an Entra ID tenant's metadata URL "
            "(https://login.microsoftonline.com/<tenant>[/v2.0]/.well-known/openid-configuration)"
        )
        return None
    query = m.group("query") or ""
    return _Issuer(
        instance=m.group("instance").lower(),
        tenant=m.group("tenant").lower(),
        versions={"2.0" if m.group("v2") else "1.0"},
        metadata_query=query,
    )


def _issuer_from_tenant(el: Element, w: _Work) -> _Issuer | None:
    tenant = (el.get("tenant-id") or "").strip()
    if not tenant or _expr(tenant):
        w.refuse(
            "validate-azure-ad-token: tenant-id must be a tenant id or domain, not empty "
            "nor a policy expression"
        )
        return None
    # "https://contoso.onmicrosoft.com" is accepted by APIM as the tenant's URL.
    tenant = re.sub(r"^https?://", "", tenant).strip("/").lower()
    endpoint = (el.get("authentication-endpoint") or "https://login.microsoftonline.com").strip()
    if _expr(endpoint) or not re.match(r"^https?://[^/?#@\s]+/?$", endpoint):
        w.refuse(
            f"validate-azure-ad-token: authentication-endpoint {_short(endpoint)!r} is not "
            "an https://host URL"
        )
        return None
    # APIM's validate-azure-ad-token accepts v1 and v2 tokens of the tenant.
    return _Issuer(instance=endpoint.rstrip("/").lower(), tenant=tenant, versions={"1.0", "2.0"})


def _apply_issuers(issuer: _Issuer, values: list[str], w: _Work) -> None:
    """``<issuers>``: APIM compares ``iss`` with this list. Each one must be the tenant's own
    (v1 or v2 form; that picks the versions) or, for a multi-tenant issuer, names an allowed
    tenant."""
    versions: set[str] = set()
    for value in values:
        m2, m1 = _V2_ISSUER_RE.fullmatch(value), _V1_ISSUER_RE.fullmatch(value)
        m = m2 or m1
        if m is None:
            w.refuse(f"issuers: {_short(value)!r} is not an Entra ID issuer")
            continue
        tenant = m.group("tenant").lower()
        if m2 and not value.lower().startswith(issuer.instance + "/"):
            w.refuse(f"issuers: {value!r} is not on the openid-config's host {issuer.instance}")
            continue
        versions.add("2.0" if m2 else "1.0")
        if issuer.tenant in MULTI_TENANT:
            if tenant in ("{tenantid}", "{tenant}"):
                continue  # a template: every tenant, which is what an allowlist must prevent
            if GUID_RE.fullmatch(tenant):
                issuer.allowed_tenants.add(tenant)
            else:
                w.refuse(f"issuers: {value!r}: an allowed tenant must be a tenant id GUID")
        elif tenant != issuer.tenant:
            w.refuse(f"issuers: {value!r} is not the issuer of tenant {issuer.tenant!r}")
    if versions:
        issuer.versions = versions


# ------------------------------------------------------------------------------------ claims

# Claim -> (clause key for match="any", clause key for match="all" or None when only one value
# can be required).
_CLAIMS: dict[str, tuple[str, str | None]] = {
    "roles": ("roles_any", "roles_all"),
    "scp": ("scopes_any", "scopes_all"),
    "groups": ("groups_any", None),
    "tid": ("tenants", None),
    "azp": ("clients", None),
    "appid": ("clients", None),
}


def _claims(el: Element | None, clause: dict[str, Any], w: _Work) -> None:
    if el is None:
        return
    for claim in el:
        if _tag(claim) != "claim":
            w.note(f"required-claims: <{_tag(claim)}> not translated")
            continue
        name = (claim.get("name") or "").strip()
        match = (claim.get("match") or "all").strip().lower()  # APIM's default is all
        separator = claim.get("separator")
        values = _texts(claim, "value", f"required-claims claim {name!r}", w)
        where = f"required-claims claim {name!r}"
        if match not in ("all", "any"):
            w.refuse(f"{where}: match={match!r} (APIM knows all and any)")
            continue
        if not values:
            # APIM: a claim with no values only has to be present.
            w.refuse(f"{where}: 'present with any value' cannot be expressed here")
            continue
        if separator is not None and separator != " " and name in ("scp", "roles"):
            w.note(
                f"{where}: separator {separator!r} ignored ('scp' is space-separated, "
                "'roles' a list, in Entra tokens)"
            )
        if separator is None and name == "scp":
            w.note(
                f"{where}: scopes are matched one by one (APIM without separator=' ' "
                "compares the whole 'scp' string)"
            )
        if name == "idtyp" and len(values) == 1 and values[0] in ("app", "user"):
            clause["token_kind"] = values[0]
            continue
        if name == "acrs":
            if len(values) != 1:
                w.refuse(f"{where}: only one auth context can be required")
            else:
                clause["auth_context"] = values[0]
            continue
        if name not in _CLAIMS:
            w.refuse(
                f"{where}: our rules cannot require the claim {name!r} (the translation would "
                "admit tokens APIM rejects); enforce it in the backend and remove it from the "
                "file to translate the rest"
            )
            continue
        any_key, all_key = _CLAIMS[name]
        if match == "all" and len(values) > 1:
            if all_key is None:
                w.refuse(f"{where}: match=all of several values cannot be expressed for {name!r}")
                continue
            key = all_key
        else:
            key = any_key
        if key in clause:
            w.refuse(f"{where}: a second requirement on {name!r} cannot be combined")
            continue
        clause[key] = values


# --------------------------------------------------------------------------- token validation


def _token_source(el: Element, w: _Work) -> None:
    header = el.get("header-name")
    if header is not None and header.strip().lower() != "authorization":
        w.note(
            f"header-name={header!r} not translated: tokens are read from Authorization only "
            "(requests carrying it elsewhere are denied missing_token)"
        )
    if el.get("query-parameter-name") is not None:
        w.note(
            "query-parameter-name not translated: tokens in the URL are never accepted "
            "(denied missing_token)"
        )
    if el.get("token-value") is not None:
        w.note("token-value not translated: tokens are read from Authorization only")
    scheme = el.get("require-scheme")
    if scheme is not None and scheme.strip().lower() != "bearer":
        w.note(f"require-scheme={scheme!r} not translated: the scheme is always Bearer")


def _validation(
    el: Element, w: _Work, allow_tenants: set[str]
) -> tuple[_Issuer | None, list[str], dict[str, Any], int]:
    kind = _tag(el)
    _token_source(el, w)
    code = el.get("failed-validation-httpcode")
    if code is not None and code.strip() != "401":
        w.note(
            f"failed-validation-httpcode={code!r} not translated: an invalid token is 401, "
            "a missing claim 403 (RFC 6750)"
        )
    for attr in ("failed-validation-error-message", "output-token-variable-name"):
        if el.get(attr) is not None:
            w.note(f"{kind}: {attr} not translated")
    if (el.get("require-expiration-time") or "true").strip().lower() == "false":
        w.note("require-expiration-time=false not translated: exp is always required")
    if (el.get("require-signed-tokens") or "true").strip().lower() == "false":
        w.note("require-signed-tokens=false not translated: tokens are always signature-checked")
    skew_text = (el.get("clock-skew") or str(APIM_DEFAULT_CLOCK_SKEW_S)).strip()
    skew = APIM_DEFAULT_CLOCK_SKEW_S
    if not skew_text.isdigit() or int(skew_text) > 300:
        w.refuse(f"clock-skew={skew_text!r}: expected 0-300 seconds")
    else:
        skew = int(skew_text)

    children = {_tag(c): c for c in el}
    known = {
        "openid-config",
        "audiences",
        "issuers",
        "required-claims",
        "issuer-signing-keys",
        "decryption-keys",
        "client-application-ids",
        "backend-application-ids",
    }
    for name in children:
        if name not in known:
            w.note(f"{kind}: <{name}> not translated")
    issuer: _Issuer | None = None
    if kind == "validate-jwt":
        configs = [c for c in el if _tag(c) == "openid-config"]
        if "issuer-signing-keys" in children:
            w.refuse(
                "issuer-signing-keys: static keys are not supported (keys come from the "
                "tenant's OIDC metadata): use <openid-config>"
            )
        if len(configs) != 1:
            w.refuse(f"validate-jwt: expected one <openid-config>, found {len(configs)}")
        else:
            issuer = _issuer_from_openid(configs[0].get("url") or "", w)
    else:
        issuer = _issuer_from_tenant(el, w)
    if "decryption-keys" in children:
        w.note("decryption-keys not translated: encrypted tokens are denied")
    audiences = _texts(children.get("audiences"), "audience", "audiences", w)
    audiences += _texts(
        children.get("backend-application-ids"), "application-id", "backend-application-ids", w
    )
    if not audiences:
        w.refuse(
            f"{kind}: no <audiences> (or backend-application-ids): every token of the "
            "issuer would be accepted, whichever API it was issued for"
        )
    if issuer is not None:
        _apply_issuers(issuer, _texts(children.get("issuers"), "issuer", "issuers", w), w)
    clause: dict[str, Any] = {}
    _claims(children.get("required-claims"), clause, w)
    clients = _texts(
        children.get("client-application-ids"), "application-id", "client-application-ids", w
    )
    if clients:
        if "clients" in clause:
            w.refuse("client-application-ids and a required azp/appid claim cannot be combined")
        clause["clients"] = clients
    for key in ("clients", "tenants", "groups_any"):
        bad = [v for v in clause.get(key, []) if not GUID_RE.fullmatch(v)]
        if bad:
            w.refuse(f"{key}: expected GUIDs, got {bad}")
    if issuer is not None and issuer.tenant in MULTI_TENANT:
        issuer.allowed_tenants |= set(clause.pop("tenants", [])) | allow_tenants
        if not issuer.allowed_tenants:
            w.refuse(
                f"tenant {issuer.tenant!r} admits tokens of every Entra tenant: list the allowed "
                "tenants (<issuers> with tenant ids, a required 'tid' claim, or --allow-tenant)"
            )
    return issuer, audiences, clause, skew


# ------------------------------------------------------------------------------- rate limits


def _limit_key(counter: str) -> str | None:
    counter = " ".join(counter.split())
    if _IP_KEY.match(counter):
        return "ip"
    if _JWT_SUBJECT.match(counter):
        return "sub"
    m = _JWT_CLAIM.match(counter)
    if m:
        return _CLAIM_KEYS.get(m.group("a") or m.group("b") or "")
    return None


def _limit(el: Element, index: int, w: _Work) -> dict[str, Any] | None:
    kind = _tag(el)
    where = f"{kind} #{index}"
    for attr in (
        "increment-condition",
        "increment-count",
        "bandwidth",
        "first-period-start",
        "retry-after-header-name",
        "retry-after-variable-name",
        "remaining-calls-header-name",
        "remaining-calls-variable-name",
        "total-calls-header-name",
    ):
        if el.get(attr) is not None:
            w.note(f"{where}: {attr} not translated")
    calls, period = (el.get("calls") or "").strip(), (el.get("renewal-period") or "").strip()
    counter = el.get("counter-key") or ""
    if not calls.isdigit() or int(calls) < 1:
        w.note(f"{where}: calls={calls!r} is not a fixed number of calls: not translated")
        return None
    if not period.isdigit() or not 1 <= int(period) <= config_mod.MAX_PERIOD_S:
        w.note(f"{where}: renewal-period={period!r} is not 1 s to 31 days: not translated")
        return None
    key = _limit_key(counter)
    if key is None:
        w.note(
            f"{where}: counter-key {_short(counter)!r} names nothing a limit can key on here "
            "(ip, or the token's oid, azp/appid, tid, sub): not translated"
        )
        return None
    if kind == "quota-by-key":
        w.note(
            f"{where}: counted in a sliding period here, not APIM's fixed window; over quota "
            "is 429 rate_limited here, 403 in APIM"
        )
    prefix = "apim-quota" if kind == "quota-by-key" else "apim-rate"
    return {"name": f"{prefix}-{index}", "key": key, "limit": int(calls), "period": int(period)}


# -------------------------------------------------------------------------------- the policy


def _walk_nested(el: Element, w: _Work, path: str) -> None:
    """Token validations or limits under a condition cannot be translated as unconditional."""
    for child in el:
        name = _tag(child)
        if name in _VALIDATORS:
            w.refuse(
                f"{path}/<{name}>: a token validation under a condition cannot be "
                "translated (it would apply always, or never)"
            )
        elif name in _LIMITS:
            w.note(f"{path}/<{name}>: a limit under a condition not translated")
        _walk_nested(child, w, f"{path}/<{name}>")


def _inbound(root: Element, w: _Work) -> Element | None:
    if _tag(root) != "policies":
        w.refuse(f"expected a <policies> document, found <{_tag(root)}>")
        return None
    inbound = [c for c in root if _tag(c) == "inbound"]
    for section in root:
        if _tag(section) not in ("inbound", "backend", "outbound", "on-error"):
            w.note(f"<{_tag(section)}> not translated")
        elif _tag(section) != "inbound" and any(
            _tag(c) in _VALIDATORS or _tag(c) in _LIMITS for c in section.iter()
        ):
            w.note(f"<{_tag(section)}>: token validation and limits are only read from <inbound>")
    if len(inbound) != 1:
        w.refuse(f"expected one <inbound> section, found {len(inbound)}")
        return None
    return inbound[0]


def translate(
    text: str | bytes,
    *,
    api: str = "imported",
    path_prefix: str = "/",
    allow_tenants: Iterable[str] = (),
    source: str = "",
) -> ImportResult:
    """The config for the policy ``text``, validated by ``authz.config``; raises
    ``ImportRefused`` when it cannot be translated safely."""
    w = _Work(api=api)
    if not config_mod.NAME_RE.fullmatch(api):
        raise ImportRefused([f"--api {api!r}: expected a lower-case name like 'orders'"])
    try:
        root = SafeET.fromstring(text)
    except DefusedXmlException as e:
        raise ImportRefused(
            [
                f"unsafe XML refused ({type(e).__name__}): DTDs and entities are "
                "not allowed in a policy file"
            ]
        ) from None
    except SafeET.ParseError as e:
        raise ImportRefused([f"not well-formed XML: {e}"]) from None
    inbound = _inbound(root, w)
    validations: list[Element] = []
    limits: list[dict[str, Any]] = []
    if inbound is not None:
        for child in inbound:
            name = _tag(child)
            if name in _VALIDATORS:
                validations.append(child)
            elif name in _LIMITS:
                limit = _limit(child, len(limits) + 1, w)
                if limit is not None:
                    limits.append(limit)
            elif name in ("rate-limit", "quota"):
                w.note(f"<{name}> (per subscription) not translated: there are no subscriptions")
            elif name == "base":
                w.note(
                    "<base/>: the policies of the enclosing scopes (product, all APIs) are not "
                    "in this file and were not translated"
                )
            elif name not in _QUIET:
                w.note(f"<inbound>/<{name}> not translated")
                _walk_nested(child, w, f"<inbound>/<{name}>")
    if inbound is not None and len(validations) != 1:
        w.refuse(
            "expected one validate-jwt or validate-azure-ad-token in <inbound>, found "
            f"{len(validations)}"
            + ("" if validations else ": without one the API would have no token check")
        )
    doc: dict[str, Any] = {}
    if len(validations) == 1:
        tenants = {t.lower() for t in allow_tenants}
        bad = sorted(t for t in tenants if not GUID_RE.fullmatch(t))
        if bad:
            w.refuse(f"--allow-tenant: expected tenant id GUIDs, got {bad}")
        issuer, audiences, clause, skew = _validation(validations[0], w, tenants)
        if issuer is not None:
            if tenants and issuer.tenant not in MULTI_TENANT:
                w.note("--allow-tenant ignored: the issuer is a single tenant")
            spec: dict[str, Any] = {
                "name": "entra",
                "instance": issuer.instance,
                "tenant": issuer.tenant,
                "versions": sorted(issuer.versions),
            }
            if issuer.allowed_tenants:
                spec["allowed_tenants"] = sorted(issuer.allowed_tenants)
            if issuer.metadata_query:
                spec["metadata_query"] = issuer.metadata_query
            api_doc: dict[str, Any] = {
                "name": api,
                "audiences": list(dict.fromkeys(audiences)),
                "issuers": ["entra"],
                "match": {"path_prefixes": [path_prefix]},
                "default": clause or "authenticated",
            }
            if limits:
                api_doc["rate_limits"] = limits
            doc = {
                "tokens": {"clock_skew_seconds": skew},
                "issuers": [spec],
                "apis": [api_doc],
            }
            w.note(
                "require_scope_or_role is on (the default): tokens with neither 'scp' nor "
                "'roles' are denied, which APIM did not check"
            )
    if w.refusals:
        raise ImportRefused(w.refusals)
    header = (
        f"# Translated by `authz import-apim` from {source or 'an APIM policy'}: review it\n"
        "# (docs/apim-import.md). Not translated: see the notes printed with it.\n"
    )
    yaml_text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    try:
        config_mod.parse(yaml_text, source=source or "<import>", env={})
    except config_mod.ConfigError as e:
        raise ImportRefused([f"the translation does not load: {p}" for p in e.problems]) from None
    return ImportResult(yaml_text, tuple(w.notes))


# ------------------------------------------------------------------------------------- CLI


def register(sub: Any, help_text: str) -> None:
    """Add ``import-apim`` to the ``authz`` command's subparsers."""
    p = sub.add_parser("import-apim", help=help_text)
    p.add_argument("policy", help="the policy XML file (API scope)")
    p.add_argument("--api", default="imported", help="the API's name (default: imported)")
    p.add_argument("--path-prefix", default="/", help="the API's base path (default: /)")
    p.add_argument(
        "--allow-tenant",
        action="append",
        default=[],
        metavar="GUID",
        help="an allowed tenant of a multi-tenant (common/organizations) issuer; repeatable",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the config (exit 0) and the notes on stderr; or the refusal and exit 2."""
    path = Path(args.policy)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        print(f"authz import-apim: cannot read {args.policy}: {e.strerror or e}", file=sys.stderr)
        return 2
    if len(data) > MAX_POLICY_BYTES:
        print(f"authz import-apim: {args.policy} is over {MAX_POLICY_BYTES} bytes", file=sys.stderr)
        return 2
    try:
        result = translate(
            data,
            api=args.api,
            path_prefix=args.path_prefix,
            allow_tenants=args.allow_tenant,
            source=str(path.name),
        )
    except ImportRefused as e:
        print(f"authz import-apim: refused to translate {args.policy}:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(result.yaml_text)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
