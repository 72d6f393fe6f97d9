"""(a) The decision path in-process: raw RSA verify next to our cold and cached verification,
route matching and a whole cached ``Engine.check`` -- with the bench's own config and keys
fetched from the dev IdP, exactly as the server would have them."""

from __future__ import annotations

import base64
import timeit
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from authz.config import Settings
from authz.engine import Engine
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.identity.keys import KeyStore
from authz.policy.model import RequestAttrs
from authz.policy.routes import RouteTable


def best_us(fn: Callable[[], object], number: int, rounds: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6


async def measure(
    settings: Settings,
    token: str,
    public_key: Any,
    *,
    quick: bool,
    limited: Settings | None = None,
) -> dict[str, float]:
    """``limited``: the same config with a rate limit on the route (never reached), for
    ``engine_check_ratelimited_us`` beside ``engine_check_cached_us``."""
    scale = 0.2 if quick else 1.0
    async with httpx.AsyncClient(trust_env=False) as client:
        keys = KeyStore(settings.issuers, client)
        await keys.start()
        try:
            issuers = {s.name: s for s in settings.issuers}
            api = settings.apis[0]
            cold = TokenVerifier(settings.tokens, issuers, keys)
            cached = TokenVerifier(settings.tokens, issuers, keys, cache=ClaimsCache(10_000, 300.0))
            engine = Engine(
                settings,
                TokenVerifier(settings.tokens, issuers, keys, cache=ClaimsCache(10_000, 300.0)),
            )
            table = RouteTable.build(api)
            attrs = RequestAttrs(
                method="GET",
                path="/orders/42",
                host="bench",
                headers={"authorization": f"Bearer {token}", "x-request-id": "r-1"},
                context={"api": "orders"},
            )
            assert engine.check(attrs).allowed, "the bench token must be allowed"
            cold.verify(token, api)
            cached.verify(token, api)
            h, p, s = token.split(".")
            signing_input = f"{h}.{p}".encode()
            sig = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

            def raw() -> None:
                public_key.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())

            n = max(50, int(2000 * scale))
            out = {
                "raw_rsa_verify_us": best_us(raw, n),
                "cold_verify_us": best_us(lambda: cold.verify(token, api), n),
                "cached_verify_us": best_us(lambda: cached.verify(token, api), n * 10),
                "route_match_us": best_us(
                    lambda: table.match("GET", "bench", "/orders/42"), n * 10
                ),
                "engine_check_cached_us": best_us(lambda: engine.check(attrs), n * 5),
            }
            if limited is not None:
                with_limits = Engine(
                    limited,
                    TokenVerifier(limited.tokens, issuers, keys, cache=ClaimsCache(10_000, 300.0)),
                )
                assert with_limits.limiter is not None
                assert with_limits.check(attrs).allowed
                out["engine_check_ratelimited_us"] = best_us(
                    lambda: with_limits.check(attrs), n * 5
                )
        finally:
            await keys.close()
    out["cold_over_raw"] = out["cold_verify_us"] / out["raw_rsa_verify_us"]
    out["cached_over_raw"] = out["cached_verify_us"] / out["raw_rsa_verify_us"]
    return out
