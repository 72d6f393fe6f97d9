"""``python -m bench.gcpause``: cyclic-GC pauses of the decision path with many users, in-process.

N distinct valid tokens (minted in-process by the dev IdP) cycle through ``Engine.check`` with a
claims cache smaller than N (every check a miss that evicts: the cache churns at full size) or
larger (every check a hit on a full cache). The process is set up as ``authz serve`` sets itself
up (``settle_heap``: thresholds, one collection, ``gc.freeze()``) unless ``--as-before``. Every
collection is timed through ``gc.callbacks`` in thread CPU time (a neighbour's time slices do not
count), and so is every check. Prints one line per variant; asserts nothing about time.

    python -m bench.gcpause                      # 20 000 tokens, cache 10 000, 2 passes
    python -m bench.gcpause --tokens 5000        # all hits (cache larger than the set)
    python -m bench.gcpause --as-before          # CPython's defaults, nothing frozen
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from authz import config as config_mod
from authz.dev.idp import CONTOSO, DevIdP
from authz.engine import Engine
from authz.identity.cache import ClaimsCache
from authz.identity.entra import TokenVerifier
from authz.identity.keys import KeyStore
from authz.policy.model import RequestAttrs

CONFIG = """\
issuers:
  - {{name: contoso, instance: "{instance}", tenant: "{tenant}", versions: ["2.0"]}}
apis:
  - name: orders
    audiences: ["api://orders"]
    issuers: [contoso]
    match: {{path_prefixes: ["/orders"]}}
    routes:
      - name: read
        path: "/orders/{{id}}"
        methods: [GET]
        require: {{token_kind: user, scopes_any: [Orders.Read]}}
"""


class Pauses:
    def __init__(self) -> None:
        self.by_gen: list[list[float]] = [[], [], []]
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.thread_time()
        else:
            self.by_gen[info["generation"]].append(time.thread_time() - self._t)


def settle(as_before: bool) -> str:
    if as_before:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        return "CPython defaults, nothing frozen"
    try:
        from authz.server.lifecycle import settle_heap
    except ImportError:  # an older tree (A/B runs): there was nothing to settle
        return "as before (no settle_heap in this tree)"
    settle_heap()
    return f"settle_heap: thresholds {gc.get_threshold()}, frozen {gc.get_freeze_count()}"


async def run(args: argparse.Namespace) -> None:
    idp = DevIdP(tenants=(CONTOSO,)).start()
    try:
        path = Path(tempfile.mkdtemp(prefix="authz-gcpause-")) / "authz.yaml"
        path.write_text(CONFIG.format(instance=idp.base_url, tenant=CONTOSO))
        settings = config_mod.load(str(path))
        t0 = time.perf_counter()
        tokens = [
            idp.mint(aud="api://orders", lifetime=7200, oid=str(uuid.uuid4()))
            for _ in range(args.tokens)
        ]
        print(f"minted {args.tokens} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
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
        async with httpx.AsyncClient(trust_env=False) as client:
            keys = KeyStore(settings.issuers, client)
            await keys.start()
            issuers = {s.name: s for s in settings.issuers}
            cache = ClaimsCache(args.cache, 300.0)
            engine = Engine(settings, TokenVerifier(settings.tokens, issuers, keys, cache=cache))
            for a in attrs:  # fill (and, with more tokens than entries, start the churn)
                engine.check(a)
            how = settle(args.as_before)
            pauses = Pauses()
            gc.callbacks.append(pauses)
            lat: list[float] = []
            hits0, misses0 = cache.hits, cache.misses
            c0 = time.thread_time()
            for _ in range(args.passes):
                for a in attrs:
                    t = time.thread_time()
                    engine.check(a)
                    lat.append(time.thread_time() - t)
            cpu = time.thread_time() - c0
            gc.callbacks.remove(pauses)
            await keys.close()
        lat.sort()
        hits, misses = cache.hits - hits0, cache.misses - misses0
        n = len(lat)
        print(
            f"{args.tokens} tokens, cache {args.cache}, {how}: {n} checks, "
            f"hits {100 * hits / max(1, hits + misses):.0f} %, CPU {cpu / n * 1e6:.1f} µs/check, "
            f"p99 {lat[int(n * 0.99)] * 1e3:.2f} ms, p99.9 {lat[int(n * 0.999)] * 1e3:.2f} ms, "
            f"max {lat[-1] * 1e3:.1f} ms (CPU time per check)"
        )
        for g, p in enumerate(pauses.by_gen):
            print(
                f"  generation {g}: {len(p)} collections, {sum(p) * 1e3:.0f} ms in all, "
                f"largest {max(p, default=0.0) * 1e3:.1f} ms"
            )
    finally:
        idp.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gcpause", description=__doc__)
    p.add_argument("--tokens", type=int, default=20_000, help="distinct users (20000)")
    p.add_argument("--cache", type=int, default=10_000, help="claims cache entries (10000)")
    p.add_argument("--passes", type=int, default=2, help="times through the tokens (2)")
    p.add_argument("--as-before", action="store_true", help="CPython's defaults, no freeze")
    asyncio.run(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
