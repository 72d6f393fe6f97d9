"""Hints for a response cache in Envoy (envoy#44852, docs/envoy-cache.md), over both transports:
every allow carries ``cache_ttl_seconds`` = min(token exp - now, ``envoy_cache.max_ttl_seconds``)
and ``cache_control``; an allow that a cache must not reuse (a rate-limited route, a revocation
source configured, a dry-run report, a token about to expire) says ``0`` / ``no-store``; denies
carry no hint (never cacheable); without ``envoy_cache`` nothing is added."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from authz import config as authz_config
from authz.server.http import HttpCheckServer
from authz.server.servicer import AuthorizationServicer
from tests.component.test_transport_symmetry import CONFIG, Pair, Side, signing
from tests.unit.conftest import NOW, MemoryKeys, Minter

__all__ = ["signing"]  # the module-scoped key fixture, shared with the symmetry suite

CACHED = CONFIG.replace(
    "apis:\n",
    "envoy_cache:\n  max_ttl_seconds: 120\napis:\n",
).replace(
    "      - {name: read,",
    "      - {name: report, path: /orders/report, mode: dry-run, "
    "require: {roles_any: [Orders.Report]}}\n      - {name: read,",
)
REVOCABLE = CACHED.replace("apis:\n", "revocation:\n  file: /nonexistent/rules.json\napis:\n", 1)
ALLOWED = ("cache_ttl_seconds", "cache_control")


async def _pair(config: str, keys: MemoryKeys) -> AsyncIterator[Pair]:
    settings = authz_config.parse(config, env={})
    grpc_side, http_side = Side(settings, keys), Side(settings, keys)
    server = HttpCheckServer(http_side.check)
    port = await server.start("127.0.0.1", 0)
    try:
        yield Pair(grpc_side, http_side, AuthorizationServicer(grpc_side.check), port)
    finally:
        await server.close(grace_s=1.0)


@pytest.fixture
async def cached(signing: tuple[MemoryKeys, Minter]) -> AsyncIterator[Pair]:
    async for p in _pair(CACHED, signing[0]):
        yield p


def bearer(m: Minter, **claims: object) -> dict[str, str]:
    return {"authorization": f"Bearer {m.token(aud='api://orders', **claims)}"}


async def hints(pair: Pair, path: str, headers: dict[str, str]) -> tuple[bool, dict[str, str]]:
    """The cache hints of the answer, identical over gRPC and HTTP (asserted)."""
    grpc, http = await pair.ask("GET", path, headers)
    assert (grpc.allowed, grpc.status) == (http.allowed, http.status)
    g = {k: v for k, v in grpc.metadata.items() if k in ALLOWED}
    h = {k: v for k, v in http.metadata.items() if k in ALLOWED}
    assert g == h
    return grpc.allowed, g


Case = Callable[[Minter], dict[str, str]]


@pytest.mark.parametrize(
    ("path", "headers_of", "ttl", "control"),
    [
        ("/orders/7", bearer, "120", "private, max-age=120"),  # exp is 3600 s away
        ("/orders/7", lambda m: bearer(m, exp=NOW + 45), "45", "private, max-age=45"),
        ("/orders/7", lambda m: bearer(m, exp=NOW), "0", "no-store"),  # expires now (skew)
        ("/orders/limited", bearer, "0", "no-store"),  # counted: never cached
        ("/orders/report", bearer, "0", "no-store"),  # dry-run would-deny
    ],
    ids=["capped-by-max", "capped-by-exp", "expiring", "rate-limited", "dry-run"],
)
async def test_allow_hints(
    cached: Pair,
    signing: tuple[MemoryKeys, Minter],
    path: str,
    headers_of: Case,
    ttl: str,
    control: str,
) -> None:
    allowed, got = await hints(cached, path, headers_of(signing[1]))
    assert allowed
    assert got == {"cache_ttl_seconds": ttl, "cache_control": control}


async def test_denies_carry_no_hint(cached: Pair, signing: tuple[MemoryKeys, Minter]) -> None:
    for path, headers in (
        ("/orders/7", {}),  # 401 missing_token
        ("/orders/admin", bearer(signing[1])),  # 403 missing_scope
    ):
        allowed, got = await hints(cached, path, headers)
        assert not allowed
        assert got == {}


async def test_a_revocation_source_makes_every_allow_no_store(
    signing: tuple[MemoryKeys, Minter],
) -> None:
    async for pair in _pair(REVOCABLE, signing[0]):
        allowed, got = await hints(pair, "/orders/7", bearer(signing[1]))
        assert allowed
        assert got == {"cache_ttl_seconds": "0", "cache_control": "no-store"}


async def test_off_by_default(signing: tuple[MemoryKeys, Minter]) -> None:
    async for pair in _pair(CONFIG, signing[0]):
        allowed, got = await hints(pair, "/orders/7", bearer(signing[1]))
        assert allowed
        assert got == {}
