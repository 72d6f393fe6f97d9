"""Rate-limit counters shared through Redis: local counting, batched asynchronous sync
(Limitador's "cached" mode is the model).

The check path counts in ``authz.policy.ratelimit.Counters`` and never waits for Redis. Every
``redis.sync_interval_seconds`` (default 0.1 s) this task sends, in one pipelined round trip,
``INCRBY <key> <local increments>`` + ``PEXPIRE`` for every counter that moved, ``GET`` of every
counter it pushed in the round before (so it also learns what others pushed after it), and
``GET`` of the previous window of every counter new since the last sync; the totals Redis
answers (everyone's counts) become the counters' ``base``. So each replica decides on the
global count as of its last sync plus its own increments since.

Overshoot bound: with N replicas (processes), at most the increments each of them admits between
two of its syncs (one interval + one round trip) can be admitted beyond the limit,
``<= N x local increments per sync interval`` (docs/rate-limiting.md;
``authz_ratelimit_max_unsynced_increments`` reports this process's share).

Redis keys: ``<prefix>rl:<sha256(api, route, limit, period, key value)[:32]>:<window>`` (no
user or tenant id in Redis), expiring two periods after their window starts.

When Redis fails (``authz.state.redisconn``): the increments stay pending locally and the
decisions go on with the last known totals plus local counts; once Redis is back the pending
increments are pushed, and each replica converges on a counter's global total at the latest
when it next counts a request for it (its push answers the total; the bound above covers what
it admits meanwhile). With nothing to send it PINGs every second, so ``authz_redis_up`` follows
Redis even when idle. Without Redis the task only prunes windows that are over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis

from authz.policy.ratelimit import CounterKey, Counters
from authz.state.redisconn import RedisLink

__all__ = ["RateLimitSync", "SyncObserver", "redis_key"]

log = logging.getLogger("authz.ratelimit")

PRUNE_EVERY_S = 1.0
PING_EVERY_S = 1.0  # with nothing to send, still notice a lost (or returned) Redis this soon


class SyncObserver(Protocol):
    def on_ratelimit_sync(self, result: str, max_delta: int, counters: int) -> None: ...


def redis_key(link: RedisLink, key: CounterKey) -> str:
    (api, route, name, period), value, window = key
    digest = hashlib.sha256(
        f"{api}\x1f{route}\x1f{name}\x1f{period}\x1f{value}".encode()
    ).hexdigest()
    return link.key("rl", digest[:32], str(window))


def _prev(key: CounterKey) -> CounterKey:
    return (key[0], key[1], key[2] - 1)


class RateLimitSync:
    """The background task that keeps ``counters`` in step with Redis (or just prunes them)."""

    def __init__(
        self,
        counters: Counters,
        link: RedisLink | None,
        *,
        interval_s: float,
        observer: SyncObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.counters = counters
        self.link = link
        self.interval_s = interval_s
        self._observer = observer
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._last_prune = 0.0
        self._recent: list[CounterKey] = []  # pushed in the last round: read back in this one
        self._last_contact = 0.0  # time.monotonic() of the last round trip (or attempt)
        self.max_delta = 0  # the most increments one counter held between two syncs

    async def sync_once(self) -> str:
        """One exchange with Redis. Returns ok, idle (nothing to send), down or local."""
        now = self._clock()
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            self.counters.prune(now)
        if self.link is None:
            return "local"
        pending, new = self.counters.take_pending()
        pushed = {key for key, _ in pending}
        refresh = [key for key in self._recent if key not in pushed]
        reads = refresh + [_prev(key) for key in new]
        link = self.link
        if not pending and not reads:
            self._recent = []
            if time.monotonic() - self._last_contact >= PING_EVERY_S:
                self._last_contact = time.monotonic()
                if not await link.ping():
                    return "down"
            return "idle"
        self._last_contact = time.monotonic()
        keys = [redis_key(link, key) for key, _ in pending]
        read_keys = [redis_key(link, key) for key in reads]
        ttls = [int(key[0][3] * 2000 + 1000) for key, _ in pending]

        async def exchange(client: aioredis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for rkey, (_, delta), ttl in zip(keys, pending, ttls, strict=True):
                pipe.incrby(rkey, delta)
                pipe.pexpire(rkey, ttl)
            for rkey in read_keys:
                pipe.get(rkey)
            return list(await pipe.execute())

        answers = await link.call("ratelimit_sync", exchange)
        if answers is None:
            for key, delta in pending:
                self.counters.restore(key, delta)
            self.counters.renew(new)
            self._recent = refresh  # read them back once Redis answers again
            return "down"
        self._apply(pending, reads, answers)
        self._recent = [key for key, _ in pending]
        return "ok"

    def _apply(
        self,
        pending: Sequence[tuple[CounterKey, int]],
        reads: Sequence[CounterKey],
        answers: Sequence[Any],
    ) -> None:
        counters = self.counters
        for i, (key, delta) in enumerate(pending):
            counters.settle(key, delta, int(answers[2 * i]))
            self.max_delta = max(self.max_delta, delta)
        base = 2 * len(pending)
        for j, key in enumerate(reads):
            raw = answers[base + j]
            if raw is not None:
                counters.observe(key, int(raw))

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                result = await self.sync_once()
                if self._observer is not None:
                    self._observer.on_ratelimit_sync(result, self.max_delta, len(self.counters))
            except Exception:  # a bug here must not stop the sync: log it, try again
                log.exception("rate-limit sync failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="authz.ratelimit:sync")

    async def stop(self) -> None:
        """Stop the loop, then push what is still pending once (best effort)."""
        if self._task is None:
            return
        self._stop.set()
        await self._task
        self._task = None
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.sync_once()
