"""Verify a Microsoft Entra ID access token against an in-memory key snapshot -> ``Principal``.

Size: one ordered pipeline of checks, read top to bottom (the order picks the code).

Pure given keys: no network, no asyncio. Keys come from a ``KeySource`` (``authz.identity.keys``
implements it over HTTP; tests use a dict). The order of checks (the most specific code wins,
cheap structure first, and no claim is trusted for the decision before the signature verifies):

 1. size cap                                     token_too_large
 2. three segments, canonical base64url (an     malformed_token (duplicate keys: duplicate_claim)
    empty signature fails later, as a signature),
    UTF-8, JSON
 3. header: alg allowlist, forbidden parameters  algorithm_not_allowed, forbidden_header_parameter
    (crit jku x5u jwk x5c b64 nonce), kid syntax malformed_token
 4. issuer selection (unverified iss/tid/ver pick missing_claim, invalid_claim, keys_unavailable,
    which configured issuer's keys to use)        token_version_not_accepted, issuer_mismatch
 5. the token's key set (its issuer's, or its    keys_unavailable (none loaded, or older than
    tenant's), then the key by kid                the issuer's max age), unknown_signing_key
                                                 (the transport may refresh)
 6. signature                                    bad_signature
 7. claims: exp/nbf/iat/aud present and typed,   missing_claim, invalid_claim, token_expired,
    lifetime, tenant allowlist, key issuer,      token_not_yet_valid, tenant_not_allowed,
    claim types                                  key_issuer_mismatch
 8. API checks: aud, scp/roles policy            audience_mismatch, app_token_without_roles,
                                                 no_scope_or_role
The principal also records who acts (``Actor``: an Entra Agent ID agent when ``xms_par_app_azp``
or an agent facet is present, else human/app by token kind) and the RFC 8705 ``cnf`` binding;
mistyped agent or ``cnf`` claims are ``invalid_claim`` (docs/token-kinds.md).
Steps 1-7 do not depend on the API asking (beyond which issuers it trusts), so their result is
cached under ``sha256(token)`` (``authz.identity.cache``); step 8 runs on every call.

We do not call ``jwt.decode``: its per-character base64url check costs ~5x a raw RSA verify, and
its claim handling has pitfalls we must re-check anyway (optional exp, str->int coercion,
last-wins duplicate keys, list aud). Signatures are verified with pyjwt's algorithm object on a
``PyJWK`` built once per key at fetch time; every pyjwt/cryptography exception is mapped to a
denial in ``crypto_denial`` and nothing else is allowed to escape as an allow.

Must not import grpc, prometheus, asyncio or network libraries (a test checks the imports).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from binascii import a2b_base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType, MemberDescriptorType
from typing import Any, Protocol

import jwt
from cryptography.exceptions import InvalidSignature
from jwt.algorithms import get_default_algorithms

from authz.identity.cache import CachedIdentity, ClaimsCache
from authz.policy.errors import Code, Denial, Unauthenticated, Unavailable, UnknownSigningKey
from authz.policy.model import (
    GUID_RE,
    SUPPORTED_ALGORITHMS,
    Actor,
    ApiSpec,
    IssuerSpec,
    Principal,
    TokenKind,
    TokenSettings,
)

__all__ = [
    "FORBIDDEN_HEADER_PARAMETERS",
    "KID_RE",
    "KeySnapshot",
    "KeySource",
    "SigningKey",
    "TokenVerifier",
    "crypto_denial",
    "tenant_allowed",
]

# ------------------------------------------------------------------------------------ key model


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One published signing key, parsed once when the JWKS was fetched."""

    kid: str
    jwk: jwt.PyJWK  # built once; ``jwk.key`` is the cryptography public key
    # The key's ``issuer`` from a v2 JWKS: concrete, or a template with ``{tenantid}``. None for
    # keys only a v1 JWKS listed (v1 keys carry no issuer).
    issuer: str | None = None
    # (n, e) as published: lets a refresh tell "unchanged" from "rotated".
    fingerprint: tuple[str, str] = ("", "")


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """Everything known about one configured issuer at one point in time. Immutable: a refresh
    swaps in a new snapshot, so a check always sees one consistent set."""

    issuer: str  # the configured issuer (IssuerSpec.name)
    # The tenant id of a single-tenant issuer (read from the discovery documents' ``issuer``);
    # None when the documents are tenant-independent (``{tenantid}`` templates, as for
    # common/organizations).
    tenant_id: str | None
    issuers: Mapping[str, str]  # token version ("1.0"/"2.0") -> issuer string or template
    keys: Mapping[str, SigningKey]  # kid -> key
    fetched_at: float
    # Multi-tenant issuers: each allowed tenant's own key set, from its tenant-specific documents
    # ("discover and cache keys per tenant ... a key common across tenants today can become
    # distinct"). Empty for single-tenant issuers, whose ``keys`` are that tenant's.
    tenant_keys: Mapping[str, Mapping[str, SigningKey]] = field(default_factory=dict)
    # When each tenant's set was last fetched successfully (tenants refresh and fail alone).
    tenant_fetched_at: Mapping[str, float] = field(default_factory=dict)

    def keys_for(self, tid: str) -> Mapping[str, SigningKey]:
        """The keys that may sign a token of tenant ``tid``: its own set when one was fetched."""
        return self.tenant_keys.get(tid, self.keys)

    def fetched_at_for(self, tid: str) -> float:
        """When the key set ``keys_for(tid)`` was fetched."""
        return self.tenant_fetched_at.get(tid, self.fetched_at)


class KeySource(Protocol):
    """The seam between the pure verifier and whatever keeps keys fresh."""

    def snapshot(self, issuer: str) -> KeySnapshot | None:
        """The current snapshot of a configured issuer; None if never loaded."""
        ...


# -------------------------------------------------------------------------------------- syntax

KID_RE = re.compile(r"[A-Za-z0-9_\-.=]{1,128}")
# The last character of an unpadded base64url segment must leave the unused bits zero
# (RFC 4648 §3.5, canonical encoding): 2 chars left over -> 4 unused bits, 3 -> 2 unused bits.
_LAST_OF_2 = frozenset("AQgw")
_LAST_OF_3 = frozenset("AEIMQUYcgkosw048")

FORBIDDEN_HEADER_PARAMETERS = frozenset({"crit", "jku", "x5u", "jwk", "x5c", "b64", "nonce"})
_TEMPLATE = "{tenantid}"
_MAX_CACHED_HEADERS = 256
# Interned claim sets (see ``_frozen``): bounded like the header cache.
_MAX_INTERNED_SETS = 1024
_NO_STRINGS: frozenset[str] = frozenset()
_APP, _USER = TokenKind.APP, TokenKind.USER


class _Malformed(Exception):
    pass


class _Duplicate(Exception):
    pass


def _b64url(segment: str) -> bytes:
    """Strict, canonical, unpadded base64url. ``a2b_base64(strict_mode=True)`` rejects every
    character outside the standard alphabet; '+', '/' and '=' are refused before translating.

    ``-``/``_`` -> ``+``/``/`` uses two ``str.replace`` calls, not ``bytes.translate``: JSON text
    encodes to few or none of them, and a replace with no match is a memchr scan (~15x faster
    than translate's per-byte loop on a 2 KB payload); with many matches it is still linear.
    """
    if "+" in segment or "/" in segment or "=" in segment:
        raise _Malformed
    rest = len(segment) & 3
    if rest == 2:
        if segment[-1] not in _LAST_OF_2:
            raise _Malformed
        segment += "=="
    elif rest == 3:
        if segment[-1] not in _LAST_OF_3:
            raise _Malformed
        segment += "="
    elif rest == 1:
        raise _Malformed
    try:
        # a2b_base64 reads an ASCII str in place: no encode() copy.
        return a2b_base64(segment.replace("-", "+").replace("_", "/"), strict_mode=True)
    except ValueError:  # binascii.Error, or a non-ASCII str
        raise _Malformed from None


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Duplicate
    return d


def _no_constant(name: str) -> Any:
    raise _Malformed  # NaN, Infinity, -Infinity are not JSON


# Duplicate keys at any depth are detected exactly by the pairs hook (the C scanner hands every
# object's pairs to it). We call the decoder's scanner directly instead of ``decode()``: the same
# C scanner with the same hooks, minus two Python frames, with ``decode()``'s whitespace rules
# (``[ \t\n\r]*`` before and after the value) reproduced below.
_decoder = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_constant=_no_constant)
# JSONDecoder.__init__ builds it with json.scanner.make_scanner(self); typeshed omits it.
_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]
_JSON_WS = " \t\n\r"


def _json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes; ``_Malformed`` for anything else, ``_Duplicate`` for a
    repeated key at any depth."""
    try:
        text = raw.decode("utf-8")
        try:
            value, end = _scan_once(text, 0)
        except StopIteration:  # no value at 0: maybe leading whitespace, as decode() allows
            value, end = _scan_once(text, len(text) - len(text.lstrip(_JSON_WS)))
        if end != len(text) and text[end:].strip(_JSON_WS):
            raise _Malformed  # extra data after the value
    except (_Duplicate, _Malformed):
        raise
    except (ValueError, RecursionError, StopIteration):  # bad UTF-8/JSON, huge ints, nesting
        raise _Malformed from None
    if type(value) is not dict:
        raise _Malformed
    return value


# ---------------------------------------------------------------------------- exception mapping

_PYJWT_CODES: dict[type[BaseException], Code] = {
    jwt.ExpiredSignatureError: Code.TOKEN_EXPIRED,
    jwt.ImmatureSignatureError: Code.TOKEN_NOT_YET_VALID,
    jwt.InvalidAudienceError: Code.AUDIENCE_MISMATCH,
    jwt.InvalidIssuerError: Code.ISSUER_MISMATCH,
    jwt.InvalidIssuedAtError: Code.INVALID_CLAIM,
    jwt.MissingRequiredClaimError: Code.MISSING_CLAIM,
    jwt.InvalidAlgorithmError: Code.ALGORITHM_NOT_ALLOWED,
    jwt.InvalidSignatureError: Code.BAD_SIGNATURE,
    jwt.DecodeError: Code.MALFORMED_TOKEN,
    jwt.InvalidTokenError: Code.MALFORMED_TOKEN,
    InvalidSignature: Code.BAD_SIGNATURE,
}


def crypto_denial(exc: BaseException) -> Denial:
    """The one place where pyjwt/cryptography exceptions become denials.

    Exact token-error classes map to their code; every other ``jwt.PyJWTError`` (key errors:
    ``InvalidKeyError``, ``PyJWKError``, ...) and every unexpected exception map to
    ``bad_signature``: a signature we could not check is a signature that did not verify.
    """
    for cls in type(exc).__mro__:
        code = _PYJWT_CODES.get(cls)
        if code is not None:
            return Unauthenticated(code)
    return Unauthenticated(Code.BAD_SIGNATURE)


def _deny(code: Code, reason: str | None = None) -> Unauthenticated:
    return Unauthenticated(code, reason)


# --------------------------------------------------------------------------------- claim types


def _not_int_claim(payload: Mapping[str, Any], name: str) -> Unauthenticated:
    """Why claim ``name``, which the inline check found is not an integer (not bool, not float:
    1e400 is inf, not a numeric string), is refused: absent or mistyped. The caller raises it."""
    if name not in payload:
        return _deny(Code.MISSING_CLAIM, f"the token has no '{name}'")
    return _deny(Code.INVALID_CLAIM, f"'{name}' is not an integer")


def _not_str_claim(payload: Mapping[str, Any], name: str) -> Unauthenticated:
    """Why claim ``name``, which the inline check found is not a string, is refused."""
    if name not in payload:
        return _deny(Code.MISSING_CLAIM, f"the token has no '{name}'")
    return _deny(Code.INVALID_CLAIM, f"'{name}' is not a string")


# ------------------------------------------------------------------------------------ verifier


class TokenVerifier:
    """Verifies Entra access tokens for the configured issuers; one per configuration."""

    def __init__(
        self,
        settings: TokenSettings,
        issuers: Mapping[str, IssuerSpec],
        keys: KeySource,
        *,
        clock: Callable[[], float] = time.time,
        cache: ClaimsCache | None = None,
    ) -> None:
        bad = sorted(set(settings.algorithms) - set(SUPPORTED_ALGORITHMS))
        if bad or not settings.algorithms:
            # Entra signs with RSA keys; an HMAC or EC algorithm with an RSA key is key confusion.
            raise ValueError(
                f"unsupported token algorithm(s) {bad}; supported: {SUPPORTED_ALGORITHMS}"
            )
        every = get_default_algorithms()
        self._algorithms = {name: every[name] for name in settings.algorithms}
        self._max_bytes = settings.max_token_bytes
        self._skew = settings.clock_skew_s
        self._issuers = dict(issuers)
        self._keys = keys
        self._clock = clock
        self._cache = cache
        # Header segment -> (alg, kid) for headers that passed step 3. The result is a pure
        # function of the segment and of this verifier's allowlist, and Entra signs with a
        # handful of keys, so nearly every token repeats a header seen before: a hit skips the
        # base64 decode, the JSON parse and the checks. Failures are never stored; the dict is
        # cleared when full, so a flood of distinct headers costs memory only up to the bound.
        # Kept (issue 14): its key is request data (the token's header), so it cannot be
        # compiled at configuration time; it lives and dies with this verifier.
        self._headers: dict[str, tuple[str, str]] = {}
        # Claim values -> the frozenset a Principal holds, shared by every Principal with the same
        # scopes, roles or groups (most users of an API share them): a cached Principal then
        # holds no GC-tracked set of its own, so a full collection walks fewer objects in a full
        # claims cache (docs/performance.md, "Many users and the GC"). Cleared when full.
        self._sets: dict[object, frozenset[str]] = {}

    @property
    def cache(self) -> ClaimsCache | None:
        return self._cache

    # ------------------------------------------------------------------------------- public

    def verify(self, token: str, api: ApiSpec) -> Principal:
        """The verified caller of ``api``, or a raised ``Denial``."""
        if len(token) > self._max_bytes:
            raise _deny(Code.TOKEN_TOO_LARGE)
        if not token.isascii():
            raise _deny(Code.MALFORMED_TOKEN)
        now = self._clock()
        cache = self._cache
        if cache is None:
            principal = self._verify(token, api, now)[0]
            _check_api(principal, api)
            return principal
        digest = hashlib.sha256(token.encode("ascii")).digest()
        hit = cache.get(digest)
        cached = None if hit is None else self._revalidate(hit, api, now)
        if cached is not None:
            _check_api(cached, api)
            return cached
        principal, key = self._verify(token, api, now)
        cache.put(digest, principal, key.kid, key.fingerprint, principal.expires_at + self._skew)
        _check_api(principal, api)
        return principal

    # ------------------------------------------------------------------------------ helpers

    def _revalidate(self, hit: CachedIdentity, api: ApiSpec, now: float) -> Principal | None:
        """A cached identity, if it still stands for this API; None means "verify in full"."""
        p = hit.principal
        if p.provider not in api.issuers or p.expires_at + self._skew < now:
            return None
        snap = self._keys.snapshot(p.provider)
        spec = self._issuers.get(p.provider)
        if snap is None or spec is None or now - snap.fetched_at_for(p.tid) > spec.max_key_age_s:
            return None  # the full path decides (keys_unavailable when they are too old)
        key = snap.keys_for(p.tid).get(hit.kid)
        if key is None or key.fingerprint != hit.fingerprint:
            # Retired since, or the same kid now names another key: the full path decides.
            return None
        return p

    def _verify(self, token: str, api: ApiSpec, now: float) -> tuple[Principal, SigningKey]:
        """Steps 2-7 of the module docstring: the API-independent verification."""
        segments = token.split(".")
        if len(segments) != 3:
            raise _deny(Code.MALFORMED_TOKEN)
        h64, p64, s64 = segments
        if not h64 or not p64:
            raise _deny(Code.MALFORMED_TOKEN)
        try:
            checked = self._headers.get(h64)
            if checked is None:
                checked = self._check_header(h64)
            alg, kid = checked
            payload = _json_object(_b64url(p64))
            signature = _b64url(s64)
        except _Duplicate:
            raise _deny(Code.DUPLICATE_CLAIM) from None
        except _Malformed:
            raise _deny(Code.MALFORMED_TOKEN) from None
        if not "".join(payload).islower() and len({k.lower() for k in payload}) != len(payload):
            # tid and TID (IdentityModel IDX40011): a second spelling of any claim is a smuggle.
            raise _deny(Code.DUPLICATE_CLAIM)

        # --- 4. which configured issuer? (claims read unverified, only to choose keys)
        # Inline happy path; the helpers decide the code when a claim is absent or mistyped.
        get = payload.get
        iss, tid, ver = get("iss"), get("tid"), get("ver")
        if iss.__class__ is not str:
            raise _not_str_claim(payload, "iss")
        if tid.__class__ is not str:
            raise _not_str_claim(payload, "tid")
        if ver.__class__ is not str:
            raise _not_str_claim(payload, "ver")
        if not GUID_RE.fullmatch(tid):
            raise _deny(Code.INVALID_CLAIM, "'tid' is not a tenant id GUID")
        name, spec, snap = self._select_issuer(api, iss, tid, ver)

        # --- 5, 6. key set, key and signature
        own_set = snap.tenant_id is None and tid in spec.allowed_tenants
        if own_set and tid not in snap.tenant_keys:
            raise Unavailable(
                Code.KEYS_UNAVAILABLE, "the token's tenant has no signing keys loaded"
            )
        if now - snap.fetched_at_for(tid) > spec.max_key_age_s:
            raise Unavailable(Code.KEYS_UNAVAILABLE, "the last good signing keys are too old")
        key = snap.keys_for(tid).get(kid)
        if key is None:
            raise UnknownSigningKey(name, tenant=tid)
        signing_input = token[: len(h64) + 1 + len(p64)].encode("ascii")
        try:
            ok = self._algorithms[alg].verify(signing_input, key.jwk.key, signature)
        except Exception as exc:  # pyjwt or cryptography: never an allow
            raise crypto_denial(exc) from None
        if ok is not True:
            raise _deny(Code.BAD_SIGNATURE)

        # --- 7. the (now authentic) claims
        exp, nbf, iat = get("exp"), get("nbf"), get("iat")
        if exp.__class__ is not int:  # not bool, not float (1e400 is inf), not a numeric string
            raise _not_int_claim(payload, "exp")
        if nbf.__class__ is not int:
            raise _not_int_claim(payload, "nbf")
        if iat.__class__ is not int:
            raise _not_int_claim(payload, "iat")
        if "aud" not in payload:
            raise _deny(Code.MISSING_CLAIM, "the token has no 'aud'")
        aud = payload["aud"]
        if type(aud) is not str:
            raise _deny(Code.INVALID_CLAIM, "'aud' is not a single string")
        skew = self._skew
        if not math.isfinite(now) or exp + skew < now:
            raise _deny(Code.TOKEN_EXPIRED)
        if nbf - skew > now or iat - skew > now:
            raise _deny(Code.TOKEN_NOT_YET_VALID)
        if ver not in spec.versions:
            # Unreachable: _select_issuer returns only an issuer whose versions hold ``ver``
            # (else token_version_not_accepted there). Kept as a second lock on this check.
            raise _deny(Code.TOKEN_VERSION_NOT_ACCEPTED)  # pragma: no cover
        if not tenant_allowed(spec, snap, tid):
            raise _deny(Code.TENANT_NOT_ALLOWED)
        if key.issuer is None or not _key_issuer_ok(key.issuer, iss, tid, ver, snap, spec):
            # A key no v2 JWKS vouches for (v1-only: the MSA key, an app's custom key) has no
            # issuer we could check, so it signs for no one.
            raise _deny(Code.KEY_ISSUER_MISMATCH)
        return _principal(payload, name, iss, tid, ver, aud, exp, self._sets), key

    def _check_header(self, h64: str) -> tuple[str, str]:
        """Step 3 on a header segment not seen before: ``(alg, kid)``, remembered on success.
        Raises a denial, ``_Malformed`` or ``_Duplicate``."""
        header = _json_object(_b64url(h64))
        alg = header.get("alg")
        if type(alg) is not str or alg not in self._algorithms:
            raise _deny(Code.ALGORITHM_NOT_ALLOWED)
        if not FORBIDDEN_HEADER_PARAMETERS.isdisjoint(header):
            raise _deny(Code.FORBIDDEN_HEADER_PARAMETER)
        kid = header.get("kid")
        if type(kid) is not str or not KID_RE.fullmatch(kid):
            raise _deny(Code.MALFORMED_TOKEN, "the token header has no valid 'kid'")
        headers = self._headers
        if len(headers) >= _MAX_CACHED_HEADERS:
            headers.clear()
        headers[h64] = (alg, kid)
        return alg, kid

    def _select_issuer(
        self, api: ApiSpec, iss: str, tid: str, ver: str
    ) -> tuple[str, IssuerSpec, KeySnapshot]:
        """The configured issuer whose keys verify this token. ``keys_unavailable`` only when an
        issuer that may be the token's own has no keys yet: a token no issuer of the API could
        have issued is rejected, and one that a loaded issuer matches is verified, whatever the
        state of the others."""
        version_ok = pending = False
        foreign: tuple[str, IssuerSpec, KeySnapshot] | None = None
        for name in api.issuers:
            spec = self._issuers.get(name)
            if spec is None or ver not in spec.versions:
                continue
            version_ok = True
            snap = self._keys.snapshot(name)
            if snap is None:
                pending = pending or _may_issue(spec, iss, tid, ver)
                continue
            template = snap.issuers.get(ver)
            if template is None:
                continue
            if snap.tenant_id is None:
                if template.replace(_TEMPLATE, tid) == iss:
                    if tid in spec.allowed_tenants:
                        return name, spec, snap
                    # A template matches any tenant: keep looking for an issuer that accepts
                    # this one (a single-tenant issuer listed later), else deny it below.
                    foreign = foreign or (name, spec, snap)
            elif template == iss and tid == snap.tenant_id:
                return name, spec, snap
        if pending:
            # It may be the token of the issuer we could not load yet: we cannot decide.
            raise Unavailable(Code.KEYS_UNAVAILABLE)
        if foreign is not None:
            return foreign  # decided later, after the signature: tenant_not_allowed
        if not version_ok:
            raise _deny(Code.TOKEN_VERSION_NOT_ACCEPTED)
        raise _deny(Code.ISSUER_MISMATCH)


def _may_issue(spec: IssuerSpec, iss: str, tid: str, ver: str) -> bool:
    """Could the (never loaded) issuer ``spec`` have issued a token with these unverified claims?
    Only what holds for every Entra issuer is used: the v2 form ends in ``/v2.0`` and the v1
    form does not, ``iss`` names ``tid`` as a path segment, and the tenant is the configured one
    (a GUID) or an allowed one. A domain-named tenant's id is known only from its documents."""
    if iss.endswith("/v2.0") != (ver == "2.0") or f"/{tid}/" not in f"{iss}/":
        return False
    if spec.allowed_tenants:
        return tid in spec.allowed_tenants
    return tid == spec.tenant if GUID_RE.fullmatch(spec.tenant) else True


def tenant_allowed(spec: IssuerSpec, snap: KeySnapshot, tid: str) -> bool:
    """Is tenant ``tid`` one this issuer accepts? Multi-tenant: only its allowlist, never "any"
    tenant; single-tenant: its own tenant, narrowed further by an allowlist if one is set."""
    if snap.tenant_id is None:
        return tid in spec.allowed_tenants
    return tid == snap.tenant_id and (not spec.allowed_tenants or tid in spec.allowed_tenants)


def _key_issuer_ok(
    key_issuer: str, iss: str, tid: str, ver: str, snap: KeySnapshot, spec: IssuerSpec
) -> bool:
    """Entra's signing-key issuer rule: the key's ``issuer`` with ``{tenantid}`` -> tid must be
    the token's ``iss``; for v1 tokens (v1 keys carry no issuer) IdentityModel also accepts the
    v2 form of the token's issuer."""
    expected = key_issuer.replace(_TEMPLATE, tid)
    if expected == iss:
        return True
    if ver != "1.0":
        return False
    v2 = snap.issuers.get("2.0", f"{spec.instance}/{_TEMPLATE}/v2.0")
    return expected == v2.replace(_TEMPLATE, tid)


# Building the frozen, slotted ``Principal`` through its dataclass ``__init__`` costs one
# ``object.__setattr__`` per field (21 of them, ~3 us). ``_new_principal`` builds the same object
# with the slots' own descriptors (~1.4 us): same class, same values, no ``__init__`` logic skipped
# (Principal has no ``__post_init__``, and every field is passed). It is used only while the
# field list is exactly the one below; otherwise the class itself is the constructor (a unit test
# checks that the fast path is active and builds objects equal to ``Principal(...)``).
_PRINCIPAL_FIELDS = (
    "tid",
    "oid",
    "sub",
    "client_id",
    "kind",
    "version",
    "issuer",
    "audience",
    "provider",
    "expires_at",
    "roles",
    "scopes",
    "scp",
    "roles_list",
    "groups",
    "groups_overage",
    "acrs",
    "client_capabilities",
    "uti",
    "idtyp",
    "claims",
    "actor",
    "bound",
    "cnf_x5t",
)
# A member descriptor's ``__set__`` per field (None where a field is missing: the fast path is
# off then, and these are never called).
_SETTERS: tuple[Any, ...] = tuple(
    getattr(getattr(Principal, name, None), "__set__", None) for name in _PRINCIPAL_FIELDS
)
_FAST_PRINCIPAL = (
    tuple(f.name for f in fields(Principal)) == _PRINCIPAL_FIELDS
    and all(f.init for f in fields(Principal))
    and not hasattr(Principal, "__post_init__")
    and Principal.__new__ is object.__new__
    and tuple(getattr(Principal, "__slots__", ())) == _PRINCIPAL_FIELDS
    and all(
        type(getattr(Principal, name, None)) is MemberDescriptorType for name in _PRINCIPAL_FIELDS
    )
)
(
    _set_tid,
    _set_oid,
    _set_sub,
    _set_client_id,
    _set_kind,
    _set_version,
    _set_issuer,
    _set_audience,
    _set_provider,
    _set_expires_at,
    _set_roles,
    _set_scopes,
    _set_scp,
    _set_roles_list,
    _set_groups,
    _set_groups_overage,
    _set_acrs,
    _set_client_capabilities,
    _set_uti,
    _set_idtyp,
    _set_claims,
    _set_actor,
    _set_bound,
    _set_cnf_x5t,
) = _SETTERS


def _build_principal(
    tid: str,
    oid: str,
    sub: str,
    client_id: str,
    kind: TokenKind,
    version: str,
    issuer: str,
    audience: str,
    provider: str,
    expires_at: int,
    roles: frozenset[str],
    scopes: frozenset[str],
    scp: str,
    roles_list: tuple[str, ...],
    groups: frozenset[str],
    groups_overage: bool,
    acrs: frozenset[str],
    client_capabilities: frozenset[str],
    uti: str,
    idtyp: str,
    claims: Mapping[str, Any],
    actor: Actor,
    bound: bool,
    cnf_x5t: str,
) -> Principal:
    p = _object_new(Principal)
    _set_tid(p, tid)
    _set_oid(p, oid)
    _set_sub(p, sub)
    _set_client_id(p, client_id)
    _set_kind(p, kind)
    _set_version(p, version)
    _set_issuer(p, issuer)
    _set_audience(p, audience)
    _set_provider(p, provider)
    _set_expires_at(p, expires_at)
    _set_roles(p, roles)
    _set_scopes(p, scopes)
    _set_scp(p, scp)
    _set_roles_list(p, roles_list)
    _set_groups(p, groups)
    _set_groups_overage(p, groups_overage)
    _set_acrs(p, acrs)
    _set_client_capabilities(p, client_capabilities)
    _set_uti(p, uti)
    _set_idtyp(p, idtyp)
    _set_claims(p, claims)
    _set_actor(p, actor)
    _set_bound(p, bound)
    _set_cnf_x5t(p, cnf_x5t)
    return p


_object_new = object.__new__
_new_principal: Callable[..., Principal] = _build_principal if _FAST_PRINCIPAL else Principal


def _frozen(sets: dict[object, frozenset[str]], key: object, items: Any) -> frozenset[str]:
    """``frozenset(items)``, shared: the same set object for the same ``key`` (the claim's value:
    the ``scp`` string, or a tuple of a tag and the items). Empty: the module's one empty set."""
    if not items:
        return _NO_STRINGS
    found = sets.get(key)
    if found is None:
        if len(sets) >= _MAX_INTERNED_SETS:
            sets.clear()
        found = sets[key] = frozenset(items)
    return found


def _principal(
    payload: dict[str, Any],
    name: str,
    iss: str,
    tid: str,
    ver: str,
    aud: str,
    exp: int,
    sets: dict[object, frozenset[str]],
) -> Principal:
    get = payload.get
    # Absent optional claims read as "" / (); present ones must have Entra's type (null too is
    # a wrong type). Written out flat: this runs on every cache miss.
    scp, oid, sub = get("scp", ""), get("oid", ""), get("sub", "")
    azp, appid, uti, idtyp = get("azp", ""), get("appid", ""), get("uti", ""), get("idtyp", "")
    for value in (scp, oid, sub, azp, appid, uti, idtyp):
        if value.__class__ is not str:
            raise _deny(Code.INVALID_CLAIM, "a string claim has another type")
    roles, groups, acrs = get("roles", ()), get("groups", ()), get("acrs", ())
    xms_cc, wids = get("xms_cc", ()), get("wids", ())
    for value in (roles, groups, acrs, xms_cc, wids):
        if value.__class__ is not tuple:
            if value.__class__ is not list:
                raise _deny(Code.INVALID_CLAIM, "an array claim has another type")
            try:
                # TypeError unless every item is a str (JSON yields no str subclasses): the same
                # test as a per-item type check, at C speed.
                "".join(value)
            except TypeError:
                raise _deny(Code.INVALID_CLAIM, "an array claim has a non-string item") from None
    claim_names = get("_claim_names")
    overage = False
    if claim_names is not None or "_claim_names" in payload:
        if claim_names.__class__ is not dict:
            raise _deny(Code.INVALID_CLAIM, "'_claim_names' is not an object")
        overage = "groups" in claim_names
    # hasgroups: true (implicit flow) is Entra's other way of saying the groups did not fit.
    hasgroups = get("hasgroups", False)
    if hasgroups.__class__ is not bool:
        raise _deny(Code.INVALID_CLAIM, "'hasgroups' is not a boolean")
    overage = overage or hasgroups
    scopes = _frozen(sets, scp, scp.split())
    # idtyp is authoritative when the API opted in to it; otherwise Microsoft's fallback: no
    # scp and oid == sub means an app-only token.
    app_only = idtyp == "app" if idtyp else (not scopes and bool(oid) and oid == sub)
    roles_list = tuple(roles)
    kind = _APP if app_only else _USER
    actor = Actor.AGENT if _is_agent(payload) else (Actor.APP if app_only else Actor.HUMAN)
    bound, cnf_x5t = _confirmation(payload)
    return _new_principal(
        tid,
        oid,
        sub,
        # The client is the version's own claim: 'appid' in v1, 'azp' in v2. The other one is
        # not Entra's for that version, so it never stands in (allowlists, x-client-id).
        appid if ver == "1.0" else azp,  # client_id
        kind,
        ver,
        iss,
        aud,
        name,  # provider
        exp,
        _frozen(sets, ("roles", *roles_list), roles_list),
        scopes,
        scp,
        roles_list,
        _frozen(sets, ("groups", *groups), groups),
        overage,
        _frozen(sets, ("acrs", *acrs), acrs),
        _frozen(sets, ("xms_cc", *xms_cc), xms_cc),  # client_capabilities
        uti,
        idtyp,
        MappingProxyType(payload),
        actor,
        bound,
        cnf_x5t,
    )


# Entra Agent ID (docs/token-kinds.md cites Microsoft's pages): an agent identity token carries
# 'xms_par_app_azp' (the agent identity blueprint; absent from ordinary app tokens), and the facet
# claims 'xms_act_fct' (the actor) / 'xms_sub_fct' (the subject) list, space-separated, the kinds
# of entity involved: 11 is an agent identity, 13 an agent's user account. Any one of these marks
# the token as an agent's, whatever 'idtyp' says (an agent user's token says "user"); other facet
# values are not interpreted. Microsoft: log 'xms_par_app_azp', do not authorise on its value.
_AGENT_FACETS = frozenset({"11", "13"})
_FACET_CLAIMS = ("xms_act_fct", "xms_sub_fct")


def _is_agent(payload: Mapping[str, Any]) -> bool:
    parent = payload.get("xms_par_app_azp", "")
    if parent.__class__ is not str:
        raise _deny(Code.INVALID_CLAIM, "'xms_par_app_azp' is not a string")
    agent = bool(parent)
    for name in _FACET_CLAIMS:
        value = payload.get(name)
        if value is None:
            if name in payload:
                raise _deny(Code.INVALID_CLAIM, f"'{name}' is not a string of facets")
            continue
        if value.__class__ is not str:
            # Documented as a space-separated string ("3 9 11"); anything else could hide a
            # facet we would miss, so it is refused rather than read as "no agent".
            raise _deny(Code.INVALID_CLAIM, f"'{name}' is not a string of facets")
        agent = agent or not _AGENT_FACETS.isdisjoint(value.split())
    return agent


def _confirmation(payload: Mapping[str, Any]) -> tuple[bool, str]:
    """RFC 8705 §3.1: ``(bound, x5t)`` from the 'cnf' claim. ``bound`` when 'cnf' is present
    (whatever its method); ``x5t`` is its 'x5t#S256' member, "" when it has none."""
    if "cnf" not in payload:
        return False, ""
    cnf = payload["cnf"]
    if cnf.__class__ is not dict:
        raise _deny(Code.INVALID_CLAIM, "'cnf' is not an object")
    x5t = cnf.get("x5t#S256", "")
    if x5t.__class__ is not str:
        raise _deny(Code.INVALID_CLAIM, "'cnf' 'x5t#S256' is not a string")
    return True, x5t


def _check_api(p: Principal, api: ApiSpec) -> None:
    """Step 8: what depends on the API (runs on cache hits too)."""
    if p.audience not in api.audiences:
        raise _deny(Code.AUDIENCE_MISMATCH)
    if api.require_scope_or_role and not p.roles:
        if p.kind is TokenKind.APP:
            raise _deny(Code.APP_TOKEN_WITHOUT_ROLES)
        if not p.scopes:
            raise _deny(Code.NO_SCOPE_OR_ROLE)
