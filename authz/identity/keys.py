"""Signing keys of the configured Entra issuers: discovery, JWKS, immutable snapshots, refresh.

Size: the pure discovery/JWKS parsers and the one KeyStore that runs them.

The I/O side of token verification. ``KeyStore`` implements ``KeySource`` (see
``authz.identity.entra``): the hot path only ever reads ``snapshot(issuer)``, a dict lookup that
returns an immutable ``KeySnapshot``; fetching happens beside it:

* ``start()``: the initial fetch of every issuer, concurrently (failures are logged, not raised;
  ``ready`` says whether every issuer has keys);
* ``start_background()``: one task per issuer refreshing every ``refresh_interval_s`` ± jitter
  (sooner, with backoff from ``RETRY_BASE_S`` while the issuer has failed: ``retry_delay``);
* ``refresh_unknown_kid(issuer, tenant)``: the transport's refresh on an unknown ``kid``;
  single-flight and at most once per ``unknown_kid_min_interval_s`` per key set (the issuer, or
  one allowed tenant of a multi-tenant issuer), so a flood of random kids costs at most one fetch
  per interval, and a flood claiming one tenant spends no other tenant's budget. The caller
  waits at most ``unknown_kid_wait_s`` for it (well under Envoy's timeout); a slower refresh
  finishes in the background and the next check sees its keys;
* ``adopt(previous)`` / ``close()``: on a config reload the new store takes over the unchanged
  issuers' snapshots, their refreshes in flight and every issuer's unknown-kid rate limit; the
  old store stops its periodic refreshes at once but lets a refresh in flight finish (a check on
  the old state may be awaiting it).

A fetch reads, for each accepted token version and always for v2 (the v2 JWKS is where keys
carry their ``issuer``, which the signing-key issuer rule needs for v1 tokens too), the discovery
document
(``{instance}/{tenant}/v2.0/.well-known/openid-configuration`` or, for v1,
``{instance}/{tenant}/.well-known/openid-configuration``, plus ``?{metadata_query}``) and its
``jwks_uri``, parses everything (``parse_discovery``, ``parse_jwks``: pure, unit-tested), builds
one ``PyJWK`` per key and swaps in a new snapshot in one assignment. A garbled document or JWKS is
rejected whole and a failed fetch keeps the last good snapshot: keys are never partially applied
and never emptied.

Multi-tenant issuers (``common``/``organizations``): we fetch the tenant-independent documents,
whose ``issuer`` is the ``{tenantid}`` template (issuer selection and the tenant allowlist), and
also, per Microsoft's key-rollover guidance ("discover and cache keys per tenant ... even for
multi-tenant apps"), every allowed tenant's own documents and JWKS: a token is verified only with
its tenant's key set (``KeySnapshot.keys_for``). A tenant document must name exactly the issuer
the template gives for that tenant. Tenants fail alone: a tenant whose documents cannot be
fetched (a deleted tenant: 400 ``invalid_tenant``) keeps its last good key set, or has none, while
the issuer and every other tenant refresh normally.

Logs to the ``authz.keys`` logger: URLs, issuer names, key counts; never key material or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import httpx
import jwt

from authz.identity.entra import KID_RE, KeySnapshot, SigningKey
from authz.identity.fetch import describe_fetch_error
from authz.policy.model import GUID_PATTERN, GUID_RE, IssuerSpec

__all__ = [
    "FetchFailed",
    "GarbledDiscovery",
    "GarbledJwks",
    "KeyFetchError",
    "KeySnapshot",
    "KeyStore",
    "RefreshObserver",
    "SigningKey",
    "build_snapshot",
    "discovery_url",
    "merge_keys",
    "parse_discovery",
    "parse_jwks",
    "retry_delay",
]

log = logging.getLogger("authz.keys")

MAX_DOCUMENT_BYTES = 512 * 1024  # Entra's documents are a few KB; never buffer an unbounded body
MIN_RSA_BITS = 2048
RETRY_BASE_S = 5.0  # first retry after a failed refresh; doubles up to refresh_interval_s
KEY_ISSUER_VERSION = "2.0"  # always fetched: only v2 JWKS entries carry the key's 'issuer'
_GUID_SEGMENT = re.compile(rf"/({GUID_PATTERN})(?=/|$)")
_TEMPLATE = "{tenantid}"
_T = TypeVar("_T")
_OK = ("ok", "unchanged")
_WHOLE = ""  # the scope of a refresh of the whole issuer (vs. one tenant's key set)
_Scope = tuple[str, str]  # (issuer, tenant id or _WHOLE)


# ------------------------------------------------------------------------------------- errors


class KeyFetchError(Exception):
    """Keys for an issuer could not be (re)loaded. The last good snapshot stays in place.

    KeyFetchError
    ├── FetchFailed       transport error, timeout, non-200 status, oversized body
    ├── GarbledDiscovery  the discovery document is not what Entra publishes
    └── GarbledJwks       the JWKS is not JSON, has the wrong shape, bad or no usable keys
    """

    result = "error"  # the observer's label


class FetchFailed(KeyFetchError):
    result = "error"


class GarbledDiscovery(KeyFetchError):
    result = "garbled"


class GarbledJwks(KeyFetchError):
    result = "garbled"


class RefreshObserver(Protocol):
    def on_refresh(self, issuer: str, result: str, keys: int) -> None:
        """``result``: "ok" (new keys installed), "unchanged", "error" or "garbled"."""
        ...


# ---------------------------------------------------------------------------- pure parsing


def discovery_url(spec: IssuerSpec, version: str) -> str:
    base = f"{spec.instance}/{spec.tenant}"
    url = (
        f"{base}/v2.0/.well-known/openid-configuration"
        if version == "2.0"
        else f"{base}/.well-known/openid-configuration"
    )
    return f"{url}?{spec.metadata_query}" if spec.metadata_query else url


def _load_object(raw: bytes, what: str, error: type[KeyFetchError]) -> dict[str, Any]:
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            raise error(f"{what}: duplicate keys")
        return d

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_dupes)
    except KeyFetchError:
        raise
    except (ValueError, RecursionError) as e:
        raise error(f"{what}: not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise error(f"{what}: not a JSON object")
    return doc


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("https", "http") and bool(parts.netloc)


def parse_discovery(
    doc: bytes, expected_version: str, *, instance: str | None = None
) -> tuple[str, str]:
    """``(issuer, jwks_uri)`` of an OpenID discovery document, checked for shape.

    ``issuer`` must be the form of ``expected_version`` (v2 ends in ``/v2.0``, v1 does not) and
    name its tenant: a tenant-id GUID or the ``{tenantid}`` template. When ``instance`` is given,
    ``jwks_uri`` must be on the same scheme and host (keys never come from elsewhere: no
    ``file:``/``data:`` URIs, no other cloud).
    """
    what = f"v{expected_version} discovery document"
    d = _load_object(doc, what, GarbledDiscovery)
    issuer, jwks_uri = d.get("issuer"), d.get("jwks_uri")
    if not isinstance(issuer, str) or not _is_http_url(issuer):
        raise GarbledDiscovery(f"{what}: 'issuer' is missing or not an http(s) URL")
    if not isinstance(jwks_uri, str) or not _is_http_url(jwks_uri):
        raise GarbledDiscovery(f"{what}: 'jwks_uri' is missing or not an http(s) URL")
    if issuer.endswith("/v2.0") != (expected_version == "2.0"):
        raise GarbledDiscovery(f"{what}: issuer {issuer!r} is not a v{expected_version} issuer")
    if _TEMPLATE not in issuer and not _GUID_SEGMENT.search(issuer):
        raise GarbledDiscovery(f"{what}: issuer {issuer!r} names no tenant id")
    if instance is not None:
        want, got = urlsplit(instance), urlsplit(jwks_uri)
        if (got.scheme, got.netloc.lower()) != (want.scheme, want.netloc.lower()):
            raise GarbledDiscovery(f"{what}: jwks_uri {jwks_uri!r} is not on {instance}")
    return issuer, jwks_uri


def _b64uint(value: Any, field: str, kid: str) -> int:
    if not isinstance(value, str) or not value or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise GarbledJwks(f"key {kid!r}: '{field}' is not base64url")
    return int.from_bytes(jwt.utils.base64url_decode(value), "big")


def parse_jwks(doc: bytes, version: str) -> dict[str, SigningKey]:
    """Usable RSA signing keys of a JWKS, by ``kid``. All or nothing: a document that is not
    JSON, has the wrong shape, a duplicate or malformed ``kid``, bad ``n``/``e``, a key under
    2048 bits, private key material, or no usable RSA key at all raises ``GarbledJwks``.
    Keys for other uses or types (``use`` other than ``sig``, non-RSA ``kty``) are skipped.
    ``issuer`` is read only from v2 documents (v1 keys have none)."""
    what = f"v{version} JWKS"
    d = _load_object(doc, what, GarbledJwks)
    entries = d.get("keys")
    if not isinstance(entries, list):
        raise GarbledJwks(f"{what}: 'keys' is not an array")
    keys: dict[str, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise GarbledJwks(f"{what}: a key is not an object")
        if entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
            raise GarbledJwks(f"{what}: a key has no valid 'kid'")
        if kid in keys:
            raise GarbledJwks(f"{what}: duplicate kid {kid!r}")
        if any(p in entry for p in ("d", "p", "q", "dp", "dq", "qi", "oth")):
            raise GarbledJwks(f"{what}: key {kid!r} carries private key material")
        alg = entry.get("alg")
        if alg is not None and alg != "RS256":
            continue  # Entra publishes no 'alg'; a key pinned to another algorithm is not ours
        n, e = entry.get("n"), entry.get("e")
        if _b64uint(n, "n", kid).bit_length() < MIN_RSA_BITS:
            raise GarbledJwks(f"{what}: key {kid!r} is shorter than {MIN_RSA_BITS} bits")
        exponent = _b64uint(e, "e", kid)
        if exponent < 3 or exponent % 2 == 0:
            raise GarbledJwks(f"{what}: key {kid!r} has a bad exponent")
        issuer: str | None = None
        if version == "2.0" and "issuer" in entry:
            issuer = entry["issuer"]
            if not isinstance(issuer, str) or not _is_http_url(issuer):
                raise GarbledJwks(f"{what}: key {kid!r} has a bad 'issuer'")
        try:
            # A minimal JWK: nothing but the public numbers reaches the parser.
            pyjwk = jwt.PyJWK({"kty": "RSA", "kid": kid, "n": n, "e": e}, algorithm="RS256")
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise GarbledJwks(f"{what}: key {kid!r} is unusable ({type(exc).__name__})") from None
        keys[kid] = SigningKey(kid=kid, jwk=pyjwk, issuer=issuer, fingerprint=(str(n), str(e)))
    if not keys:
        raise GarbledJwks(f"{what}: no usable RSA signing key")
    return keys


def merge_keys(per_version: Mapping[str, Mapping[str, SigningKey]]) -> dict[str, SigningKey]:
    """One key set from the v1 and v2 JWKS. Entra lists the same keys in both; the v2 entry wins
    (it carries ``issuer``). The same kid with different numbers is garbled."""
    merged: dict[str, SigningKey] = {}
    for version in sorted(per_version):  # "1.0" before "2.0": v2 entries replace v1 entries
        for kid, key in per_version[version].items():
            old = merged.get(kid)
            if old is not None and old.fingerprint != key.fingerprint:
                raise GarbledJwks(f"kid {kid!r} names different keys in the v1 and v2 JWKS")
            merged[kid] = key
    return merged


def _tenant_id(spec: IssuerSpec, issuers: Mapping[str, str]) -> str | None:
    """The tenant id a single-tenant issuer's documents name, or None for template documents."""
    templated = {_TEMPLATE in i for i in issuers.values()}
    if templated == {True}:
        return None
    if templated != {False}:
        raise GarbledDiscovery(f"issuer {spec.name!r}: templated and concrete issuers mixed")
    tids = {m.group(1) for i in issuers.values() for m in _GUID_SEGMENT.finditer(i)}
    if len(tids) != 1:
        raise GarbledDiscovery(f"issuer {spec.name!r}: documents name {len(tids)} tenant ids")
    tid = tids.pop()
    if GUID_RE.fullmatch(spec.tenant) and spec.tenant != tid:
        raise GarbledDiscovery(f"issuer {spec.name!r}: documents are for another tenant")
    return tid


def build_snapshot(
    spec: IssuerSpec,
    documents: Mapping[str, tuple[str, Mapping[str, SigningKey]]],
    fetched_at: float,
) -> KeySnapshot:
    """A snapshot from ``{version: (issuer, keys)}`` (pure; raises ``KeyFetchError``)."""
    issuers = {v: iss for v, (iss, _) in documents.items()}
    keys = merge_keys({v: k for v, (_, k) in documents.items()})
    return KeySnapshot(
        issuer=spec.name,
        tenant_id=_tenant_id(spec, issuers),
        issuers=issuers,
        keys=keys,
        fetched_at=fetched_at,
    )


def _key_ids(keys: Mapping[str, SigningKey]) -> dict[str, tuple[tuple[str, str], str | None]]:
    return {k: (v.fingerprint, v.issuer) for k, v in keys.items()}


def _same(a: KeySnapshot, b: KeySnapshot) -> bool:
    return (
        a.tenant_id == b.tenant_id
        and dict(a.issuers) == dict(b.issuers)
        and _key_ids(a.keys) == _key_ids(b.keys)
        and {t: _key_ids(k) for t, k in a.tenant_keys.items()}
        == {t: _key_ids(k) for t, k in b.tenant_keys.items()}
    )


async def _all(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await every one concurrently, let all of them finish, then raise the first failure (no
    request left running behind an early exception)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return cast(list[_T], results)


async def _join(task: asyncio.Task[str], timeout: float | None = None) -> str:
    """Await a refresh task shared with other callers, for at most ``timeout`` seconds (None:
    until it ends). Past the bound the caller gets "pending" and the task runs on (shielded: its
    keys land for the next check). Cancelling the caller leaves the task running (and
    propagates); the task cancelled under the caller (its store closed without draining) reads as
    "error": no new keys, never a ``CancelledError`` for the caller."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        return "pending"
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and (current is None or not current.cancelling()):
            return "error"
        raise


def retry_delay(spec: IssuerSpec, failures: int, loaded: bool) -> tuple[float, float]:
    """``(delay, jitter)`` before the next periodic refresh of an issuer. Loaded and healthy:
    ``refresh_interval_s`` ± ``refresh_jitter_s``. After the n-th consecutive failure (or before
    the first success): ``RETRY_BASE_S * 2**(n-1)`` (5, 10, 20 ... s) up to the interval, with a
    jitter of at most half the delay."""
    if loaded and not failures:
        return spec.refresh_interval_s, spec.refresh_jitter_s
    delay = min(spec.refresh_interval_s, RETRY_BASE_S * 2 ** min(max(failures - 1, 0), 12))
    return delay, min(spec.refresh_jitter_s, delay / 2)


# ---------------------------------------------------------------------------------- key store


class KeyStore:
    """Per-issuer key snapshots over HTTP. Owns its refresh tasks; the ``httpx.AsyncClient`` is
    the caller's (the app owns its lifecycle)."""

    def __init__(
        self,
        issuers: Iterable[IssuerSpec],
        client: httpx.AsyncClient,
        *,
        observer: RefreshObserver | None = None,
        unknown_kid_wait_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[float, float], float] = random.uniform,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._specs = {s.name: s for s in issuers}
        self._client = client
        self._observer = observer
        self._unknown_kid_wait_s = unknown_kid_wait_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand
        self._sleep = sleep
        self._snapshots: dict[str, KeySnapshot] = {}
        # Single-flight refreshes and the unknown-kid budget, per scope: (issuer, _WHOLE) for the
        # whole issuer, (issuer, tid) for one allowed tenant of a multi-tenant issuer.
        self._inflight: dict[_Scope, asyncio.Task[str]] = {}
        self._last_forced: dict[_Scope, float] = {}
        self._failures: dict[str, int] = {}
        self._background: list[asyncio.Task[None]] = []
        self._closed = False

    # ----------------------------------------------------------------------------- KeySource

    def snapshot(self, issuer: str) -> KeySnapshot | None:
        return self._snapshots.get(issuer)

    @property
    def ready(self) -> bool:
        """Every configured issuer has been loaded at least once (a multi-tenant issuer: its
        tenant-independent documents and at least one allowed tenant's key set)."""
        for name, spec in self._specs.items():
            snap = self._snapshots.get(name)
            if snap is None:
                return False
            if snap.tenant_id is None and spec.allowed_tenants and not snap.tenant_keys:
                return False
        return True

    @property
    def issuers(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def keys_expire_at(self, issuer: str) -> float | None:
        """Wall-clock time at which the oldest key set a token of ``issuer`` may be verified
        with passes ``max_key_age_s`` (checks then answer 503): 0.0 when an allowed tenant of a
        multi-tenant issuer has no key set; None when the issuer is not loaded."""
        spec, snap = self._specs.get(issuer), self._snapshots.get(issuer)
        if spec is None or snap is None:
            return None
        if snap.tenant_id is None and spec.allowed_tenants:
            if not spec.allowed_tenants <= snap.tenant_keys.keys():
                return 0.0
            return min(snap.tenant_fetched_at.values()) + spec.max_key_age_s
        return snap.fetched_at + spec.max_key_age_s

    # ----------------------------------------------------------------------------- lifecycle

    def adopt(self, previous: KeyStore) -> None:
        """Take over from the store this one replaces (config reload). Idempotent: called once
        before ``start`` and again at the swap, to catch up with what ``previous`` did meanwhile.

        For every issuer whose configuration did not change: the newer snapshot, and the
        refreshes in flight in ``previous`` (joined, not repeated: their keys land here too). For
        every issuer of the same name: the unknown-kid rate limits, so a reload grants no extra
        forced fetch.
        """
        for scope, last in previous._last_forced.items():
            if scope[0] in self._specs:
                self._last_forced[scope] = max(last, self._last_forced.get(scope, last))
        for name, spec in self._specs.items():
            if previous._specs.get(name) != spec:
                continue
            self._take_newer(name, previous._snapshots.get(name))
            for scope, task in list(previous._inflight.items()):
                if scope[0] == name and scope not in self._inflight and not self._closed:
                    self._track(scope, self._follow(previous, name, task))

    async def wait_refreshes(self) -> None:
        """Until the refreshes in flight now have ended (a check stops waiting for one after
        ``unknown_kid_wait_s``; this lets a caller see it through)."""
        inflight = list(self._inflight.values())
        if inflight:
            await asyncio.wait(inflight)

    async def start(self) -> None:
        """Fetch every issuer not loaded yet, concurrently. Never raises; see ``ready``."""
        names = [n for n in self._specs if n not in self._snapshots]
        await asyncio.gather(*(self.refresh(n) for n in names))

    def start_background(self) -> None:
        """Start the periodic refresh tasks (idempotent)."""
        if not self._background:
            self._background = [
                asyncio.create_task(self._refresh_loop(name), name=f"authz.keys:{name}")
                for name in self._specs
            ]

    async def close(self, *, drain: bool = True) -> None:
        """Stop the periodic refreshes at once; no fetch starts after this. With ``drain``, the
        refreshes in flight run to their end first, each bounded by its fetch timeout: a check may
        be awaiting one (e.g. on the state a config reload just replaced), and it gets the keys.
        Without ``drain``, or when the close itself is cancelled, they are cancelled (their
        callers then see no new keys, not a ``CancelledError``)."""
        self._closed = True
        loops, self._background = self._background, []
        for loop in loops:
            loop.cancel()
        inflight = list(self._inflight.values())
        try:
            if drain and inflight:
                await asyncio.wait(inflight)
        finally:
            tasks: list[asyncio.Task[Any]] = [*loops, *inflight]
            for task in tasks:
                task.cancel()  # a no-op on a task that is done
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------------------------- refresh

    async def refresh(self, issuer: str) -> str:
        """Fetch one issuer now (single-flight: joins a fetch in progress). Returns the result:
        "ok", "unchanged", "error" or "garbled"."""
        task = self._inflight.get((issuer, _WHOLE))
        if task is None:
            if self._closed:
                return "error"
            task = self._track((issuer, _WHOLE), self._refresh_now(issuer))
        return await _join(task)

    async def refresh_unknown_kid(self, issuer: str, tenant: str = "") -> bool:
        """The transport met an unknown ``kid`` in a token of ``issuer`` (tenant ``tenant``):
        refresh that key set, at most once per ``unknown_kid_min_interval_s`` (a fetch already in
        progress is joined for free), and wait for it at most ``unknown_kid_wait_s``. True when
        new keys were installed in time (worth checking the token again)."""
        scope = self._scope(issuer, tenant)
        if scope is None or not self.refresh_due(issuer, tenant):
            return False
        task = self._inflight.get((issuer, _WHOLE)) or self._inflight.get(scope)
        if task is None:
            self._last_forced[scope] = self._clock()
            coro = self._refresh_now(issuer) if scope[1] == _WHOLE else self._refresh_tenant(*scope)
            task = self._track(scope, coro)
        return await _join(task, self._unknown_kid_wait_s) == "ok"

    def refresh_due(self, issuer: str, tenant: str = "") -> bool:
        """Would ``refresh_unknown_kid`` fetch (or join a fetch in progress) right now? False
        lets a transport answer ``unknown_signing_key`` at once, without awaiting anything."""
        scope = self._scope(issuer, tenant)
        if scope is None:
            return False
        if (issuer, _WHOLE) in self._inflight or scope in self._inflight:
            return True
        if self._closed:
            return False
        last = self._last_forced.get(scope)
        interval = self._specs[issuer].unknown_kid_min_interval_s
        return last is None or self._clock() - last >= interval

    def _scope(self, issuer: str, tenant: str) -> _Scope | None:
        """The key set a token of ``issuer`` and ``tenant`` is verified with, as a refresh
        scope: one allowed tenant of a loaded multi-tenant issuer, else the whole issuer. None
        when no refresh could help (unknown issuer; a tenant the issuer does not accept)."""
        spec = self._specs.get(issuer)
        if spec is None:
            return None
        snap = self._snapshots.get(issuer)
        if snap is None or snap.tenant_id is not None or not spec.allowed_tenants:
            return (issuer, _WHOLE)
        return (issuer, tenant) if tenant in spec.allowed_tenants else None

    def _track(self, scope: _Scope, coro: Coroutine[Any, Any, str]) -> asyncio.Task[str]:
        """Run ``coro`` as the single-flight refresh of ``scope``."""
        label = ":".join(part for part in scope if part)
        task = asyncio.create_task(coro, name=f"authz.keys.refresh:{label}")
        self._inflight[scope] = task
        task.add_done_callback(lambda t: self._forget(scope, t))
        return task

    def _forget(self, scope: _Scope, task: asyncio.Task[str]) -> None:
        # Always ``task`` today: a scope gets a new task only when it has none (refresh, adopt
        # and the unknown-kid path check first; a finished task is joined until this runs). The
        # test keeps a later task of the scope from ever being dropped by an earlier one.
        if self._inflight.get(scope) is task:  # pragma: no branch
            del self._inflight[scope]

    async def _follow(self, previous: KeyStore, name: str, task: asyncio.Task[str]) -> str:
        """Await ``previous``'s refresh of ``name`` (in flight when this store adopted it) and
        take the snapshot it installed."""
        result = await _join(task)
        self._take_newer(name, previous._snapshots.get(name))
        return result

    def _take_newer(self, name: str, snap: KeySnapshot | None) -> None:
        """Install ``snap`` (from the store this one replaces) unless ours is newer."""
        mine = self._snapshots.get(name)
        if snap is not None and (mine is None or _newest(snap) >= _newest(mine)):
            self._snapshots[name] = snap

    def _observe(self, name: str, result: str, count: int) -> None:
        if self._observer is not None:
            try:
                self._observer.on_refresh(name, result, count)
            except Exception:
                log.exception("key refresh observer failed")

    async def _refresh_now(self, name: str) -> str:
        spec = self._specs[name]
        old = self._snapshots.get(name)
        failed: dict[str, KeyFetchError] = {}
        try:
            async with asyncio.timeout(spec.fetch_timeout_s * 4):
                new, failed = await self._fetch(spec)
        except KeyFetchError as e:
            result, count = e.result, 0 if old is None else len(old.keys)
            log.error(
                "signing keys for issuer %r not refreshed (%s); %s",
                name,
                e,
                "keeping the last good keys" if old else "no keys loaded yet",
            )
        except TimeoutError:  # pragma: no cover - a backstop, see below
            # Unreachable unless the event loop stalls: _fetch's two phases are each bounded
            # at 2 x fetch_timeout_s (the issuer's documents, then its tenants' in parallel).
            result, count = "error", 0 if old is None else len(old.keys)
            log.error("signing keys for issuer %r not refreshed: timed out", name)
        except Exception:
            result, count = "error", 0 if old is None else len(old.keys)
            log.exception("signing keys for issuer %r not refreshed: unexpected error", name)
        else:
            new = _keep_failed_tenants(new, self._snapshots.get(name), failed)
            count = len(new.keys)
            result = "unchanged" if old is not None and _same(old, new) else "ok"
            self._snapshots[name] = new  # the atomic swap
            if result == "ok":
                log.info("signing keys for issuer %r loaded: %d key(s)", name, count)
            for tid, err in sorted(failed.items()):
                log.error(
                    "signing keys for tenant %s of issuer %r not refreshed (%s); %s",
                    tid,
                    name,
                    err,
                    "keeping its last good keys" if tid in new.tenant_keys else "no keys yet",
                )
                self._observe(name, err.result, count)  # counted; the issuer itself refreshed
        # A failed tenant retries with the issuer's backoff too (the next whole refresh).
        ok = result in _OK and not failed
        self._failures[name] = 0 if ok else self._failures.get(name, 0) + 1
        self._observe(name, result, count)
        return result

    async def _refresh_tenant(self, name: str, tid: str) -> str:
        """Refresh one allowed tenant's key set of a loaded multi-tenant issuer (the unknown-kid
        path: its own budget, its own failure; the other tenants' keys are not touched)."""
        spec, template = self._specs[name], self._snapshots[name]
        old = template.tenant_keys.get(tid)
        try:
            keys = await self._tenant_keys(spec, template, tid)
        except KeyFetchError as e:
            result = e.result
            log.error("signing keys for tenant %s of issuer %r not refreshed (%s)", tid, name, e)
        except Exception:
            result = "error"
            log.exception("signing keys for tenant %s of issuer %r: unexpected error", tid, name)
        else:
            result = "unchanged" if old is not None and _key_ids(old) == _key_ids(keys) else "ok"
            current = self._snapshots[name]  # a whole refresh may have landed meanwhile
            self._snapshots[name] = dataclasses.replace(
                current,
                tenant_keys=MappingProxyType({**current.tenant_keys, tid: keys}),
                tenant_fetched_at=MappingProxyType(
                    {**current.tenant_fetched_at, tid: self._wall_clock()}
                ),
            )
        self._observe(name, result, len(template.keys))
        return result

    async def _fetch(self, spec: IssuerSpec) -> tuple[KeySnapshot, dict[str, KeyFetchError]]:
        """A new snapshot, and the allowed tenants whose own key set could not be fetched (a
        multi-tenant issuer: each tenant fails alone, never the issuer)."""
        snap = build_snapshot(spec, await self._documents(spec), self._wall_clock())
        if snap.tenant_id is not None or not spec.allowed_tenants:
            return snap, {}
        tenants = sorted(spec.allowed_tenants)
        outcomes = await asyncio.gather(*(self._tenant_outcome(spec, snap, tid) for tid in tenants))
        sets = {t: o for t, o in zip(tenants, outcomes, strict=True) if isinstance(o, Mapping)}
        failed = {t: o for t, o in zip(tenants, outcomes, strict=True) if isinstance(o, Exception)}
        stamps = dict.fromkeys(sets, snap.fetched_at)
        return (
            dataclasses.replace(
                snap,
                tenant_keys=MappingProxyType(sets),
                tenant_fetched_at=MappingProxyType(stamps),
            ),
            failed,
        )

    async def _tenant_outcome(
        self, spec: IssuerSpec, template: KeySnapshot, tid: str
    ) -> Mapping[str, SigningKey] | KeyFetchError | None:
        """One tenant's part of a whole refresh: its key set, its failure, or None when a refresh
        of that tenant alone was in flight (joined: what it installed stays)."""
        joined = self._inflight.get((spec.name, tid))
        if joined is not None:
            await _join(joined)
            return None
        try:
            return await self._tenant_keys(spec, template, tid)
        except KeyFetchError as e:
            return e
        except Exception as e:
            log.exception(
                "signing keys for tenant %s of issuer %r: unexpected error", tid, spec.name
            )
            return FetchFailed(f"unexpected error ({type(e).__name__})")

    async def _documents(self, spec: IssuerSpec) -> dict[str, tuple[str, Mapping[str, SigningKey]]]:
        """``{version: (issuer, keys)}`` from the discovery documents of ``spec.tenant`` and the
        JWKS they point at (each distinct ``jwks_uri`` fetched once), for the accepted versions
        and v2 (key issuers). Bounded by two fetch timeouts (discovery, then JWKS)."""
        try:
            async with asyncio.timeout(spec.fetch_timeout_s * 2):
                return await self._read_documents(spec)
        except TimeoutError:
            raise FetchFailed(f"{spec.instance}/{spec.tenant}: timed out") from None

    async def _read_documents(
        self, spec: IssuerSpec
    ) -> dict[str, tuple[str, Mapping[str, SigningKey]]]:
        versions = sorted(spec.versions | {KEY_ISSUER_VERSION})
        docs = await _all(self._get(discovery_url(spec, v), spec) for v in versions)
        found = [
            parse_discovery(doc, v, instance=spec.instance)
            for v, doc in zip(versions, docs, strict=True)
        ]
        uris = sorted({uri for _, uri in found})
        bodies = dict(zip(uris, await _all(self._get(u, spec) for u in uris), strict=True))
        return {
            v: (issuer, parse_jwks(bodies[uri], v))
            for v, (issuer, uri) in zip(versions, found, strict=True)
        }

    async def _tenant_keys(
        self, spec: IssuerSpec, template: KeySnapshot, tid: str
    ) -> Mapping[str, SigningKey]:
        """One allowed tenant's own key set (multi-tenant issuers), from its tenant-specific
        documents, which must name exactly the issuer the template gives for that tenant."""
        documents = await self._documents(dataclasses.replace(spec, tenant=tid))
        for v, (issuer, _) in documents.items():
            expected = template.issuers[v].replace(_TEMPLATE, tid)
            if issuer != expected:
                raise GarbledDiscovery(
                    f"issuer {spec.name!r}: tenant {tid}'s document names {issuer!r}, "
                    f"not {expected!r}"
                )
        return MappingProxyType(merge_keys({v: keys for v, (_, keys) in documents.items()}))

    async def _get(self, url: str, spec: IssuerSpec) -> bytes:
        try:
            async with self._client.stream(
                "GET",
                url,
                timeout=spec.fetch_timeout_s,
                follow_redirects=False,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status_code != 200:
                    raise FetchFailed(f"GET {url}: HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchFailed(f"GET {url}: body over {MAX_DOCUMENT_BYTES} bytes")
                return bytes(body)
        except (httpx.HTTPError, OSError) as e:
            raise FetchFailed(f"GET {url}: {describe_fetch_error(e)}") from None

    async def _refresh_loop(self, name: str) -> None:
        spec = self._specs[name]
        while True:
            loaded = name in self._snapshots
            delay, jitter = retry_delay(spec, self._failures.get(name, 0), loaded)
            await self._sleep(max(0.1, delay + self._rand(-jitter, jitter)))
            await self.refresh(name)


def _newest(snap: KeySnapshot) -> float:
    return max([snap.fetched_at, *snap.tenant_fetched_at.values()])


def _keep_failed_tenants(
    new: KeySnapshot, current: KeySnapshot | None, failed: Mapping[str, KeyFetchError]
) -> KeySnapshot:
    """``new`` with the last good key set (and its fetch time) of every tenant that failed in
    this refresh or was refreshed alone meanwhile, from ``current``, the snapshot installed now."""
    if current is None or new.tenant_id is not None:
        return new
    keep = [t for t in current.tenant_keys if t in failed or t not in new.tenant_keys]
    if not keep:
        return new
    sets, stamps = dict(new.tenant_keys), dict(new.tenant_fetched_at)
    for tid in keep:
        sets[tid] = current.tenant_keys[tid]
        stamps[tid] = current.tenant_fetched_at.get(tid, current.fetched_at)
    return dataclasses.replace(
        new, tenant_keys=MappingProxyType(sets), tenant_fetched_at=MappingProxyType(stamps)
    )
