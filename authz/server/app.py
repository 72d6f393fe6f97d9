"""The process: listeners, health, reflection, the admin HTTP endpoint, signals and lifecycle.

One ``App`` runs one ``Service`` behind the gRPC transport (``grpc.aio``), optionally the HTTP
ext_authz transport, and the admin listener (``/metrics``, ``/healthz`` liveness, ``/readyz``
readiness, and with ``revocation.admin_api`` the token-protected ``/admin/revocations`` API of
``authz.server.admin_api``). gRPC health reports NOT_SERVING until every configured issuer's
keys are loaded.

SIGTERM/SIGINT: report NOT_SERVING, stop accepting, answer in-flight checks within the grace
period, exit. SIGHUP (or a change of the watched config file): reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz.policy.model import Decision, RequestAttrs
from authz.server import servicer as servicer_mod
from authz.server.admin_api import AdminRequest, AdminResponse, RevocationApi
from authz.server.http import HttpCheckServer, HttpLimits
from authz.server.ports import split_listen
from authz.service import Service

if TYPE_CHECKING:
    from authz.server.tracing import CheckTracer

log = logging.getLogger("authz.app")

SERVICE_NAME = servicer_mod.SERVICE_NAME


def split_hostport(addr: str) -> tuple[str, int]:
    """A validated listen address (``config.LISTEN_RE``) as a bindable ``(host, port)``: an IPv6
    host without its brackets (``ports.split_listen`` splits)."""
    host, port = split_listen(addr)
    return host.strip("[]"), port


class AdminServer:
    """A deliberately tiny HTTP/1.0-style server: GET /metrics, /healthz, /readyz; and the
    revocation API's requests (headers parsed, body bounded) handed to ``api``."""

    def __init__(
        self,
        *,
        metrics_body: Callable[[], tuple[bytes, str]],
        ready: Callable[[], bool],
        api: RevocationApi | None = None,
    ) -> None:
        self._metrics_body = metrics_body
        self._ready = ready
        self._api = api
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            target = rest.split(" ", 1)[0]
            path = target.split("?", 1)[0]
            if self._api is not None and self._api.handles(path):
                response = await self._api_request(method, target, head, reader, writer)
                writer.write(_http(response, head_only=method == "HEAD"))
                await writer.drain()
                return
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                body, ctype = self._metrics_body()
                status = "200 OK"
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ok = self._ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _api_request(
        self,
        method: str,
        target: str,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> AdminResponse:
        assert self._api is not None
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            name = name.strip().lower()
            if not sep or not name or name != name.strip() or " " in name:
                return _bad_request("malformed header line")
            if name in headers:
                if name in _SINGLE_HEADERS:
                    return _bad_request(f"more than one {name} header")
                headers[name] += ", " + value.strip()
            else:
                headers[name] = value.strip()
        if "transfer-encoding" in headers:
            return _bad_request("send a content-length, not a transfer-encoding")
        length = headers.get("content-length", "0")
        if not length.isascii() or not length.isdigit():
            return _bad_request("bad content-length")
        if int(length) > self._api.max_body:
            return AdminResponse(413, b'{"error":"request_too_large"}')
        body = await asyncio.wait_for(reader.readexactly(int(length)), timeout=10)
        peer = writer.get_extra_info("peername")
        return await self._api.handle(
            AdminRequest(
                method=method,
                target=target,
                headers=headers,
                body=body,
                peer=str(peer[0]) if isinstance(peer, tuple) else "",
            )
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


_SINGLE_HEADERS = frozenset({"authorization", "content-length", "content-type", "host"})
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    503: "Service Unavailable",
}


def _bad_request(message: str) -> AdminResponse:
    return AdminResponse(400, b'{"error":"invalid_request","message":"%s"}' % message.encode())


def _http(r: AdminResponse, *, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {r.status} {_REASONS.get(r.status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in r.headers]
    lines += [f"content-length: {len(r.body)}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else r.body)


class App:
    def __init__(
        self,
        service: Service,
        *,
        metrics_body: Callable[[], tuple[bytes, str]],
        grpc_listen: str | None = None,
        http_listen: str | None = None,
        admin_listen: str | None = None,
        reuse_port: bool = False,
        watch_interval_s: float = 2.0,
        grpc_extra_listens: Sequence[str] = (),
        http_extra_listens: Sequence[str] = (),
        tracer: CheckTracer | None = None,
        after_reload: Callable[[], None] | None = None,
    ) -> None:
        s = service.settings.server
        # Tracing (docs/tracing.md) wraps the check functions once, here: off costs nothing.
        if tracer is None and service.settings.tracing.enabled:
            from authz.server.tracing import CheckTracer  # noqa: PLC0415 - the [otel] extra

            tracer = CheckTracer(service.settings.tracing)
        self._tracer = tracer
        self.service = service
        self.grpc_listen = s.grpc_listen if grpc_listen is None else grpc_listen
        self.http_listen = s.http_listen if http_listen is None else http_listen
        self.admin_listen = s.admin_listen if admin_listen is None else admin_listen
        self.grace_s = s.shutdown_grace_s
        self.reuse_port = reuse_port
        # Extra addresses of the same servers: a worker's own port (authz.server.workers), so
        # Envoy can address each worker process as its own endpoint.
        self.grpc_extra_listens = tuple(grpc_extra_listens)
        self.http_extra_listens = tuple(http_extra_listens)
        self._http_extra: list[HttpCheckServer] = []
        self.watch_interval_s = watch_interval_s
        # Called after a reload that swapped in a new configuration (lifecycle: gc.freeze()).
        self.after_reload = after_reload
        self._grpc: grpc.aio.Server | None = None
        self._http: HttpCheckServer | None = None
        self._admin = AdminServer(
            metrics_body=metrics_body, ready=lambda: service.ready, api=RevocationApi(service)
        )
        self._health = health.aio.HealthServicer()
        self._stop = asyncio.Event()
        self._stopped = False
        self._signals = False
        self._tasks: list[asyncio.Task[None]] = []
        self.grpc_port = 0
        self.http_port = 0
        self.admin_port = 0

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.admin_listen:
            self.admin_port = await self._admin.start(*split_hostport(self.admin_listen))
        await self._set_health(serving=False)
        if self.grpc_listen:
            options = [("grpc.so_reuseport", 1 if self.reuse_port else 0)]
            self._grpc = grpc.aio.server(options=options)
            servicer_mod.add_to_server(
                servicer_mod.AuthorizationServicer(self._check(grpc=True), on_error=self._on_error),
                self._grpc,
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            servicer_mod.enable_reflection(
                self._grpc, health_pb2.DESCRIPTOR.services_by_name["Health"]
            )
            self.grpc_port = self._grpc.add_insecure_port(self.grpc_listen)
            for extra in self.grpc_extra_listens:
                if not self._grpc.add_insecure_port(extra):
                    raise OSError(f"cannot listen on {extra}")
            await self._grpc.start()
        if self.http_listen:
            self._http = self._http_server()
            host, port = split_hostport(self.http_listen)
            self.http_port = await self._http.start(host, port, reuse_port=self.reuse_port)
            for extra in self.http_extra_listens:
                server = self._http_server()
                await server.start(*split_hostport(extra), reuse_port=self.reuse_port)
                self._http_extra.append(server)
        await self.service.start()
        self._tasks.append(asyncio.create_task(self._readiness_loop()))
        log.info(
            "serving: grpc=%s http=%s admin=%s",
            self.grpc_port or "-",
            self.http_port or "-",
            self.admin_port or "-",
        )

    def _http_server(self) -> HttpCheckServer:
        tracer = self._tracer
        check_now = self.service.check_now
        return HttpCheckServer(
            self._check(grpc=False),
            on_error=self._on_error,
            check_now=check_now if tracer is None else tracer.wrap_now(check_now),
            limits=HttpLimits.for_token(self.service.settings.tokens.max_token_bytes),
        )

    def _check(self, *, grpc: bool) -> Callable[[RequestAttrs], Awaitable[Decision]]:
        check = self.service.check
        return check if self._tracer is None else self._tracer.wrap(check, grpc=grpc)

    def _on_error(self, exc: BaseException) -> None:
        log.error("transport error turned into internal_error deny: %r", exc)
        self.service.metrics.internal_errors.labels("transport").inc()

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _readiness_loop(self) -> None:
        """Keep health, the ready gauge, cache metrics and config reloads up to date."""
        was_ready: bool | None = None
        last_watch = time.monotonic()
        while not self._stop.is_set():
            ready = self.service.ready
            if ready != was_ready:
                await self._set_health(serving=ready)
                self.service.metrics.ready.set(1 if ready else 0)
                log.info("readiness: %s", "ready" if ready else "not ready")
                was_ready = ready
            self.service.housekeeping()
            now = time.monotonic()
            if now - last_watch >= self.watch_interval_s:
                last_watch = now
                if self.service.config_changed():
                    await self._reload()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.25)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._signals = True

    def _remove_signal_handlers(self) -> None:
        if self._signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._signals = False

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.append(task)

    async def _reload(self) -> None:
        if await self.service.reload() and self.after_reload is not None:
            self.after_reload()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Graceful: NOT_SERVING first (Envoy's health checks move away), then stop accepting and
        let in-flight checks finish within the grace period. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.service.shutting_down = True
        await self._set_health(serving=False)
        self.service.metrics.ready.set(0)
        waits: list[Awaitable[object]] = []
        if self._grpc is not None:
            waits.append(self._grpc.stop(self.grace_s))
        if self._http is not None:
            waits.append(self._http.close(self.grace_s))
        waits += [server.close(self.grace_s) for server in self._http_extra]
        await asyncio.gather(*waits, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.service.housekeeping()
        await self.service.close()
        await self._admin.close()
        if self._tracer is not None:
            await asyncio.to_thread(self._tracer.shutdown)  # flushes queued spans
        self._remove_signal_handlers()
        log.info("stopped")

    async def run(self) -> None:
        await self.start()
        self.install_signal_handlers()
        await self.wait()
        await self.stop()
