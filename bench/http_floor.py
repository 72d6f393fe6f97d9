"""The CPU floor of the HTTP ext_authz transport: Python µs per check with a trivial allow.

Runs ``authz.server.http.HttpCheckServer`` in a child process (uvloop when installed) whose check
returns a constant allow decision shaped like a real one (six identity headers, removals,
metadata), drives it from this process with N keep-alive requests over C connections (Envoy-like:
no pipelining, one request per connection at a time), and prints the server process's CPU time
per request (``time.process_time`` in the server, so the client's cost is not counted).

    .venv/bin/python bench/http_floor.py [--requests 100000] [--connections 8] [--asyncio]

Not imported by the package; no third-party imports beyond what the server itself needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from types import MappingProxyType
from typing import Any

REQUEST = (
    b"GET /api/orders/42?expand=items HTTP/1.1\r\n"
    b"host: api.example.com\r\n"
    b"authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl\r\n"
    b"x-request-id: 5d1b0a3c-8a9e-4a3b-9c61-1f2e3d4c5b6a\r\n"
    b"x-forwarded-proto: https\r\n"
    b"x-envoy-expected-rq-timeout-ms: 200\r\n"
    b"content-length: 0\r\n"
    b"\r\n"
)


def _serve(use_uvloop: bool) -> None:
    from authz.policy.model import Decision, RequestAttrs
    from authz.server.http import HttpCheckServer

    allow = Decision(
        allowed=True,
        status=200,
        code="ok",
        reason="allowed",
        decision_id="0f8fad5b-d9cb-469f-a165-70867728950e",
        api="orders",
        route="get-order",
        upstream_headers=(
            ("x-user-id", "00000000-0000-0000-0000-000000000001"),
            ("x-tenant-id", "00000000-0000-0000-0000-00000000000a"),
            ("x-client-id", "00000000-0000-0000-0000-0000000000c1"),
            ("x-roles", "Orders.Read"),
            ("x-scopes", ""),
            ("x-token-kind", "app"),
        ),
        remove_headers=("authorization",),
        metadata=MappingProxyType(
            {"decision_id": "0f8fad5b", "code": "ok", "api": "orders", "route": "get-order"}
        ),
    )

    async def check(attrs: RequestAttrs) -> Decision:
        return allow

    async def main() -> None:
        server = HttpCheckServer(check)
        port = await server.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"port": port, "loop": type(loop).__module__}), flush=True)
        await reader.readline()  # "start"
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await reader.readline()  # "stop"
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(json.dumps({"cpu_s": cpu, "wall_s": wall}), flush=True)
        await server.close(1.0)

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def _client(port: int, requests: int, connections: int) -> float:
    per_conn = requests // connections

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(per_conn):
            writer.write(REQUEST)
            await reader.readuntil(b"\r\n\r\n")  # allow answers have no body
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return time.perf_counter() - started


def _runner() -> Callable[[Coroutine[Any, Any, float]], float]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run
    return uvloop.run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--asyncio", action="store_true", help="plain asyncio loop in the server")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(not args.asyncio)
        return
    cmd = [sys.executable, __file__, "--serve"] + (["--asyncio"] if args.asyncio else [])
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        hello = json.loads(proc.stdout.readline())
        run = _runner()
        run(_client(hello["port"], 2000, args.connections))  # warm-up
        proc.stdin.write("start\n")
        proc.stdin.flush()
        wall = run(_client(hello["port"], args.requests, args.connections))
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        proc.wait(timeout=10)
    n = (args.requests // args.connections) * args.connections
    print(
        f"server loop={hello['loop']} requests={n} connections={args.connections}: "
        f"{result['cpu_s'] / n * 1e6:.1f} µs server CPU/request, "
        f"{n / wall:,.0f} req/s (client-bound, Python client)"
    )


if __name__ == "__main__":
    main()
