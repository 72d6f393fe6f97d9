"""Where the Python time of one cached HTTP check goes, in-process (no sockets, no Envoy).

Feeds the bytes of one Envoy check request to the real ``_HttpCheckProtocol`` over a fake
transport, with the real ``Service`` (bench config, keys fetched from the dev IdP), and times each
stage on its own (best of 5 ``timeit`` rounds). Through Envoy the same code costs 2-3x more per
check (caches shared with Envoy, wrk and the backend on 2 cores): compare with the bench's
"HTTP floor" and "entra-authz HTTP" rows.

    .venv/bin/python -m bench.hotpath
    .venv/bin/python -m bench.hotpath --revocations 100000   # also: the same check, deny list on

``--revocations N`` also times the check with N revocation rules in force (none matches the
bench token: 40 % on other users' oid, 30 % on token ids, 10 % on sub, 10 % on session ids,
10 % on other clients with issued_before, plus 3 rules filed under the token's own tenant and
client, all for tokens issued before it), side by side with revocation off (an empty set):
the median of paired off/on rounds, so that a busy machine's noise lands on both halves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import timeit
import uuid
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import prometheus_client as prom
import uvloop

from authz import config as config_mod
from authz.dev.idp import CONTOSO, DevIdP
from authz.engine import new_decision_id
from authz.identity.bearer import extract_bearer
from authz.observability import AuditLog, Metrics
from authz.policy.model import RequestAttrs
from authz.policy.paths import canonicalize
from authz.policy.revocation import EMPTY, RevocationRule, RevocationSet
from authz.server.http import HttpCheckServer, _HttpCheckProtocol, render_decision
from authz.service import Service
from bench.__main__ import AUTHZ_CONFIG, PATH


class _Transport:
    """Enough of an asyncio transport for the protocol: counts writes, never blocks."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def best_us(fn: Callable[[], object], number: int = 20000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def deny_list(n: int, tid: str, azp: str, iat: int) -> list[RevocationRule]:
    """N rules, none of which revokes the bench token (see the module docstring)."""
    far = int(time.time()) + 3600
    kinds = ("oid",) * 4 + ("uti",) * 3 + ("sub", "sid", "azp")
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        value = str(uuid.UUID(int=i + 1)) if kind in ("oid", "azp") else f"v{i:08d}"
        before = iat - 3600 if kind == "azp" else 0
        out.append(RevocationRule(id=f"b{i}", reason="bench", expires_at=far, issued_before=before,
                                  **{kind: value}))  # fmt: skip
    for i, (kind, value) in enumerate((("tid", tid), ("azp", azp), ("tid", tid))):
        out.append(RevocationRule(id=f"own{i}", reason="bench", expires_at=far,
                                  issued_before=iat - 600 * (i + 1), **{kind: value}))  # fmt: skip
    return out


async def measure(revocations: int = 0) -> dict[str, float]:
    with DevIdP(tenants=(CONTOSO,)) as idp:
        token = idp.mint(aud="api://orders", lifetime=7200)
        text = AUTHZ_CONFIG.format(
            cache_max=5000, instance=idp.base_url, tenant=CONTOSO, limits="", redis=""
        )
        settings = config_mod.parse(text, env={})
        with open(os.devnull, "w") as devnull:
            service = Service(
                settings, metrics=Metrics(prom.CollectorRegistry()), audit=AuditLog(devnull)
            )
            await service.start()
            try:
                if revocations:
                    return _revocation_stages(service, token, revocations)
                return _stages(service, token)
            finally:
                await service.close()


def _stages(service: Service, token: str) -> dict[str, float]:
    server = HttpCheckServer(service.check, check_now=service.check_now)
    server._loop = asyncio.get_running_loop()  # what start() sets; no socket is needed here
    protocol = _HttpCheckProtocol(server)
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    request = (
        f"GET {PATH} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\n"
        "x-request-id: 5d1b0a3c-8a9e-4a3b-9c61-1f2e3d4c5b6a\r\nx-forwarded-proto: http\r\n"
        "x-envoy-expected-rq-timeout-ms: 250\r\ncontent-length: 0\r\n\r\n"
    ).encode("ascii")
    protocol.data_received(request)
    assert transport.writes == 1, "the check must be answered synchronously"
    headers = MappingProxyType(
        {"authorization": f"Bearer {token}", "x-request-id": "r-1", "host": "bench"}
    )
    attrs = RequestAttrs(method="GET", path=PATH, host="bench", headers=headers, request_id="r-1")
    decision = service.check_now(attrs)
    assert decision is not None, "the bench token must be decided without I/O"
    assert decision.allowed, "the bench token must be allowed"
    engine = service._state.engine
    api = engine._selector.select(attrs.context, "bench", PATH)
    assert api is not None
    plan = engine.plans[api.name]
    index = plan.table.match_index("GET", "bench", PATH)
    assert index is not None
    requirement = plan.requirements[index]
    principal = engine._verifier.verify(token, api)
    out = {
        "whole check (parse, decide, record, render, write)": best_us(
            lambda: protocol.data_received(request)
        ),
        "  Service.check_now (decide + metrics + audit)": best_us(lambda: service.check_now(attrs)),
        "    Engine.check": best_us(lambda: engine.check(attrs)),
        "      canonicalize": best_us(lambda: canonicalize(PATH)),
        "      API selection": best_us(
            lambda: engine._selector.select(attrs.context, "bench", PATH)
        ),
        "      route match": best_us(lambda: plan.table.match_index("GET", "bench", PATH)),
        "      extract_bearer": best_us(lambda: extract_bearer(headers, "")),
        "      verify (cached)": best_us(lambda: engine._verifier.verify(token, api)),
        "      authorize": best_us(lambda: requirement.check(principal)),
        "      new_decision_id": best_us(new_decision_id),
        "    Metrics.record_check": best_us(lambda: service.metrics.record_check(decision, 1e-5)),
        "    AuditLog.record": best_us(lambda: service.audit.record(attrs, decision, 1e-5)),
        "  render_decision": best_us(lambda: render_decision(decision)),
    }
    server.check_now = lambda a: decision
    out["  transport alone (same decision every time)"] = best_us(
        lambda: protocol.data_received(request)
    )
    return out


ROUNDS = 25  # paired off/on rounds; the delta (~1 µs) is small next to a busy machine's noise


def _paired(fn: Callable[[], object], store: Any, rules: RevocationSet) -> tuple[float, float]:
    """(median µs with revocation off, median of the paired on - off differences): each round
    times off then on back to back, so a noisy neighbour lands on both halves of a pair."""
    offs, deltas = [], []
    for _ in range(ROUNDS):
        store.current = EMPTY
        off = min(timeit.repeat(fn, number=5000, repeat=3)) / 5000 * 1e6
        store.current = rules
        on = min(timeit.repeat(fn, number=5000, repeat=3)) / 5000 * 1e6
        offs.append(off)
        deltas.append(on - off)
    store.current = EMPTY
    return statistics.median(offs), statistics.median(deltas)


def _revocation_stages(service: Service, token: str, n: int) -> dict[str, float]:
    """The same cached check with revocation off (an empty set) and with ``n`` rules."""
    headers = MappingProxyType({"authorization": f"Bearer {token}", "host": "bench"})
    attrs = RequestAttrs(method="GET", path=PATH, host="bench", headers=headers, request_id="r-1")
    engine = service._state.engine
    api = engine._selector.select(attrs.context, "bench", PATH)
    assert api is not None
    principal = engine._verifier.verify(token, api)
    listed = deny_list(n, principal.tid, principal.client_id, principal.claims["iat"])
    built = time.perf_counter()
    rules = RevocationSet(listed)
    built = time.perf_counter() - built
    store = service.revocations
    store.current = rules
    assert service.check_now(attrs).allowed  # type: ignore[union-attr]  # none matches
    out: dict[str, float] = {"build": built * 1000}
    stages = {
        "Engine.check": lambda: engine.check(attrs),
        "Service.check_now (+ metrics, audit)": lambda: service.check_now(attrs),
        "RevocationSet.match alone": lambda: store.current.match(principal),
    }
    for name, fn in stages.items():
        out[f"{name}|off"], out[f"{name}|delta"] = _paired(fn, store, rules)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath")
    p.add_argument("--revocations", type=int, default=0, help="also time N revocation rules")
    args = p.parse_args()
    results = uvloop.run(measure(args.revocations))
    if args.revocations:
        print(
            f"µs per cached check, in-process: median of {ROUNDS} paired rounds (off, then on; each"
            f" the best of 3 x 5000); revocation off vs {args.revocations} rules (none matching):"
        )
        build = "build the RevocationSet (ms, once per change)"
        print(f"  {build:<46} {results.pop('build'):7.1f}")
        for key in [k for k in results if k.endswith("|off")]:
            name = key.removesuffix("|off")
            off, delta = results[key], results[f"{name}|delta"]
            print(f"  {name:<46} off {off:6.2f}  +{delta:5.2f} µs  {100 * delta / off:+5.1f} %")
        return
    print("µs per operation, in-process, best of 5 (one cached HTTP check and its parts):")
    for name, us in results.items():
        print(f"  {name:<56} {us:7.2f}")


if __name__ == "__main__":
    main()
