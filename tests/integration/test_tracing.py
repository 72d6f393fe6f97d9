"""OpenTelemetry tracing (docs/tracing.md): the real app on both transports, the dev IdP over
HTTP, spans captured by the SDK's in-memory exporter. One SERVER span per check, named for the
transport, child of the ``traceparent`` the request carried, with decision attributes and never
the token or a claim's value."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import grpc
import httpx
import prometheus_client as prom
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz import config as config_mod
from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import stack_config
from authz.observability import AuditLog, Metrics
from authz.policy.model import Decision, RequestAttrs
from authz.server.app import App
from authz.server.tracing import GRPC_SPAN, HTTP_SPAN, CheckTracer
from authz.service import Service

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        yield idp


class Traced:
    def __init__(self, app: App, exporter: InMemorySpanExporter) -> None:
        self.app = app
        self.exporter = exporter
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    async def grpc_check(self, path: str, headers: dict[str, str]) -> int:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = "GET", path, "orders.example.com"
        http.headers.update(headers)
        resp = await self.stub.Check(req, timeout=5)
        return int(resp.status.code)

    async def http_check(self, path: str, headers: dict[str, str]) -> int:
        async with httpx.AsyncClient(trust_env=False) as c:
            r = await c.get(f"http://127.0.0.1:{self.app.http_port}{path}", headers=headers)
        return r.status_code

    def spans(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, idp: DevIdP, extra: str = "") -> AsyncIterator[Traced]:
    path = tmp_path / "authz.yaml"
    path.write_text(stack_config(idp.base_url) + extra)
    settings = config_mod.load(path)
    registry = prom.CollectorRegistry()
    service = Service(
        settings, metrics=Metrics(registry), audit=AuditLog(io.StringIO()), config_path=str(path)
    )
    exporter = InMemorySpanExporter()
    app = App(
        service,
        metrics_body=lambda: (b"", "text/plain"),
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        admin_listen="",
        tracer=CheckTracer(settings.tracing, exporter=exporter),
    )
    await app.start()
    traced = Traced(app, exporter)
    try:
        for _ in range(200):  # wait for the issuer keys (readiness)
            if service.ready:
                break
            await asyncio.sleep(0.05)
        yield traced
    finally:
        await traced.channel.close()
        await app.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_span_is_the_child_of_the_forwarded_traceparent(
    tmp_path: Path, idp: DevIdP, transport: str
) -> None:
    token = idp.mint(aud="api://orders", scp="Orders.Read", extra={"name": "Ada Secret"})
    headers = {
        "authorization": f"Bearer {token}",
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=abc",
    }
    async with serve(tmp_path, idp) as t:
        if transport == "grpc":
            assert await t.grpc_check("/orders/7", headers) == 0
            assert await t.grpc_check("/orders/7", {"traceparent": TRACEPARENT}) != 0
        else:
            assert await t.http_check("/orders/7", headers) == 200
            assert await t.http_check("/orders/7", {"traceparent": TRACEPARENT}) == 401
        spans = t.spans()
    assert len(spans) == 2
    allow, deny = spans
    for span in spans:
        assert span.name == (GRPC_SPAN if transport == "grpc" else HTTP_SPAN)
        assert span.kind is SpanKind.SERVER
        assert span.context is not None
        assert span.parent is not None
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert f"{span.parent.span_id:016x}" == PARENT_ID
        assert span.parent.is_remote
        assert f"{span.context.span_id:016x}" != PARENT_ID
        assert span.resource.attributes["service.name"] == "entra-authz"
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
    assert allow.context is not None
    assert allow.context.trace_state.get("vendor") == "abc"
    assert dict(allow.attributes or {}) | {"authz.decision_id": "-"} == {
        **(
            {"rpc.system": "grpc", "rpc.service": "envoy.service.auth.v3.Authorization"}
            | {"rpc.method": "Check"}
            if transport == "grpc"
            else {}
        ),
        "authz.api": "orders",
        "authz.route": "read",
        "authz.decision": "allow",
        "authz.code": "ok",
        "authz.decision_id": "-",
        "http.response.status_code": 200,
    }
    assert (deny.attributes or {})["authz.decision"] == "deny"
    assert (deny.attributes or {})["authz.code"] == "missing_token"
    assert (deny.attributes or {})["http.response.status_code"] == 401
    assert deny.status.status_code is StatusCode.UNSET  # a deny is a decision, not an error
    # Never the token, nor a claim's value.
    for span in spans:
        text = repr(dict(span.attributes or {}))
        assert token not in text
        assert "Ada Secret" not in text
        assert "Bearer" not in text


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_without_traceparent_a_root_span_and_a_bad_one_is_ignored(
    tmp_path: Path, idp: DevIdP, transport: str
) -> None:
    async with serve(tmp_path, idp) as t:
        check = t.grpc_check if transport == "grpc" else t.http_check
        await check("/orders/healthz", {})
        await check("/orders/healthz", {"traceparent": "00-not-a-trace-01"})
        spans = t.spans()
    assert len(spans) == 2
    for span in spans:
        assert span.parent is None
        assert (span.attributes or {})["authz.route"] == "health"
        assert (span.attributes or {})["authz.decision"] == "allow"


async def test_sample_ratio_zero_records_only_sampled_parents(tmp_path: Path, idp: DevIdP) -> None:
    extra = "tracing:\n  sample_ratio: 0\n"
    async with serve(tmp_path, idp, extra) as t:
        await t.http_check("/orders/healthz", {})  # a root: ratio 0 drops it
        await t.http_check("/orders/healthz", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
        await t.http_check("/orders/healthz", {"traceparent": TRACEPARENT})  # sampled parent
        spans = t.spans()
    assert len(spans) == 1
    assert spans[0].parent is not None
    assert f"{spans[0].parent.span_id:016x}" == PARENT_ID


def test_tracing_settings_are_parsed(tmp_path: Path) -> None:
    text = stack_config("http://127.0.0.1:1") + (
        "tracing:\n  enabled: true\n  service_name: authz-edge\n  sample_ratio: 0.25\n"
        "  otlp: {endpoint: 'http://127.0.0.1:4318/v1/traces', protocol: http/protobuf}\n"
    )
    s = config_mod.parse(text, env={}).tracing
    assert (s.enabled, s.service_name, s.sample_ratio) == (True, "authz-edge", 0.25)
    assert s.otlp_endpoint == "http://127.0.0.1:4318/v1/traces"
    assert s.otlp_protocol == "http/protobuf"
    bad = stack_config("http://127.0.0.1:1") + "tracing:\n  otlp: {endpoint: 'http://u:p@h:1'}\n"
    with pytest.raises(config_mod.ConfigError, match=r"tracing\.otlp\.endpoint"):
        config_mod.parse(bad, env={})


async def test_a_failing_check_is_an_error_span_and_still_raises() -> None:
    exporter = InMemorySpanExporter()
    tracer = CheckTracer(config_mod.TracingSettings(enabled=True), exporter=exporter)
    attrs = RequestAttrs(method="GET", path="/x", headers={"traceparent": TRACEPARENT})

    async def broken(_: RequestAttrs) -> Decision:
        raise RuntimeError("token=abc")  # the message is never recorded

    def needs_io(_: RequestAttrs) -> Decision | None:
        return None

    with pytest.raises(RuntimeError):
        await tracer.wrap(broken, grpc=True)(attrs)
    assert tracer.wrap_now(needs_io)(attrs) is None  # no decision yet: no span
    (span,) = exporter.get_finished_spans()
    assert span.name == GRPC_SPAN
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError"
    assert (span.attributes or {})["authz.code"] == "internal_error"
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    tracer.shutdown()


class _Collector(http.server.BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector on 127.0.0.1: keeps every POSTed export request."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_the_configured_otlp_exporter_is_used(
    tmp_path: Path, idp: DevIdP, protocol: str
) -> None:
    """Tracing enabled in the config: the app builds its own tracer and exporter; over
    http/protobuf the spans reach a real (local) collector when the app stops."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.received.clear()
    port = server.server_address[1]
    endpoint = f"http://127.0.0.1:{port}/v1/traces" if protocol == "http/protobuf" else ""
    path = tmp_path / "authz.yaml"
    path.write_text(
        stack_config(idp.base_url)
        + "tracing:\n  enabled: true\n"
        + f"  otlp: {{endpoint: '{endpoint}', protocol: {protocol}, timeout_seconds: 1}}\n"
    )
    settings = config_mod.load(path)
    service = Service(
        settings, metrics=Metrics(prom.CollectorRegistry()), audit=AuditLog(io.StringIO())
    )
    app = App(
        service,
        metrics_body=lambda: (b"", "text/plain"),
        grpc_listen="",
        http_listen="127.0.0.1:0",
        admin_listen="",
    )
    try:
        assert app._tracer is not None
        exporter = app._tracer.provider._active_span_processor._span_processors[0].span_exporter  # type: ignore[attr-defined]
        assert type(exporter).__module__.startswith(
            "opentelemetry.exporter.otlp.proto." + ("http" if protocol != "grpc" else "grpc")
        )
        if protocol == "grpc":
            return  # built; no collector here to export to
        await app.start()
        async with httpx.AsyncClient(trust_env=False) as c:
            r = await c.get(
                f"http://127.0.0.1:{app.http_port}/orders/healthz",
                headers={"traceparent": TRACEPARENT},
            )
        assert r.status_code == 200
        await app.stop()  # flushes the batch
        assert len(_Collector.received) == 1
        (url, ctype, body) = _Collector.received[0]
        assert (url, ctype) == ("/v1/traces", "application/x-protobuf")
        export = ExportTraceServiceRequest.FromString(body)
        (span,) = export.resource_spans[0].scope_spans[0].spans
        assert span.name == HTTP_SPAN
        assert span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_ID
    finally:
        await app.stop()
        server.shutdown()
        server.server_close()
