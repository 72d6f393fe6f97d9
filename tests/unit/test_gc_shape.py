"""The claims cache under the cyclic GC (docs/performance.md, "Many users and the GC").

A full cache is the largest set of long-lived objects in the process and every full collection
walks each GC-tracked object in it, so what an entry costs the collector is counted here: the
number of tracked objects per entry, the claim sets shared between users, and that an evicted
entry is freed by reference counting even after ``gc.freeze()`` (no reference cycle). Counts,
never timings.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from authz.identity import entra
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.policy.model import TokenSettings
from authz.server.lifecycle import GC_THRESHOLDS, settle_heap

USERS = 300


def user_tokens(minter: Any, **claims: Any) -> list[str]:
    """Distinct users (own oid) with the same scopes; ``claims`` for every token."""
    return [minter.token(oid=f"00000000-0000-4000-8000-{i:012d}", **claims) for i in range(USERS)]


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Tests that freeze leave nothing frozen behind them."""
    yield
    gc.unfreeze()


@pytest.mark.parametrize(
    ("claims", "bound"),
    [
        # CachedIdentity (which carries its deadline), its Principal, the claims' read-only view.
        # Before: 9 (a (deadline, entry) tuple per entry, a new frozenset per claim set).
        ({}, 3),
        # ... plus the payload dict and its lists (JSON arrays), and the user's own groups set.
        # Before: 12.
        ({"groups": ["g-1", "g-2"], "roles": ["Orders.Admin"]}, 7),
    ],
    ids=["scp-only", "groups-and-roles"],
)
def test_an_entry_costs_the_collector_few_tracked_objects(
    memory_keys: Any,
    clock: list[float],
    env: SimpleNamespace,
    minter: Any,
    claims: dict[str, Any],
    bound: int,
) -> None:
    tokens = user_tokens(minter, **claims)
    cache = ClaimsCache(USERS, 300.0, clock=lambda: clock[0])
    verifier = TokenVerifier(
        TokenSettings(), env.ISSUERS, memory_keys, clock=lambda: clock[0], cache=cache
    )
    api = env.make_api()
    verifier.verify(tokens[0], api)  # the shared sets and the header exist before counting
    cache.clear()
    gc.collect()
    before = len(gc.get_objects())
    for t in tokens:
        verifier.verify(t, api)
    gc.collect()
    per_entry = (len(gc.get_objects()) - before) / USERS
    assert len(cache) == USERS
    assert per_entry <= bound + 0.05, per_entry


def test_users_share_claim_sets(
    memory_keys: Any, clock: list[float], env: SimpleNamespace, minter: Any
) -> None:
    verifier = TokenVerifier(TokenSettings(), env.ISSUERS, memory_keys, clock=lambda: clock[0])
    api = env.make_api()
    a, b = (
        verifier.verify(t, api)
        for t in user_tokens(minter, groups=["g-1"], roles=["Orders.Admin"])[:2]
    )
    assert a.scopes is b.scopes
    assert a.roles is b.roles
    assert a.groups is b.groups
    assert a.scopes == {"Orders.Read", "Orders.Write"}
    assert a.groups == {"g-1"}
    assert a.acrs is b.client_capabilities is entra._NO_STRINGS  # absent: the one empty set


def test_an_evicted_entry_is_freed_even_when_frozen(
    memory_keys: Any, clock: list[float], env: SimpleNamespace, minter: Any, unfrozen: None
) -> None:
    tokens = user_tokens(minter)
    cache = ClaimsCache(USERS, 300.0, clock=lambda: clock[0])
    verifier = TokenVerifier(
        TokenSettings(), env.ISSUERS, memory_keys, clock=lambda: clock[0], cache=cache
    )
    api = env.make_api()
    for t in tokens:
        verifier.verify(t, api)
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    cache.clear()  # every entry evicted: only reference counting can free a frozen object
    assert frozen - gc.get_freeze_count() >= 2 * USERS


def test_interned_sets_are_bounded_and_shared() -> None:
    sets: dict[object, frozenset[str]] = {}
    first = entra._frozen(sets, ("groups", "a"), ["a"])
    assert entra._frozen(sets, ("groups", "a"), ["a"]) is first
    assert entra._frozen(sets, ("groups",), []) is entra._NO_STRINGS
    for i in range(entra._MAX_INTERNED_SETS):
        entra._frozen(sets, ("groups", str(i)), [str(i)])
    assert len(sets) <= entra._MAX_INTERNED_SETS  # cleared when full, then refilled
    again = entra._frozen(sets, ("groups", "a"), ["a"])
    assert again == first


def test_settle_heap_freezes_what_start_up_built(unfrozen: None) -> None:
    gc.unfreeze()
    built = [{"config": i} for i in range(1000)]  # long-lived, like a compiled configuration
    saved = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*saved)
    assert gc.get_freeze_count() >= len(built)
    # A full collection now walks only what was allocated since: (nearly) nothing.
    assert len(gc.get_objects(generation=2)) < len(built)
    settle_heap()  # after a reload: unfreeze, collect, freeze again
    assert gc.get_freeze_count() >= len(built)


def test_the_check_path_makes_no_cyclic_garbage(
    memory_keys: Any, clock: list[float], env: SimpleNamespace, minter: Any
) -> None:
    # What lets full collections be rare (lifecycle.GC_THRESHOLDS): reference counting frees
    # everything a check leaves behind, evicted entries included.
    tokens = user_tokens(minter, groups=["g-1"])
    cache = ClaimsCache(USERS // 2, 300.0, clock=lambda: clock[0])  # every call a miss
    verifier = TokenVerifier(
        TokenSettings(), env.ISSUERS, memory_keys, clock=lambda: clock[0], cache=cache
    )
    api = env.make_api()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            for t in tokens:
                verifier.verify(t, api)
        assert gc.collect() == 0  # unreachable objects found: none
    finally:
        gc.enable()
