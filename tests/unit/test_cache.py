"""ClaimsCache: TTL capped by the token's exp and max_ttl, LRU bound, stats, invalidation."""

from __future__ import annotations

import pytest

from authz.identity.cache import CachedIdentity, ClaimsCache
from authz.policy.model import Principal, TokenKind


def ident(provider: str = "contoso", exp: int = 2000) -> Principal:
    return Principal(
        tid="t",
        oid="o",
        sub="s",
        client_id="c",
        kind=TokenKind.USER,
        version="2.0",
        issuer="i",
        audience="a",
        provider=provider,
        expires_at=exp,
    )


FP = ("n", "e")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hit_miss_and_stats() -> None:
    clock = Clock()
    cache = ClaimsCache(10, 300, clock)
    assert cache.get(b"a") is None
    who = ident()
    stored = cache.put(b"a", who, "k1", FP, 2000)
    assert stored == CachedIdentity(who, "k1", FP, 1300.0)  # the deadline: now + max_ttl
    assert cache.get(b"a") is stored
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_lifetime_is_capped_by_max_ttl() -> None:
    clock = Clock()
    cache = ClaimsCache(10, 300, clock)
    cache.put(b"a", ident(), "k1", FP, 5000)
    clock.now = 1299
    assert cache.get(b"a") is not None
    clock.now = 1300
    assert cache.get(b"a") is None
    assert len(cache) == 0


def test_lifetime_is_capped_by_token_expiry() -> None:
    clock = Clock()
    cache = ClaimsCache(10, 300, clock)
    cache.put(b"a", ident(), "k1", FP, 1100)
    clock.now = 1100
    assert cache.get(b"a") is None


def test_already_expired_is_not_stored() -> None:
    cache = ClaimsCache(10, 300, Clock())
    assert cache.put(b"a", ident(), "k1", FP, 999) is None
    assert len(cache) == 0


def test_bounded_lru() -> None:
    cache = ClaimsCache(3, 300, Clock())
    for k in (b"a", b"b", b"c"):
        cache.put(k, ident(), "k1", FP, 2000)
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", ident(), "k1", FP, 2000)
    assert len(cache) == 3
    assert cache.get(b"b") is None  # the least recently used went
    assert cache.get(b"a") is not None
    assert cache.evictions == 1


def test_clear() -> None:
    cache = ClaimsCache(10, 300, Clock())
    cache.put(b"a", ident(), "k1", FP, 2000)
    cache.put(b"b", ident(), "k2", FP, 2000)
    cache.clear()
    assert len(cache) == 0
    assert cache.get(b"a") is None


@pytest.mark.parametrize(("entries", "ttl"), [(0, 300), (10, 0)], ids=["no-entries", "no-ttl"])
def test_rejects_useless_settings(entries: int, ttl: float) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ClaimsCache(entries, ttl)
