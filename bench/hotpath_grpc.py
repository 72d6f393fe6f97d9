"""Where the Python time of one cached gRPC check goes, in-process (no sockets, no Envoy).

The gRPC counterpart of ``bench.hotpath``: the bytes of one Envoy ``CheckRequest`` (the headers
Envoy 1.40 sends, a valid dev-IdP token) through the real ``AuthorizationServicer`` and the real
``Service`` (bench config, keys fetched from the dev IdP), each stage timed on its own (best of 5
``timeit`` rounds). The coroutines never suspend on a cached check, so they are driven by hand
(``send(None)``) instead of through an event loop. What grpc.aio itself costs per call (its
C core, the HTTP/2 framing, the loop) is not here: compare with the bench's gRPC floor.

    .venv/bin/python -m bench.hotpath_grpc
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any

import prometheus_client as prom
import uvloop

from authz import config as config_mod
from authz._proto.envoy.service.auth.v3 import external_auth_pb2
from authz.dev.idp import CONTOSO, DevIdP
from authz.observability import AuditLog, Metrics
from authz.server.convert import decision_to_bytes, decision_to_response, request_to_attrs
from authz.server.servicer import AuthorizationServicer
from authz.service import Service
from bench.__main__ import AUTHZ_CONFIG, PATH
from bench.hotpath import best_us


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine that never suspends (a cached check)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the check suspended: not a cached check")


def envoy_request(token: str) -> bytes:
    """A ``CheckRequest`` shaped like Envoy's for ``GET /orders/42`` (serialised)."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "127.0.0.1"
    a.source.address.socket_address.port_value = 40312
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 10000
    http = a.request.http
    http.id = "1234567890123456789"
    http.method = "GET"
    http.path = PATH
    http.host = "bench"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.headers.update(
        {
            ":authority": "bench",
            ":method": "GET",
            ":path": PATH,
            ":scheme": "http",
            "authorization": f"Bearer {token}",
            "x-forwarded-proto": "http",
            "x-request-id": "5d1b0a3c-8a9e-4a3b-9c61-1f2e3d4c5b6a",
        }
    )
    a.request.time.GetCurrentTime()
    return req.SerializeToString()


async def measure() -> dict[str, float]:
    with DevIdP(tenants=(CONTOSO,)) as idp:
        token = idp.mint(aud="api://orders", lifetime=7200)
        text = AUTHZ_CONFIG.format(
            cache_max=5000, instance=idp.base_url, tenant=CONTOSO, limits="", redis=""
        )
        with open(os.devnull, "w") as devnull:
            service = Service(
                config_mod.parse(text, env={}),
                metrics=Metrics(prom.CollectorRegistry()),
                audit=AuditLog(devnull),
            )
            await service.start()
            try:
                return _stages(service, envoy_request(token))
            finally:
                await service.close()


def _stages(service: Service, wire: bytes) -> dict[str, float]:
    servicer = AuthorizationServicer(service.check)
    parse = external_auth_pb2.CheckRequest.FromString
    request = parse(wire)
    attrs = request_to_attrs(request)
    decision = drive(service.check(attrs))
    assert decision.allowed, "the bench token must be allowed"
    response = decision_to_response(decision)
    return {
        "whole call as served (parse, check_wire)": best_us(
            lambda: drive(servicer.check_wire(parse(wire), None))
        ),
        "whole call, message path (parse, Check, serialise)": best_us(
            lambda: drive(servicer.Check(parse(wire), None)).SerializeToString()
        ),
        "  CheckRequest parse": best_us(lambda: parse(wire)),
        "  request_to_attrs": best_us(lambda: request_to_attrs(request)),
        "  Service.check (decide + metrics + audit)": best_us(lambda: drive(service.check(attrs))),
        "  decision_to_bytes (what check_wire sends)": best_us(lambda: decision_to_bytes(decision)),
        "  decision_to_response (the message path)": best_us(
            lambda: decision_to_response(decision)
        ),
        "  CheckResponse serialise": best_us(response.SerializeToString),
    }


def main() -> None:
    results = uvloop.run(measure())
    print("µs per operation, in-process, best of 5 (one cached gRPC check and its parts):")
    for name, us in results.items():
        print(f"  {name:<56} {us:7.2f}")


if __name__ == "__main__":
    main()
