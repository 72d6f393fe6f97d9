"""The shared revocation source: rules kept in Redis, the same on every replica and worker.

Layout under the ``redis.key_prefix`` (default ``authz:``):

    <prefix>revocation:rules     a hash: rule id -> the rule as JSON (the file's fields)
    <prefix>revocation:version   a counter, incremented (in the same MULTI) by every change

Every process polls the version every ``revocation.redis_poll_interval_seconds`` (default 0.2 s:
one GET); when it moved, it reads the hash, validates every rule (the file's rules and
``max_rule_lifetime_seconds``) and swaps the store's ``redis`` source (snapshot built in a
thread). A change therefore reaches every replica within the poll interval plus the build.
Polling a version key rather than pub/sub: nothing is lost when a subscriber reconnects, and
a replica that was away catches up at its first successful poll.

Failure behaviour (never on the check path, which reads ``store.current`` only):
- Redis unreachable: the last rules read stay in force; ``authz_redis_up 0`` and one log line
  (``RedisLink``); the admin API answers 503 (a rule it cannot store is not acknowledged).
- A hash entry that is not a valid rule: the whole read is rejected and the last good rules
  stay (fail closed: skipping it would un-revoke someone), ``authz_revocation_reloads_total
  {source="redis",result="invalid"}`` and a log line naming the rule id.
- Expired rules are dropped from the snapshot and deleted from the hash by whoever sees them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from authz.config import RevocationSettings
from authz.policy.revocation import RevocationRule
from authz.revocation import (
    PollingFeed,
    ReloadObserver,
    RevocationFileError,
    RevocationStore,
    UnknownRule,
    rules_from_document,
)
from authz.state.redisconn import RedisLink

__all__ = ["REDIS_SOURCE", "RedisFeed", "RedisUnavailable"]

log = logging.getLogger("authz.revocation")

REDIS_SOURCE = "redis"


class RedisUnavailable(Exception):
    """Redis did not take the change (down, or backing off after a failure)."""


class RedisFeed(PollingFeed):
    """Keeps the store's ``redis`` source in step with Redis, and writes to it."""

    def __init__(
        self,
        settings: RevocationSettings,
        store: RevocationStore,
        link: RedisLink,
        *,
        observer: ReloadObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.link = link
        self._observer = observer
        self._clock = clock
        self.rules_key = link.key("revocation", "rules")
        self.version_key = link.key("revocation", "version")
        self._version: bytes | str | None = b"?"  # never read
        self.name, self.poll_interval_s = REDIS_SOURCE, settings.redis_poll_interval_s
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False, via: str = "poll") -> bool:
        """Read the rules if the version moved (or ``force``); True if new rules are in force."""
        async with self._lock:
            version = await self.link.call("revocation_poll", lambda c: c.get(self.version_key))
            if version is None and self.link.up is not True:
                return False  # Redis down: the last rules stay
            if version == self._version and not force:
                return False
            raw = await self.link.call("revocation_read", lambda c: c.hgetall(self.rules_key))
            if raw is None:
                return False
            try:
                rules, expired = self._parse(raw)
            except RevocationFileError as e:
                self._version = version
                self._count("invalid")
                log.error("revocation rules in Redis rejected; the previous rules stay:\n%s", e)
                return False
            self._version = version
            await self.store.replace_async(REDIS_SOURCE, rules, via=via)
            self._count("ok")
            if expired:
                await self.link.call("revocation_prune", lambda c: c.hdel(self.rules_key, *expired))
            return True

    def _parse(self, raw: dict[Any, Any]) -> tuple[list[RevocationRule], list[str]]:
        now = self._clock()
        docs: list[Any] = []
        problems: list[str] = []
        for key, value in sorted(raw.items()):
            rule_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            try:
                doc = json.loads(value)
            except (ValueError, UnicodeDecodeError):
                problems.append(f"{rule_id!r}: not JSON")
                continue
            if not isinstance(doc, dict) or doc.get("id") != rule_id:
                problems.append(f"{rule_id!r}: expected an object whose id is the hash field")
                continue
            docs.append(doc)
        if problems:
            raise RevocationFileError(problems, "redis")
        live, _ = rules_from_document(
            {"rules": docs},
            now=now,
            max_lifetime_s=self.settings.max_rule_lifetime_s,
            source="redis",
        )
        ids = {r.id for r in live}
        return live, [str(d["id"]) for d in docs if d["id"] not in ids]

    def _count(self, result: str) -> None:
        if self._observer is not None:
            self._observer.on_revocation_reload(REDIS_SOURCE, result)

    async def _write(self, change: Callable[[Any], Any]) -> list[Any] | None:
        """One change and the version bump in one MULTI; None if Redis did not take it."""

        async def run(c: Any) -> list[Any]:
            async with c.pipeline(transaction=True) as p:
                change(p)
                p.incr(self.version_key)
                result: list[Any] = await p.execute()
                return result

        return await self.link.call("revocation_write", run)

    async def add(self, rule: RevocationRule, *, via: str) -> None:
        """Store the rule in Redis (every replica sees it at its next poll) and here now."""
        body = json.dumps(rule.to_dict(), separators=(",", ":"))
        if await self._write(lambda p: p.hset(self.rules_key, rule.id, body)) is None:
            raise RedisUnavailable("redis did not take the rule")
        await self.refresh(force=True, via=via)

    async def remove(self, rule_id: str, *, via: str) -> RevocationRule:
        found = [r for s, r in self.store.find(rule_id) if s == REDIS_SOURCE]
        done = await self._write(lambda p: p.hdel(self.rules_key, rule_id))
        if done is None:
            raise RedisUnavailable("redis did not take the change")
        await self.refresh(force=True, via=via)
        if not done[0]:
            raise UnknownRule(rule_id)
        return found[0] if found else RevocationRule(id=rule_id, reason="", expires_at=0)
