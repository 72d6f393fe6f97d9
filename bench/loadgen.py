"""Open-loop load at a fixed rate (wrk cannot do that, and wrk2 is not in Debian).

Requests are *scheduled* at ``start + i / rate`` whatever happened to earlier ones, and latency
is measured from that scheduled time (so a stall is not hidden: no coordinated omission). Each
request takes an idle keep-alive connection or opens a new one (up to ``max_conns``; beyond that
it waits, and the wait counts as latency). httptools parses the responses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httptools


@dataclass(frozen=True, slots=True)
class OpenLoopResult:
    rate: float
    sent: int
    ok: int
    non_2xx: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    seconds: float


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail()

    def _fail(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(-1)


def _pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def run(
    port: int,
    path: str,
    tokens: list[str],
    *,
    rate: float,
    seconds: float,
    max_conns: int = 64,
    host: str = "127.0.0.1",
) -> OpenLoopResult:
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    open_conns = 0
    slots = asyncio.Semaphore(max_conns)
    lat: list[float] = []
    codes: list[int] = []
    reqs = [
        f"GET {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {t}\r\n\r\n".encode()
        for t in tokens
    ]

    async def one(i: int, scheduled: float) -> None:
        nonlocal open_conns
        async with slots:
            conn = idle.pop() if idle else None
            if conn is None:
                open_conns += 1
                try:
                    _, conn = await loop.create_connection(_Conn, host, port)
                except OSError:
                    codes.append(-1)
                    open_conns -= 1
                    return
            conn.done = loop.create_future()
            assert conn.transport is not None
            conn.transport.write(reqs[i % len(reqs)])
            code = await conn.done
            lat.append((time.perf_counter() - scheduled) * 1e3)
            codes.append(code)
            if code > 0 and not conn.lost:
                idle.append(conn)
            else:
                open_conns -= 1

    total = int(rate * seconds)
    t0 = time.perf_counter() + 0.05
    tasks = []
    for i in range(total):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, at)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
    for c in idle:
        if c.transport is not None:
            c.transport.close()
    lat.sort()
    return OpenLoopResult(
        rate=rate,
        sent=total,
        ok=sum(1 for c in codes if 200 <= c < 300),
        non_2xx=sum(1 for c in codes if c >= 300),
        errors=sum(1 for c in codes if c < 0),
        p50_ms=_pct(lat, 0.50),
        p90_ms=_pct(lat, 0.90),
        p99_ms=_pct(lat, 0.99),
        max_ms=lat[-1] if lat else float("nan"),
        seconds=seconds,
    )


async def flood(
    port: int, path: str, tokens: list[str], *, conns: int = 4, host: str = "127.0.0.1"
) -> tuple[int, int]:
    """Closed loop: send every token once over ``conns`` keep-alive connections.
    Returns (2xx, other)."""
    loop = asyncio.get_running_loop()
    counts = [0, 0]

    async def worker(part: list[str]) -> None:
        _, conn = await loop.create_connection(_Conn, host, port)
        for t in part:
            conn.done = loop.create_future()
            assert conn.transport is not None
            conn.transport.write(
                f"GET {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {t}\r\n\r\n".encode()
            )
            code = await conn.done
            counts[0 if 200 <= code < 300 else 1] += 1
            if code < 0:
                _, conn = await loop.create_connection(_Conn, host, port)
        if conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(tokens[i::conns]) for i in range(conns)))
    return counts[0], counts[1]
