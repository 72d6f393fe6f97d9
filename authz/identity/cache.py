"""A bounded, time-limited cache of verified token identities, keyed by ``sha256(token)``.

What is cached is the *API-independent* result of a verification: the ``Principal`` (its
``provider`` names the issuer that vouched for it) and the ``kid`` of the key that signed it.
Everything that depends on the API asking (is this issuer one of the API's, is ``aud`` one of its
audiences, the scp/roles policy) is re-checked on every hit by ``authz.identity.entra``, as is
"is the signing key still in the issuer's current key snapshot, with the same key material" (so
tokens signed by a retired or replaced key stop passing as soon as a refresh drops or changes it).

An entry lives at most ``min(exp + clock skew, now + max_ttl_s)``; the cache holds at most
``max_entries`` entries and evicts the least recently used. Denials are never cached.

Shaped for the cyclic garbage collector (docs/performance.md, "Many users and the GC"): a full
cache is the largest set of long-lived objects in the process, and every full collection walks
each GC-tracked object in it. So an entry is ONE tracked object of its own (a slotted
``CachedIdentity`` that carries its deadline: no ``(deadline, value)`` tuple around it) beside
the ``Principal`` it holds, and nothing in an entry refers back to the cache (no reference cycle:
an evicted entry is freed by reference counting at once, even when ``gc.freeze()`` has moved it
to the permanent generation).

Pure module: no grpc, prometheus, asyncio or network imports. Not locked: used from one event
loop thread (each worker process has its own cache).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from authz.policy.model import Principal

__all__ = ["CachedIdentity", "ClaimsCache"]


@dataclass(frozen=True, slots=True)
class CachedIdentity:
    principal: Principal
    kid: str  # the signing key; the entry is void once the issuer's snapshot drops it
    # ... or once that kid names different key material (a JWKS may republish a kid).
    fingerprint: tuple[str, str] = ("", "")
    deadline: float = math.inf  # wall clock; set by ``ClaimsCache.put``


class ClaimsCache:
    """LRU of ``sha256(token).digest() -> CachedIdentity`` with per-entry deadlines.

    ``hits``, ``misses`` and ``len()`` feed the metrics (``Service.sync_cache_metrics``).
    """

    __slots__ = ("_clock", "_entries", "evictions", "hits", "max_entries", "max_ttl_s", "misses")

    def __init__(
        self,
        max_entries: int,
        max_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1 or max_ttl_s <= 0:
            raise ValueError("a ClaimsCache needs max_entries >= 1 and max_ttl_s > 0")
        self.max_entries = max_entries
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, CachedIdentity] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedIdentity | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        if self._clock() >= value.deadline:
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(
        self,
        key: bytes,
        principal: Principal,
        kid: str,
        fingerprint: tuple[str, str],
        valid_until: float,
    ) -> CachedIdentity | None:
        """Store the identity until ``valid_until`` (wall clock, e.g. ``exp + skew``), capped by
        ``max_ttl_s`` from now; returns the entry. Nothing is stored (None) when that deadline
        has already passed."""
        now = self._clock()
        deadline = min(valid_until, now + self.max_ttl_s)
        if deadline <= now:
            return None
        entries = self._entries
        value = entries[key] = CachedIdentity(principal, kid, fingerprint, deadline)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evictions += 1
        return value

    def clear(self) -> None:
        self._entries.clear()
