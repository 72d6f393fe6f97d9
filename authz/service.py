"""The running service, transport-independent: the current engine, its keys, and one async
``check`` that both transports call.

``Service.check`` is the only place where the pure engine meets I/O: on ``unknown_signing_key`` it
asks the key store for a single-flight, rate-limited refresh of that issuer and decides once more;
it records metrics and the audit line; and it turns any unexpected exception into the explicit
503 ``internal_error`` deny (fail closed, nothing left to Envoy's ``failure_mode_allow``).

A reload parses and validates the new file completely, builds a new key store (reusing the
snapshots of unchanged issuers, fetching new ones), a new verifier and engine, and swaps the
``_State`` reference in one assignment: a check in flight keeps the state it started with. The
old key store is closed in the background: its periodic refreshes stop at once, and a refresh in
flight (such a check may be awaiting it) finishes first; the new store joins that refresh and
keeps the unknown-kid rate limit.

Rate limits are decided by the engine on ``self.counters`` (local, synchronous); the
``RateLimitSync`` task beside it shares them through Redis when ``redis:`` is configured
(``authz.state``). Both live as long as the service: a reload keeps the counts.

Revocation rules live beside the configuration, not in it: one ``RevocationStore`` for the life
of the service, read by every engine it builds (``store.current``), fed by the file
(``FileFeed``, polled; re-read on SIGHUP) and written by the admin API. A reload that changes
the ``revocation:`` section reads the new file first and fails whole if it is bad. With the
admin API enabled, a second engine decides the admin requests: the same verifier, keys and
revocations, one synthetic API (``revocation.admin_api``) whose only rule is the app role.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import httpx

from authz import config as config_mod
from authz.config import Settings
from authz.engine import Engine, new_decision_id
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.identity.fetch import key_fetch_client
from authz.identity.keys import KeyStore
from authz.observability import AuditLog, Metrics
from authz.policy.decisions import internal_error
from authz.policy.model import ApiSpec, Clause, Decision, RequestAttrs, Requirement
from authz.policy.ratelimit import Counters
from authz.revocation import (
    FILE_SOURCE,
    FileFeed,
    Prepared,
    RevocationFileError,
    RevocationStore,
)
from authz.state.ratelimit_sync import RateLimitSync
from authz.state.redisconn import RedisLink
from authz.state.revocation_feed import RedisFeed

log = logging.getLogger("authz.service")


@dataclass(frozen=True, slots=True)
class _State:
    settings: Settings
    keys: KeyStore
    cache: ClaimsCache | None
    engine: Engine
    admin: Engine | None = None  # decides admin API requests (revocation.admin_api)


ADMIN_API = "authz-admin"  # the synthetic API of the admin listener's protected endpoints


def admin_api_spec(settings: Settings) -> ApiSpec | None:
    """``revocation.admin_api`` as an API whose every request needs the configured app role."""
    a = settings.revocation.admin_api
    if not a.enabled:
        return None
    return ApiSpec(
        name=ADMIN_API,
        audiences=a.audiences,
        issuers=a.issuers,
        routes=(),
        default=Requirement(any_of=(Clause(roles_any=frozenset({a.role})),)),
        realm=ADMIN_API,
    )


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        audit: AuditLog,
        config_path: str | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.metrics = metrics
        self.audit = audit
        self.config_path = config_path
        self._client = http_client or key_fetch_client(settings.tokens.ca_bundle)
        self._owns_client = http_client is None
        # Shared state: rate-limit counters live as long as the service (a reload keeps them),
        # synced with Redis when one is configured. ``redis:`` is read once, at start.
        self.counters = Counters(shared=settings.redis.enabled)
        self.redis = RedisLink(settings.redis, metrics) if settings.redis.enabled else None
        if self.redis is not None:
            metrics.enable_redis()
        self.ratelimit_sync = RateLimitSync(
            self.counters,
            self.redis,
            interval_s=settings.redis.sync_interval_s,
            observer=metrics,
        )
        self.revocations = RevocationStore(audit=audit.event, observer=metrics)
        self.revocation_file: FileFeed | None = self._feed(settings)
        if self.revocation_file is not None:
            self.revocation_file.load_now()  # a bad file: RevocationFileError, no start
        # The shared source (``revocation.redis``), like ``redis:``, is read once, at start.
        self.revocation_redis: RedisFeed | None = None
        if settings.revocation.redis and self.redis is not None:
            self.revocation_redis = RedisFeed(
                settings.revocation, self.revocations, self.redis, observer=metrics
            )
        self._state = self._build(settings, previous=None)
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._config_stamp = _stamp(config_path)
        self.shutting_down = False

    # ---------------------------------------------------------------------------- construction

    def _build(self, settings: Settings, previous: KeyStore | None) -> _State:
        keys = KeyStore(
            settings.issuers,
            self._client,
            observer=self.metrics,
            unknown_kid_wait_s=settings.tokens.unknown_kid_wait_s,
        )
        if previous is not None:
            keys.adopt(previous)
        t = settings.tokens
        cache = (
            ClaimsCache(t.cache_max_entries, t.cache_max_ttl_s)
            if t.cache_max_entries > 0 and t.cache_max_ttl_s > 0
            else None
        )
        verifier = TokenVerifier(t, {s.name: s for s in settings.issuers}, keys, cache=cache)
        engine = Engine(settings, verifier, counters=self.counters, revocations=self.revocations)
        spec = admin_api_spec(settings)
        admin = None
        if spec is not None:
            admin_settings = dataclasses.replace(settings, apis=(spec,))
            admin = Engine(admin_settings, verifier, revocations=self.revocations)
        return _State(settings, keys, cache, engine, admin)

    def _feed(self, settings: Settings) -> FileFeed | None:
        if not settings.revocation.file:
            return None
        return FileFeed(settings.revocation, self.revocations, observer=self.metrics)

    @property
    def settings(self) -> Settings:
        return self._state.settings

    @property
    def ready(self) -> bool:
        return not self.shutting_down and self._state.keys.ready

    async def start(self) -> None:
        await self._state.keys.start()
        self._state.keys.start_background()
        if self.redis is not None and not await self.redis.ping():
            log.warning("redis not reachable at start: rate limits count per process until it is")
        self.ratelimit_sync.start()
        if self.revocation_file is not None:
            self.revocation_file.start_background()
        if self.revocation_redis is not None:
            if not await self.revocation_redis.refresh(force=True, via="startup"):
                log.warning(
                    "revocation rules in redis not read at start: none of them in force until "
                    "redis answers"
                )
            self.revocation_redis.start_background()
        self.revocations.start_background()
        self.metrics.config_last_success.set(time.time())
        self.metrics.ready.set(1 if self.ready else 0)

    async def close(self) -> None:
        """Shutdown: the checks are answered by now, so refreshes still in flight are cancelled
        (no waiting on a slow IdP past the grace period); then the HTTP client is closed."""
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.ratelimit_sync.stop()
        if self.redis is not None:
            await self.redis.close()
        if self.revocation_file is not None:
            await self.revocation_file.close()
        if self.revocation_redis is not None:
            await self.revocation_redis.close()
        await self.revocations.close()
        await self._state.keys.close(drain=False)
        if self._owns_client:
            await self._client.aclose()

    # ---------------------------------------------------------------------------------- check

    def check_now(self, attrs: RequestAttrs) -> Decision | None:
        """Decide without awaiting: the decision (recorded), or None when the token's key is
        unknown and a refresh may be due — then ``check`` must run (it awaits the refresh)."""
        start = time.perf_counter()
        try:
            decision = self._state.engine.check(attrs)
            if decision.refresh_issuer and self._state.keys.refresh_due(
                decision.refresh_issuer, decision.refresh_tenant
            ):
                return None
        except Exception:
            decision = self._internal_error(attrs)
        self._record(attrs, decision, time.perf_counter() - start)
        return decision

    async def check(self, attrs: RequestAttrs) -> Decision:
        start = time.perf_counter()
        state = self._state
        try:
            decision = state.engine.check(attrs)
            # Awaited for at most tokens.unknown_kid_wait_seconds: a slower refresh (a hanging
            # issuer) goes on in the background and this check is answered unknown_signing_key
            # (401) before Envoy times out; the next check sees the keys. A refresh cancelled
            # under us (its store closed) reads as "no new keys" too (KeyStore: ``_join``).
            if decision.refresh_issuer and await state.keys.refresh_unknown_kid(
                decision.refresh_issuer, decision.refresh_tenant
            ):
                decision = state.engine.check(attrs)
        except Exception:
            decision = self._internal_error(attrs)
        self._record(attrs, decision, time.perf_counter() - start)
        return decision

    @property
    def admin_api_enabled(self) -> bool:
        return self._state.admin is not None

    async def check_admin(self, attrs: RequestAttrs) -> Decision:
        """Decide an admin API request with our own engine (the configured app role); the
        same unknown-kid refresh as ``check``; never raises. Not counted as a check."""
        state = self._state
        try:
            if state.admin is None:
                raise RuntimeError("the admin API is not enabled")
            decision = state.admin.check(attrs)
            if decision.refresh_issuer and await state.keys.refresh_unknown_kid(
                decision.refresh_issuer, decision.refresh_tenant
            ):
                decision = state.admin.check(attrs)
        except Exception:
            decision = self._internal_error(attrs)
        return decision

    def _internal_error(self, attrs: RequestAttrs) -> Decision:
        log.exception("check failed; denying with internal_error")
        self.metrics.internal_errors.labels("service").inc()
        return internal_error(new_decision_id(), attrs.request_id)

    def _record(self, attrs: RequestAttrs, decision: Decision, elapsed: float) -> None:
        self.metrics.record_check(decision, elapsed)
        self.audit.record(attrs, decision, elapsed)

    def housekeeping(self) -> None:
        """Periodic, off the check path: fold cache counters into metrics, flush the audit log."""
        self.sync_cache_metrics()
        self.sync_key_metrics()
        self.metrics.sync_ratelimit(self.counters.limited, len(self.counters))
        self.audit.flush()

    def sync_key_metrics(self) -> None:
        """When each issuer's oldest key set passes its maximum age (0: a key set is missing)."""
        keys = self._state.keys
        for name in keys.issuers:
            self.metrics.jwks_keys_expiry.labels(name).set(keys.keys_expire_at(name) or 0.0)

    def sync_cache_metrics(self) -> None:
        cache = self._state.cache
        if cache is not None:
            self.metrics.sync_cache(cache.hits, cache.misses, len(cache))

    # --------------------------------------------------------------------------------- reload

    def config_changed(self) -> bool:
        """True when the file (or the symlink chain a ConfigMap mount swaps) changed."""
        return self.config_path is not None and _stamp(self.config_path) != self._config_stamp

    async def reload(self) -> bool:
        """Load, validate and warm a new configuration, then swap. Never drops the old one on
        failure. Returns True if the new configuration is now serving."""
        if self.config_path is None:
            return False
        async with self._reload_lock:
            stamp = _stamp(self.config_path)
            try:
                # parsed in a thread: a huge or slow file never holds up the checks on this loop
                settings = await asyncio.to_thread(config_mod.load, self.config_path)
                feed, prepared = await self._prepare_feed(settings)
                new = self._build(settings, previous=self._state.keys)
                await new.keys.start()
                if not new.keys.ready:
                    await new.keys.close(drain=False)
                    raise RuntimeError("signing keys for the new configuration could not be loaded")
            except (config_mod.ConfigError, RevocationFileError) as e:
                self._config_stamp = stamp
                self.metrics.reloads.labels("invalid").inc()
                log.error("config reload rejected; still serving the previous one:\n%s", e)
                return False
            except Exception as e:
                self._config_stamp = stamp
                self.metrics.reloads.labels("error").inc()
                log.error("config reload failed; still serving the previous one: %s", e)
                return False
            old = self._state
            new.keys.adopt(old.keys)  # what the old store fetched while the new one warmed up
            new.keys.start_background()
            await self._swap_feed(feed, prepared)
            self._state = new  # the atomic swap: checks in flight finish on `old`
            self._config_stamp = stamp
            self.metrics.reloads.labels("ok").inc()
            self.metrics.config_last_success.set(time.time())
            for w in settings.warnings:
                log.warning("config: %s", w)
            if settings.tokens.ca_bundle != old.settings.tokens.ca_bundle:
                # the key-fetch client (proxies, CA bundle) is built once, at start
                log.warning("config: tokens.ca_bundle changed; it takes effect at the next restart")
            if settings.redis != old.settings.redis or (
                settings.revocation.redis != old.settings.revocation.redis
            ):
                log.warning("config: the redis section changed; it takes effect at restart")
            log.info("configuration reloaded from %s", self.config_path)
        self._retire(old.keys)
        return True

    async def _prepare_feed(self, settings: Settings) -> tuple[FileFeed | None, Prepared | None]:
        """For a reload: the file feed the new settings need, its file read and validated
        (not yet in force), or (current feed, None) when the section did not change."""
        if settings.revocation == self.settings.revocation:
            return self.revocation_file, None
        feed = self._feed(settings)
        prepared = None if feed is None else await asyncio.to_thread(feed.prepare)
        return feed, prepared

    async def _swap_feed(self, feed: FileFeed | None, prepared: Prepared | None) -> None:
        old = self.revocation_file
        if feed is old:
            if old is not None:  # SIGHUP or a config change: look at the file now too
                await old.refresh(force=True, via="reload")
            return
        if old is not None:
            await old.close()
        self.revocation_file = feed
        if feed is None:
            await self.revocations.replace_async(FILE_SOURCE, (), via="reload")
        elif prepared is not None:
            await feed.commit_async(prepared, via="reload")
            feed.start_background()

    def _retire(self, keys: KeyStore) -> None:
        """Close a replaced key store without holding up the reload (``close`` awaits it)."""
        task = asyncio.create_task(keys.close(), name="authz.keys:retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def _stamp(path: str | None) -> tuple[str, int, int, int] | None:
    """Identity of a config file: resolved target, inode, mtime and size. Kubernetes swaps a
    ConfigMap by re-pointing a ``..data`` symlink, which changes the resolved path."""
    if path is None:
        return None
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return ("", 0, 0, 0)
    return (real, st.st_ino, st.st_mtime_ns, st.st_size)
