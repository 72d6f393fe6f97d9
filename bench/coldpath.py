"""(a') The cold path: a check that misses the claims cache, against a raw RSA-2048 verify, and
where the difference goes.

Measured as CPU time of this thread (``time.thread_time``: a noisy neighbour's time slices and
CPU steal do not count), in rounds that interleave every figure, and reported as the median over
rounds of each figure and of the ratio to the raw verify of the same round: on a shared 2-core
machine separately timed best-of-N figures moved the ratio between 1.3x and 2.8x.

The parts (each timed alone on the same token, so they add up only roughly):
- raw RSA verify: ``cryptography`` alone, PKCS#1 v1.5 + SHA-256 over the signing input;
- pyjwt's verify: the same through pyjwt's ``RSAAlgorithm.verify`` (what we call);
- split + base64url + JSON: the payload's decoding (``_b64url`` + ``_json_object``) and the
  signature's base64url;
- Principal: the claims -> ``Principal`` step (``_principal``);
- our cold verify: ``TokenVerifier.verify`` without a cache (steps 1-8);
- cache miss, full cache: ``TokenVerifier.verify`` with a full claims cache that every call
  misses and evicts from (+ sha256, lookup, insert, eviction);
- Engine.check, cache miss: the whole decision (route, verify as above, rules, answer).
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from authz.config import Settings
from authz.engine import Engine
from authz.identity import entra
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.identity.keys import KeyStore
from authz.policy.model import RequestAttrs

PARTS = (
    "raw_rsa_verify",
    "pyjwt_verify",
    "decode",
    "principal",
    "cold_verify",
    "miss_full_cache",
    "engine_check_miss",
)


def _cpu_us(fn: Callable[[], object], number: int) -> float:
    return timeit.timeit(fn, number=number, timer=time.thread_time) / number * 1e6


async def run(
    settings: Settings, tokens: list[str], public_key: Any, *, quick: bool
) -> dict[str, Any]:
    """``measure`` with the signing keys fetched from the dev IdP, as the server has them."""
    async with httpx.AsyncClient(trust_env=False) as client:
        keys = KeyStore(settings.issuers, client)
        await keys.start()
        try:
            return measure(settings, tokens, public_key, keys, quick=quick)
        finally:
            await keys.close()


def measure(
    settings: Settings, tokens: list[str], public_key: Any, keys: KeyStore, *, quick: bool
) -> dict[str, Any]:
    """``tokens``: distinct valid tokens (at least 2); a cache of half their number makes every
    call in the cycle a miss with an eviction."""
    issuers = {s.name: s for s in settings.issuers}
    api = settings.apis[0]
    token = tokens[0]
    cold = TokenVerifier(settings.tokens, issuers, keys)
    half = max(1, len(tokens) // 2)
    missing = TokenVerifier(settings.tokens, issuers, keys, cache=ClaimsCache(half, 300.0))
    engine = Engine(
        settings, TokenVerifier(settings.tokens, issuers, keys, cache=ClaimsCache(half, 300.0))
    )
    attrs = [
        RequestAttrs(
            method="GET",
            path="/orders/42",
            host="bench",
            headers={"authorization": f"Bearer {t}", "x-request-id": "r-1"},
            context={"api": "orders"},
        )
        for t in tokens
    ]
    for a in attrs:  # fill both caches; from here on the cycle only misses
        assert engine.check(a).allowed, "the bench tokens must be allowed"
    for t in tokens:
        missing.verify(t, api)
    h64, p64, s64 = token.split(".")
    signing_input = f"{h64}.{p64}".encode()
    signature = entra._b64url(s64)
    payload = entra._json_object(entra._b64url(p64))
    alg = entra.get_default_algorithms()["RS256"]
    snap = keys.snapshot(api.issuers[0])
    assert snap is not None
    kid = entra._json_object(entra._b64url(h64))["kid"]
    key = snap.keys_for(payload["tid"])[kid].jwk.key
    n_tokens = len(tokens)
    cursor = [0, 0]

    def miss() -> None:
        cursor[0] = (cursor[0] + 1) % n_tokens
        missing.verify(tokens[cursor[0]], api)

    def engine_miss() -> None:
        cursor[1] = (cursor[1] + 1) % n_tokens
        engine.check(attrs[cursor[1]])

    def decode() -> None:
        _, p, s = token.split(".")
        entra._json_object(entra._b64url(p))
        entra._b64url(s)

    fns: dict[str, Callable[[], object]] = {
        "raw_rsa_verify": lambda: public_key.verify(
            signature, signing_input, padding.PKCS1v15(), hashes.SHA256()
        ),
        "pyjwt_verify": lambda: alg.verify(signing_input, key, signature),
        "decode": decode,
        "principal": lambda: entra._principal(
            payload, "contoso", payload["iss"], payload["tid"], "2.0", payload["aud"], 0, {}
        ),
        "cold_verify": lambda: cold.verify(token, api),
        "miss_full_cache": miss,
        "engine_check_miss": engine_miss,
    }
    number = 100 if quick else 300
    rounds = 3 if quick else 7
    samples: dict[str, list[float]] = {k: [] for k in PARTS}
    ratios: dict[str, list[float]] = {k: [] for k in PARTS}
    for _ in range(rounds):
        this = {name: _cpu_us(fn, number) for name, fn in fns.items()}
        for name, us in this.items():
            samples[name].append(us)
            ratios[name].append(us / this["raw_rsa_verify"])
    return {
        "rounds": rounds,
        "us": {k: statistics.median(v) for k, v in samples.items()},
        "over_raw": {k: statistics.median(v) for k, v in ratios.items()},
        "over_raw_range": {k: (min(v), max(v)) for k, v in ratios.items()},
    }


LABELS = {
    "raw_rsa_verify": "raw RSA-2048 verify (cryptography)",
    "pyjwt_verify": "the same through pyjwt's RSAAlgorithm.verify",
    "decode": "split + base64url + JSON (payload), base64url (signature)",
    "principal": "claims -> Principal",
    "cold_verify": "our cold verify (TokenVerifier, no cache)",
    "miss_full_cache": "cache miss with a full cache (+ sha256, insert, eviction)",
    "engine_check_miss": "Engine.check, cache miss (route, verify, rules, answer)",
}


def report(c: dict[str, Any]) -> list[str]:
    lines = [
        f"### (a') Cold path: CPU µs per operation (thread CPU time, {c['rounds']} interleaved "
        "rounds: medians; x raw: median of each round's ratio, lowest-highest in brackets)",
        "",
        "| operation | µs | x raw RSA verify |",
        "|---|---|---|",
    ]
    for k in PARTS:
        lo, hi = c["over_raw_range"][k]
        lines.append(
            f"| {LABELS[k]} | {c['us'][k]:.1f} | {c['over_raw'][k]:.2f}x [{lo:.2f}-{hi:.2f}] |"
        )
    return [*lines, ""]
