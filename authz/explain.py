"""``authz explain``: the answer to "why was this denied?".

Runs one request through the same phases as the server — path, API, route, token, requirements —
and prints every check with PASS/FAIL. The verdict is the real engine's (the same ``Engine``
the server runs, with the cache off); the per-claim lines before it show what the verifier
compared, read from the token's claims (display only: the signature is never printed, nor the
token). Keys come from live discovery (the configured issuers, over HTTP) or from a JWKS file;
revocation rules from the configured ``revocation.file`` (read once).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from authz.config import Settings
from authz.engine import Engine
from authz.identity.bearer import extract_bearer
from authz.identity.entra import KeySnapshot, KeySource, TokenVerifier, tenant_allowed
from authz.identity.fetch import key_fetch_client
from authz.identity.keys import KeyFetchError, KeyStore, parse_jwks
from authz.policy.authorize import ACTORS_ADMITTED
from authz.policy.binding import check_binding
from authz.policy.errors import Denial
from authz.policy.model import (
    ActorRule,
    ApiSpec,
    Clause,
    IssuerSpec,
    Principal,
    RequestAttrs,
    Requirement,
    TokenKind,
)
from authz.policy.paths import canonicalize
from authz.policy.revocation import EMPTY, RevocationSet, format_time
from authz.policy.routes import ApiSelector, RouteTable

Out = Callable[[str], None]


class StaticKeys:
    """A KeySource over a JWKS file, for offline explanations."""

    def __init__(self, snapshots: Mapping[str, KeySnapshot]) -> None:
        self._snapshots = dict(snapshots)

    def snapshot(self, issuer: str) -> KeySnapshot | None:
        return self._snapshots.get(issuer)


def entra_issuers(spec: IssuerSpec) -> dict[str, str]:
    """The issuer strings Entra uses for a tenant, for when no discovery document is at hand."""
    tenant = "{tenantid}" if spec.multi_tenant else spec.tenant
    out = {"2.0": f"{spec.instance}/{tenant}/v2.0"}
    if spec.instance.endswith("microsoftonline.com") or spec.instance.endswith(
        "microsoftonline.us"
    ):
        out["1.0"] = f"https://sts.windows.net/{tenant}/"
    else:
        out["1.0"] = f"{spec.instance}/sts/{tenant}/"
    return {v: out[v] for v in spec.versions}


def static_keys(settings: Settings, jwks_path: str) -> StaticKeys:
    with open(jwks_path, "rb") as f:
        raw = f.read()
    keys = parse_jwks(raw, "2.0")
    snaps = {}
    for spec in settings.issuers:
        tid = None if spec.multi_tenant else spec.tenant
        snaps[spec.name] = KeySnapshot(spec.name, tid, entra_issuers(spec), keys, time.time())
    return StaticKeys(snaps)


async def live_keys(settings: Settings) -> KeyStore:
    client = key_fetch_client(settings.tokens.ca_bundle)
    store = KeyStore(settings.issuers, client)
    try:
        await store.start()
    finally:
        await client.aclose()
    return store


def _segment(token: str, i: int) -> dict[str, Any]:
    try:
        seg = token.split(".")[i]
        data = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _when(ts: Any, now: float) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return repr(ts)
    delta = int(ts - now)
    return f"{int(ts)} ({'in ' if delta >= 0 else ''}{abs(delta)}s{'' if delta >= 0 else ' ago'})"


def _requirement_text(req: Requirement) -> str:
    if req.anonymous:
        return "anonymous"
    if req.authenticated_only:
        return "authenticated"
    return " OR ".join(_clause_text(c) for c in req.any_of)


def _clause_text(c: Clause) -> str:
    parts = []
    if c.token_kind is not TokenKind.ANY:
        parts.append(f"token_kind={c.token_kind.value}")
    if c.actor is not ActorRule.NOT_AGENT:
        parts.append(f"actor={c.actor.value}")
    for name in (
        "roles_any",
        "roles_all",
        "scopes_any",
        "scopes_all",
        "groups_any",
        "tenants",
        "clients",
    ):
        values: Iterable[str] = getattr(c, name)
        if values:
            parts.append(f"{name}={sorted(values)}")
    if c.auth_context:
        parts.append(f"auth_context={c.auth_context}")
    return "{" + ", ".join(parts or ["any valid token"]) + "}"


def _clause_checks(c: Clause, p: Principal) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    if c.token_kind is not TokenKind.ANY:
        checks.append(
            (p.kind is c.token_kind, f"token kind {p.kind.value} == {c.token_kind.value}")
        )
    # Every clause checks the actor: left out, it admits no agent (docs/token-kinds.md).
    admitted = ACTORS_ADMITTED[c.actor]
    rule = "(default: no agents)" if c.actor is ActorRule.NOT_AGENT else c.actor.value
    checks.append(
        (
            admitted is None or p.actor in admitted,
            f"actor {p.actor.value} admitted by actor={rule}",
        )
    )
    if c.tenants:
        checks.append((p.tid in c.tenants, f"tenant {p.tid} in {sorted(c.tenants)}"))
    if c.clients:
        checks.append((p.client_id in c.clients, f"client {p.client_id} in {sorted(c.clients)}"))
    if c.roles_any:
        checks.append((bool(p.roles & c.roles_any), f"any role of {sorted(c.roles_any)}"))
    if c.roles_all:
        checks.append((c.roles_all <= p.roles, f"all roles of {sorted(c.roles_all)}"))
    if c.scopes_any:
        checks.append((bool(p.scopes & c.scopes_any), f"any scope of {sorted(c.scopes_any)}"))
    if c.scopes_all:
        checks.append((c.scopes_all <= p.scopes, f"all scopes of {sorted(c.scopes_all)}"))
    if c.groups_any:
        ok = not p.groups_overage and bool(p.groups & c.groups_any)
        note = " (groups overage: not decidable)" if p.groups_overage else ""
        checks.append((ok, f"any group of {sorted(c.groups_any)}{note}"))
    if c.auth_context:
        checks.append((c.auth_context in p.acrs, f"auth context {c.auth_context} in acrs"))
    return checks


class _Rules:
    def __init__(self, current: RevocationSet) -> None:
        self.current = current


def explain(
    settings: Settings,
    keys: KeySource,
    attrs: RequestAttrs,
    out: Out,
    now: float | None = None,
    revocations: RevocationSet = EMPTY,
) -> bool:
    """Print every check for one request; return True if the engine allows it."""
    now = time.time() if now is None else now
    clock = lambda: now  # noqa: E731  (a one-line frozen clock reads best as a lambda)
    issuers = {s.name: s for s in settings.issuers}
    verifier = TokenVerifier(settings.tokens, issuers, keys, clock=clock)
    engine = Engine(settings, verifier, revocations=_Rules(revocations), clock=clock)
    out(
        f"request: {attrs.method} {attrs.path} host={attrs.host or '-'} "
        f"api={attrs.context.get('api', '-')}"
    )

    api: ApiSpec | None = None
    try:
        path = canonicalize(attrs.path)
        out(f"  PASS path canonical: {path}")
        api = ApiSelector(settings.apis).select(attrs.context, attrs.host, path)
        out(f"  {_mark(api is not None)} api: {api.name if api else 'none matches'}")
        if api is not None:
            route = RouteTable.build(api).match(attrs.method, attrs.host, path)
            if route is not None:
                out(f"  PASS route: {route.name} ({route.path_kind} {route.path})")
                out(f"       requires: {_requirement_text(route.require)}")
            elif api.default is not None:
                out(
                    f"  PASS route: none; the API default applies: {_requirement_text(api.default)}"
                )
            else:
                out("  FAIL route: none matches and the API's default is deny")
    except Denial as d:
        out(f"  FAIL path: {d.code}: {d.reason}")

    principal = _explain_token(settings, verifier, keys, attrs, api, out, now)
    if principal is not None and api is not None:
        _explain_binding(api, principal, attrs.client_cert_x5t, out)
    if principal is not None:
        revoked = revocations.match(principal, clock)
        out(f"  {_mark(not revoked)} not revoked ({len(revocations)} rule(s) in force)")
        for rule in revoked:
            before = (
                f", issued before {format_time(rule.issued_before)}" if rule.issued_before else ""
            )
            out(f"       FAIL rule {rule.id}: {dict(rule.matchers)}{before}: {rule.reason}")
    if principal is not None and api is not None:
        route = RouteTable.build(api).match(attrs.method, attrs.host, canonicalize(attrs.path))
        req = route.require if route else api.default
        if req is not None and not req.anonymous:
            for i, clause in enumerate(req.any_of):
                checks = _clause_checks(clause, principal)
                label = f"alternative {i + 1}" if len(req.any_of) > 1 else "requirement"
                out(f"  {_mark(all(ok for ok, _ in checks))} {label}: {_clause_text(clause)}")
                for ok, text in checks:
                    out(f"       {_mark(ok)} {text}")

    decision = engine.check(attrs)
    out(
        f"decision: {'ALLOW' if decision.allowed else 'DENY'} {decision.status} {decision.code}"
        f"{' (dry-run: would deny)' if decision.would_deny else ''} — {decision.reason}"
    )
    for name, value in decision.response_headers:
        if name == "www-authenticate":
            out(f"  WWW-Authenticate: {value}")
    for name, value in decision.upstream_headers:
        out(f"  sets {name}: {value}")
    if decision.remove_headers:
        out(f"  removes: {', '.join(decision.remove_headers)}")
    return decision.allowed


def _explain_token(
    settings: Settings,
    verifier: TokenVerifier,
    keys: KeySource,
    attrs: RequestAttrs,
    api: ApiSpec | None,
    out: Out,
    now: float,
) -> Principal | None:
    try:
        token = extract_bearer(attrs.headers, "")
    except Denial as d:
        out(f"  FAIL bearer: {d.code}: {d.reason}")
        return None
    if token is None:
        out("  ---- token: none sent")
        return None
    header, claims = _segment(token, 0), _segment(token, 1)
    out(f"  token: {len(token)} bytes, alg={header.get('alg')!r} kid={header.get('kid')!r}")
    shown = ("iss", "aud", "tid", "ver", "azp", "appid", "idtyp", "scp", "roles", "uti")
    agent_claims = ("xms_par_app_azp", "xms_act_fct", "xms_sub_fct", "cnf")
    for name in (*shown, *agent_claims):
        if name in claims:
            out(f"       {name} = {claims[name]!r}")
    for name in ("iat", "nbf", "exp"):
        out(f"       {name} = {_when(claims.get(name), now)}")
    if api is not None:
        out(f"  {_mark(claims.get('aud') in api.audiences)} aud in {sorted(api.audiences)}")
        kid = header.get("kid")
        for name in api.issuers:
            snap = keys.snapshot(name)
            if snap is None:
                out(f"  FAIL keys of issuer {name!r}: never loaded")
                continue
            tid = str(claims.get("tid", ""))
            expected = {v: t.replace("{tenantid}", tid) for v, t in snap.issuers.items()}
            match = claims.get("iss") in expected.values()
            out(f"  {_mark(match)} iss is issuer {name!r} ({', '.join(sorted(expected.values()))})")
            if match:
                out(
                    f"  {_mark(kid in snap.keys_for(tid))} kid known to {name!r} "
                    f"({len(snap.keys_for(tid))} keys loaded for tenant {tid!r})"
                )
                allowed = tenant_allowed(settings.issuer(name), snap, tid)
                out(f"  {_mark(allowed)} tenant {tid!r} allowed by issuer {name!r}")
        skew = settings.tokens.clock_skew_s
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if isinstance(exp, int | float):
            out(f"  {_mark(exp + skew > now)} not expired (clock skew {skew}s)")
        if isinstance(nbf, int | float):
            out(f"  {_mark(nbf - skew <= now)} valid already (nbf)")
        if isinstance(iat, int | float):
            out(f"  {_mark(iat - skew <= now)} not issued in the future (iat)")
    try:
        principal = verifier.verify(token, api) if api is not None else None
    except Denial as d:
        out(f"  FAIL verify: {d.code}: {d.reason}")
        return None
    if principal is not None:
        out(
            "  PASS verify: signature, issuer, key issuer, lifetime, tenant, claim types "
            f"({principal.kind.value} token, actor {principal.actor.value})"
        )
    return principal


def _explain_binding(api: ApiSpec, p: Principal, presented: str, out: Out) -> None:
    """The RFC 8705 check (``authz.policy.binding``): what the token is bound to, what the
    request presented, and the verdict."""
    mode = api.require_bound_tokens.value
    bound = (p.cnf_x5t or "another method than x5t#S256") if p.bound else "nothing (no cnf)"
    cert = presented or "none"
    try:
        check_binding(api.require_bound_tokens, p, presented)
    except Denial as d:
        out(f"  FAIL certificate binding (require_bound_tokens={mode}): {d.code}")
        out(f"       token bound to {bound}; client certificate {cert}")
        return
    out(f"  PASS certificate binding (require_bound_tokens={mode})")
    out(f"       token bound to {bound}; client certificate {cert}")


def main(settings: Settings, args: argparse.Namespace) -> int:
    token = args.token
    if token == "-":
        token = sys.stdin.readline()
    token = token.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    try:
        keys: KeySource = (
            static_keys(settings, args.jwks) if args.jwks else asyncio.run(live_keys(settings))
        )
    except (OSError, KeyFetchError) as e:
        print(f"cannot load signing keys: {e}", file=sys.stderr)
        return 2
    revocations = EMPTY
    if settings.revocation.file:
        from authz.revocation import RevocationFileError, load_file  # noqa: PLC0415  (lazy: only a configured revocation file needs it)

        r = settings.revocation
        try:
            found = load_file(r.file, now=time.time(), max_lifetime_s=r.max_rule_lifetime_s)[0]
        except RevocationFileError as e:
            print(str(e), file=sys.stderr)
            return 2
        revocations = RevocationSet(found)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    presented = ""
    if args.client_cert:
        from urllib.parse import quote  # noqa: PLC0415

        from authz.server.clientcert import pem_x5t  # noqa: PLC0415

        try:
            with open(args.client_cert, encoding="ascii") as f:
                presented = pem_x5t(quote(f.read()))
        except (OSError, UnicodeDecodeError) as e:
            print(f"cannot read the client certificate: {e}", file=sys.stderr)
            return 2
    attrs = RequestAttrs(
        method=args.method,
        path=args.path,
        host=args.host,
        headers=headers,
        context={"api": args.api} if args.api else {},
        request_id="explain",
        client_cert_x5t=presented,
    )
    return 0 if explain(settings, keys, attrs, print, revocations=revocations) else 1
