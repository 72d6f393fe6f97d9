"""Envoy's HTTP ext_authz protocol on a lean asyncio server.

Envoy's ``ext_authz`` filter with ``http_service`` sends, for every client request, an HTTP/1.1
request with the same method, ``path_prefix`` + the original path (query included), the allowed
original headers and no body. The status of our answer is the decision: ``200`` allows (headers
matching ``allowed_upstream_headers`` overwrite the upstream request's, the request headers named in
``x-envoy-auth-headers-to-remove`` are removed), anything else denies (Envoy returns our status,
body and the headers matching ``allowed_client_headers`` to the client). Headers matching
``dynamic_metadata_from_headers`` become dynamic metadata in both cases: that is how the decision
metadata (``x-authz-decision-id``, ``x-authz-code``, ...) reaches access logs.

This module is the thin HTTP adapter around the decision core, in the gRPC servicer's three
seams: ``http_convert.request_to_attrs`` (what the parser read -> ``RequestAttrs``), ``await
check(attrs)`` -> ``Decision``, ``http_convert.render_decision`` (-> bytes). Decision ids of the
answers made here (internal error, rejections) come from the engine's ``new_decision_id``.
It is a raw ``asyncio.Protocol`` driving ``httptools.HttpRequestParser`` directly, because a
framework stack costs ~4x the CPU per check (see docs/http-transport.md).

HTTP/1.1 handling: keep-alive (``Connection: close`` and HTTP/1.0 close after the answer),
pipelining (answers in request order even when checks finish out of order), bounded URL, header
and body sizes, a header-read timeout and an idle timeout, ``400`` for malformed input. The same
never-raise rule as the gRPC servicer: a check that raises is rendered as the explicit
``internal_error`` deny (503), and nothing escapes the protocol callbacks. Logs go to
``authz.http`` and never contain header values.

Works on plain asyncio and on uvloop; choosing the loop is the application's business.

Why over ~450 lines: the connection protocol and the server that owns its connections, tasks,
limits and draining are one state machine (the protocol reads the server's fields on every
callback); the pure conversions already live in ``http_convert``.

Must not import grpc, prometheus or anything from ``authz._proto``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from authz.engine import new_decision_id
from authz.policy.model import Decision, RequestAttrs
from authz.server.http_convert import (
    UnsafeHeaderError,
    render_decision,
    render_internal_error,
    render_outside_prefix,
    render_rejection,
    request_to_attrs,
)

__all__ = [
    "CheckFn",
    "ErrorHook",
    "HttpCheckServer",
    "HttpLimits",
    "UnsafeHeaderError",
    "render_decision",
]

log = logging.getLogger("authz.http")

CheckFn = Callable[[RequestAttrs], Awaitable[Decision]]
ErrorHook = Callable[[BaseException], None]
CheckNowFn = Callable[[RequestAttrs], Decision | None]

# ------------------------------------------------------------------------------ limits, constants


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what one connection may make us hold. Envoy stays far below all of them."""

    max_url_bytes: int = 8192  # over -> 414, then close
    max_header_bytes: int = 65536  # names + values, total per request; over -> 431, then close
    max_headers: int = 100  # over -> 431, then close
    max_body_bytes: int = 0  # Envoy sends none: a declared body or transfer-encoding -> 413
    max_message_bytes: int = 81920  # every byte of one message (and CRLFs before it); over -> 431
    max_connections: int = 4096  # concurrently open; over -> the new connection is closed at once
    max_pipelined: int = 16  # unanswered requests per connection before we stop reading
    max_queued: int = 1024  # unanswered requests per connection before we give up on it (503)
    idle_timeout_s: float = 60.0  # no request in progress and nothing received for this long
    header_timeout_s: float = 10.0  # a request's head must arrive within this

    @classmethod
    def for_token(cls, max_token_bytes: int) -> HttpLimits:
        """Limits that leave room for a token of ``max_token_bytes`` (and a bit over it), so an
        oversize token gets the engine's 401 ``token_too_large`` as over gRPC, not a 431."""
        header = max(65536, 2 * max_token_bytes + 16384)
        return cls(max_header_bytes=header, max_message_bytes=header + 8192 + 8192)


# -------------------------------------------------------------------------------------- protocol


class _Reject(Exception):
    """Raised inside parser callbacks to stop parsing and answer ``status`` then close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Stop(Exception):
    """Raised inside parser callbacks to stop reading requests on a closing connection."""


class _Slot:
    """One request's place in the connection's answer queue (answers go out in request order)."""

    __slots__ = ("data", "task")

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data
        self.task: asyncio.Task[None] | None = None


class _HttpCheckProtocol(asyncio.Protocol):
    """One client connection (normally one pooled connection from one Envoy worker)."""

    def __init__(self, server: HttpCheckServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Slot] = deque()
        self._closing = False  # no more requests are read; close once the queue drains
        self._read_paused = False
        self._write_paused = False
        self.last_rx = 0.0
        # Per-request parse state, reset in on_message_begin.
        self._in_head = False
        self._head_started = 0.0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._hcount = 0
        self._hbytes = 0
        self._body_bytes = 0
        self._msg_rx = 0  # every byte received since the last complete message

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass: cast, don't assert.
        self._transport = cast(asyncio.Transport, transport)
        self.last_rx = self._loop.time()
        server = self._server
        if len(server.connections) >= self._limits.max_connections:
            server.rejected_connections += 1
            self._closing = True
            transport.close()
            return
        server.connections.add(self)
        if self._server.draining:
            self._closing = True
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._closing = True
        self._queue.clear()
        self._transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def eof_received(self) -> bool | None:
        # A client that half-closes after sending still gets its pending answers.
        self._closing = True
        if self._queue:
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        # Every byte counts against one per-message limit (request line, headers, anything after
        # them, and CRLFs between messages); only a complete message resets it and the idle clock.
        self._msg_rx += len(data)
        if self._msg_rx > self._limits.max_message_bytes:
            self._server.oversize_messages += 1
            self._reject(431)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status)
            elif isinstance(cause, _Stop):
                self._maybe_close()
            else:
                log.error("http transport bug in a parser callback", exc_info=cause)
                self._reject(400)
        except httptools.HttpParserUpgrade:
            # An Upgrade/CONNECT request: answered like any other, then the connection ends
            # (bytes after its head are not HTTP and are not ours to read).
            self._closing = True
            self._maybe_close()
        except httptools.HttpParserError:
            if self._closing:
                # llhttp refuses data after a "connection: close" request: not ours to answer.
                self._maybe_close()
            else:
                self._reject(400)
        except Exception:
            log.exception("http transport bug while reading a request")
            self._reject(400)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing:
            raise _Stop  # requests pipelined after a "connection: close" one are not read
        self._in_head = True
        self._head_started = self._loop.time()
        self._url = b""
        self._headers = {}
        self._hcount = 0
        self._hbytes = 0
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url_bytes:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hcount += 1
        self._hbytes += len(name) + len(value)
        if self._hcount > self._limits.max_headers or self._hbytes > self._limits.max_header_bytes:
            raise _Reject(431)
        key = name.decode("latin-1").lower()
        headers = self._headers
        # Repeats are comma-joined, as Envoy merges them for gRPC: both transports see the same.
        prev = headers.get(key)
        headers[key] = (
            value.decode("latin-1") if prev is None else f"{prev}, {value.decode('latin-1')}"
        )

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = self._headers.get("content-length")
        # Envoy's ext_authz client sends headers only: a body or any transfer-encoding (chunks,
        # trailers) is not Envoy's and is never read.
        if "transfer-encoding" in self._headers:
            raise _Reject(413)
        if length is not None and (
            not length.isdigit() or int(length) > self._limits.max_body_bytes
        ):
            raise _Reject(413)

    def on_body(self, body: bytes) -> None:
        # Envoy sends no body unless with_request_body is on; nothing here reads it.
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Reject(413)

    def on_message_complete(self) -> None:
        self._msg_rx = 0
        self.last_rx = self._loop.time()
        parser = self._parser
        keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        method = parser.get_method().decode("ascii")
        if not keep_alive:
            self._closing = True
        if len(self._queue) >= self._limits.max_queued:
            raise _Reject(503)
        server = self._server
        attrs = request_to_attrs(method, self._url, self._headers, server.path_prefix)
        if attrs is None:
            self._push_ready(self._outside_prefix(method, keep_alive))
            return
        fast = server.check_now
        if fast is not None:
            # The common case decides without awaiting anything: answer now, no Task (a Task per
            # request cost ~10 µs of the ~50 µs budget). None means "needs I/O" (a key refresh).
            head, close = method == "HEAD", not keep_alive
            try:
                decision = fast(attrs)
                data = (
                    None
                    if decision is None
                    else render_decision(decision, head=head, close=close or server.draining)
                )
            except Exception as exc:  # never raise out of the transport: fail closed, loudly
                data = server.internal_error_bytes(exc, attrs, head, close)
            if data is not None:
                transport = self._transport
                if not self._queue and transport is not None:
                    # Nothing owed before this answer: straight out, no slot in the queue.
                    transport.write(data)
                    self._maybe_close()
                else:
                    self._push_ready(data)
                return
        slot = _Slot()
        self._queue.append(slot)
        # The task removes itself from server.tasks when done (cheaper than a done callback).
        slot.task = self._loop.create_task(
            self._answer(attrs, slot, method == "HEAD", not keep_alive)
        )
        server.tasks.add(slot.task)
        if len(self._queue) >= self._limits.max_pipelined:
            self._update_reading()

    # -- answering -------------------------------------------------------------------------------

    async def _answer(self, attrs: RequestAttrs, slot: _Slot, head: bool, close: bool) -> None:
        server = self._server
        try:
            decision = await server.check(attrs)
            data = render_decision(decision, head=head, close=close or server.draining)
        except asyncio.CancelledError:
            server.tasks.discard(slot.task)
            raise
        except Exception as exc:  # never raise out of the transport: fail closed, loudly
            data = server.internal_error_bytes(exc, attrs, head, close)
        server.tasks.discard(slot.task)
        slot.data = data
        if self._queue and self._queue[0] is slot:
            self._flush()

    def _outside_prefix(self, method: str, keep_alive: bool) -> bytes:
        close = not keep_alive or self._server.draining
        if close:
            self._closing = True
        return render_outside_prefix(head=method == "HEAD", close=close)

    def _push_ready(self, data: bytes) -> None:
        self._queue.append(_Slot(data))
        if self._queue[0].data is not None:
            self._flush()

    def _flush(self) -> None:
        transport = self._transport
        queue = self._queue
        if transport is None:
            return
        if len(queue) == 1 or queue[1].data is None:
            data = queue.popleft().data
            assert data is not None
        else:
            chunks = []
            while queue and (chunk := queue[0].data) is not None:
                chunks.append(chunk)
                queue.popleft()
            data = b"".join(chunks)
        transport.write(data)
        if self._read_paused:
            self._update_reading()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if (self._closing or self._server.draining) and not self._queue:
            self._closing = True
            if self._transport is not None:
                self._transport.close()

    def _reject(self, status: int) -> None:
        """Answer ``status`` after whatever is already queued, then close the connection."""
        self._closing = True
        self._in_head = False
        self._push_ready(self._server.reject_bytes(status, self._headers.get("x-request-id", "")))
        self._maybe_close()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None:
            return
        want_pause = self._write_paused or len(self._queue) >= self._limits.max_pipelined
        if want_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not want_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    # -- housekeeping (called by the server's sweeper) -------------------------------------------

    def expired(self, now: float) -> bool:
        if self._queue:
            return False  # a check is running: its answer is owed
        limits = self._limits
        if self._in_head:
            return now - self._head_started > limits.header_timeout_s
        return now - self.last_rx > limits.idle_timeout_s

    @property
    def idle(self) -> bool:
        return not self._queue

    def drain(self) -> None:
        """Read no further requests; close now if nothing is owed, else after the last answer."""
        self._closing = True
        self._maybe_close()

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


# ---------------------------------------------------------------------------------------- server


class HttpCheckServer:
    """Envoy's HTTP ext_authz endpoint around one ``check`` function.

    ``check`` turns a ``RequestAttrs`` into a ``Decision``; everything HTTP is done here.
    ``path_prefix`` must match the filter's ``http_service.path_prefix``: it is stripped before the
    path reaches ``check``, and requests outside it are answered 400 (a deny) without a check.
    ``on_error`` is told about every exception a check raised (the answer is then the 503
    ``internal_error`` deny), e.g. to count it. ``check_now``, when given, is tried first: a
    synchronous check that returns the decision, or None when it needs I/O (then ``check`` runs
    in a Task); both must decide identically. ``new_id`` supplies the decision id of the answers
    made here without the engine (internal error, transport rejections): by default the engine's
    own ``new_decision_id``, as for the gRPC servicer.
    """

    def __init__(
        self,
        check: CheckFn,
        *,
        path_prefix: str = "",
        on_error: ErrorHook | None = None,
        limits: HttpLimits | None = None,
        check_now: CheckNowFn | None = None,
        new_id: Callable[[], str] = new_decision_id,
    ) -> None:
        self.check = check
        self.new_id = new_id
        self.check_now = check_now
        self.path_prefix = path_prefix
        self.on_error = on_error
        self.limits = limits or HttpLimits()
        self.connections: set[_HttpCheckProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.rejected_connections = 0  # closed at once: over limits.max_connections
        self.oversize_messages = 0  # connections closed: a message over limits.max_message_bytes
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    @property
    def in_flight(self) -> int:
        """Checks started and not yet answered."""
        return len(self.tasks)

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> int:
        """Listen on ``host:port`` (0 = any free port) and return the bound port.

        ``reuse_port`` lets several worker processes bind the same port (SO_REUSEPORT); note that
        Envoy keeps few long-lived connections, so one port per worker balances better.
        """
        if self._server is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _HttpCheckProtocol(self),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=backlog,
        )
        self._schedule_sweep()
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting, answer what is in flight (within ``grace_s``), close every connection.

        Idle keep-alive connections are closed at once; a connection with checks in flight gets
        its answers (marked ``connection: close``) and is closed after the last one. Whatever is
        still running after ``grace_s`` is cancelled and its connection aborted.
        """
        if self._server is None or self.draining:
            return
        self.draining = True
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.drain()
        loop = self.loop
        deadline = loop.time() + grace_s
        while (self.connections or self.tasks) and loop.time() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            await asyncio.sleep(0.01)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
        except TimeoutError:  # pragma: no cover - only a stuck transport gets here
            log.warning("http listener did not close within 1 s")

    # -- internals used by the protocol ----------------------------------------------------------

    def internal_error_bytes(
        self, exc: BaseException, attrs: RequestAttrs, head: bool, close: bool
    ) -> bytes:
        decision_id = self.new_id()
        # Never the headers: they hold tokens. Type, ids and path are safe to log.
        log.error(
            "check failed; answering internal_error",
            exc_info=exc,
            extra={
                "request_id": attrs.request_id,
                "decision_id": decision_id,
                "method": attrs.method,
                "error_type": type(exc).__name__,
            },
        )
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:
                log.exception("on_error hook failed")
        return render_internal_error(
            decision_id, attrs.request_id, head=head, close=close or self.draining
        )

    def reject_bytes(self, status: int, request_id: str) -> bytes:
        """An early transport rejection (400/413/414/431/503) in the same shape as an engine
        deny: JSON body with code and request_id, decision metadata, the 400 challenge."""
        return render_rejection(status, self.new_id(), request_id)

    def _schedule_sweep(self) -> None:
        limits = self.limits
        interval = min(max(min(limits.idle_timeout_s, limits.header_timeout_s) / 4, 0.05), 5.0)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        try:
            now = self.loop.time()
            for conn in [c for c in self.connections if c.expired(now)]:
                conn.close()
        except Exception:  # pragma: no cover - a bug here must not stop future sweeps
            log.exception("http idle sweep failed")
        if not self.draining:
            self._schedule_sweep()
