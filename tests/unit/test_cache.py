"""ClaimsCache: TTL capped by the token's exp and max_ttl, LRU bound, stats, invalidation."""

from __future__ import annotations

import pytest

from authz.identity.cache import CachedIdentity, ClaimsCache
from authz.policy.model import Principal, TokenKind


def ident(provider: str = "contoso", kid: str = "k1", exp: int = 2000) -> CachedIdentity:
    p = Principal(
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
    return CachedIdentity(p, kid)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hit_miss_and_stats() -> None:
    clock = Clock()
    cache = ClaimsCache(10, 300, clock)
    assert cache.get(b"a") is None
    value = ident()
    cache.put(b"a", value, 2000)
    assert cache.get(b"a") is value
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_lifetime_is_capped_by_max_ttl() -> None:
    clock = Clock()
    cache = ClaimsCache(10, 300, clock)
    cache.put(b"a", ident(), 5000)
    clock.now = 1299
    assert cache.get(b"a") is not None
    clock.now = 1300
    assert cache.get(b"a") is None
    assert len(cache) == 0


def test_lifetime_is_capped_by_token_expiry() -> None:
    clock = Clock()
    cache = ClaimsCache(10, 300, clock)
    cache.put(b"a", ident(), 1100)
    clock.now = 1100
    assert cache.get(b"a") is None


def test_already_expired_is_not_stored() -> None:
    cache = ClaimsCache(10, 300, Clock())
    cache.put(b"a", ident(), 999)
    assert len(cache) == 0


def test_bounded_lru() -> None:
    cache = ClaimsCache(3, 300, Clock())
    for k in (b"a", b"b", b"c"):
        cache.put(k, ident(), 2000)
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", ident(), 2000)
    assert len(cache) == 3
    assert cache.get(b"b") is None  # the least recently used went
    assert cache.get(b"a") is not None
    assert cache.evictions == 1


def test_clear() -> None:
    cache = ClaimsCache(10, 300, Clock())
    cache.put(b"a", ident(kid="k1"), 2000)
    cache.put(b"b", ident(kid="k2"), 2000)
    cache.clear()
    assert len(cache) == 0
    assert cache.get(b"a") is None


@pytest.mark.parametrize(("entries", "ttl"), [(0, 300), (10, 0)], ids=["no-entries", "no-ttl"])
def test_rejects_useless_settings(entries: int, ttl: float) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ClaimsCache(entries, ttl)
