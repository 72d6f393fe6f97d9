"""The Redis connection: a redis.asyncio client (hiredis parser) built from ``redis:`` settings,
and its health as an operator sees it.

``RedisLink.call(op, fn)`` runs one operation (usually a pipeline) and never raises for Redis
trouble: on a connection error, timeout, auth failure or Redis error it returns ``None``, marks
the link down and waits before trying again (backoff 0.1 s doubling to 5 s, reset on success).
The first failure logs one line and sets ``authz_redis_up 0``; the first success after it logs
one line and sets it back to 1; every failure counts in ``authz_redis_errors_total{op}``. The
callers (background tasks) keep working on local state meanwhile.

redis-py's own retries are off (``Retry(NoBackoff(), 0)``): the backoff here decides when to
try again, and a caller is never held up by hidden retries. The password comes from
``password`` or is read from ``password_file`` for every new connection (a rotated secret file
is picked up). TLS: ``rediss://`` with ``tls_ca_file`` as the trust anchor (else the system's).
Works with Redis 7 and Valkey. Sentinel and Cluster are not wired (see docs/rate-limiting.md).

Never logs the password; the URL carries no credentials (config rejects ``user:pass@``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import RedisError

from authz.config import RedisSettings

__all__ = ["REDIS_ERRORS", "RedisLink", "RedisObserver", "build_client"]

log = logging.getLogger("authz.redis")

T = TypeVar("T")

# Everything a Redis round trip can raise that means "Redis is not usable right now".
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, EOFError)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class RedisObserver(Protocol):
    def on_redis_state(self, up: bool) -> None: ...
    def on_redis_error(self, op: str) -> None: ...


class _FileCredentials(CredentialProvider):
    """Username + the password read from a file, at every new connection."""

    def __init__(self, username: str, path: str) -> None:
        self._username = username
        self._path = Path(path)

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._path.read_text(encoding="utf-8").strip()
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def build_client(s: RedisSettings) -> aioredis.Redis:
    """The redis.asyncio client for ``s`` (no connection is made until the first command)."""
    kw: dict[str, Any] = {
        "socket_timeout": s.timeout_s,
        "socket_connect_timeout": s.connect_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "decode_responses": False,
    }
    if s.password_file:
        kw["credential_provider"] = _FileCredentials(s.username, s.password_file)
    else:
        if s.username:
            kw["username"] = s.username
        if s.password:
            kw["password"] = s.password
    if s.url.startswith("rediss://") and s.tls_ca_file:
        kw["ssl_ca_certs"] = s.tls_ca_file
    return aioredis.Redis.from_url(s.url, **kw)


class RedisLink:
    """One client and its up/down state. Reusable by every task that shares state via Redis."""

    def __init__(
        self,
        settings: RedisSettings,
        observer: RedisObserver | None = None,
        *,
        client: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client if client is not None else build_client(settings)
        self._observer = observer
        self._clock = clock
        self.up: bool | None = None  # None: not tried yet
        self._backoff = 0.0
        self._next_try = 0.0

    def key(self, *parts: str) -> str:
        """A key under the configured prefix: ``<prefix><part>:<part>...``."""
        return self.settings.key_prefix + ":".join(parts)

    @property
    def waiting(self) -> bool:
        """True while backing off after a failure (``call`` would not try)."""
        return self.up is False and self._clock() < self._next_try

    async def call(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
        """``await fn(client)``; None if Redis failed (or we are backing off after a failure)."""
        if self.waiting:
            return None
        try:
            result = await fn(self.client)
        except REDIS_ERRORS as exc:
            self._failed(op, exc)
            return None
        self._succeeded()
        return result

    async def ping(self) -> bool:
        return bool(await self.call("ping", lambda c: c.ping()))

    def _failed(self, op: str, exc: BaseException) -> None:
        self._backoff = (
            BACKOFF_FIRST_S if self.up is not False else min(self._backoff * 2, BACKOFF_MAX_S)
        )
        self._next_try = self._clock() + self._backoff
        if self._observer is not None:
            self._observer.on_redis_error(op)
        if self.up is not False:
            log.warning(
                "redis unavailable (%s during %s): deciding on local state until it returns",
                type(exc).__name__,
                op,
                extra={"error": type(exc).__name__},
            )
            self.up = False
            if self._observer is not None:
                self._observer.on_redis_state(False)

    def _succeeded(self) -> None:
        if self.up is not True:
            if self.up is False:
                log.warning("redis available again: shared state converging")
            else:
                log.info("redis connected")
            self.up = True
            self._backoff = 0.0
            if self._observer is not None:
                self._observer.on_redis_state(True)

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.aclose()
