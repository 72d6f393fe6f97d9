"""OpenTelemetry tracing of checks: one SERVER span per check, child of the ``traceparent`` Envoy
forwarded (docs/tracing.md). Optional: needs the ``[otel]`` extra, and is off by default.

Zero cost when off: the application wraps its check functions with ``CheckTracer.wrap`` /
``wrap_now`` only when ``tracing.enabled`` is true, and imports this module only then; the
transports never test a flag per check.

The span is recorded *after* the decision, with the check's start time: nothing inside a check
creates spans, so no context is attached or detached on the hot path, and a ``check_now`` that
returns None (it needs I/O; ``check`` runs next) records nothing. Span names follow the RPC
(``envoy.service.auth.v3.Authorization/Check``) or the HTTP check (``ext_authz http check``).
Attributes: ``authz.api``, ``authz.route``, ``authz.decision`` (allow | deny | dry-run-allow),
``authz.code``, ``authz.decision_id``, ``http.response.status_code`` and, for gRPC, the
``rpc.*`` names. Never a header value, a token, nor a claim's value.

The parent comes from the request's own ``traceparent``/``tracestate`` headers (W3C trace
context), which reach us inside ``CheckRequest.attributes.request.http.headers`` over gRPC and as
forwarded headers over HTTP (the shipped ``envoy/*-http.yaml`` list them in ``allowed_headers``).
A malformed ``traceparent`` is ignored (a new root), as the W3C spec says.

Tracing never decides: an error while recording a span is logged (once per kind) and the
decision is returned unchanged; an exception from the check itself is recorded on the span
(status ERROR) and re-raised, so the transport still answers its fail-closed 503.

Must not import grpc or prometheus; imported only by ``authz.server.app`` when tracing is on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from authz.config import TracingSettings
from authz.policy.model import Decision, RequestAttrs

__all__ = ["GRPC_SPAN", "HTTP_SPAN", "CheckTracer", "otlp_exporter"]

log = logging.getLogger("authz.tracing")

GRPC_SPAN = "envoy.service.auth.v3.Authorization/Check"
HTTP_SPAN = "ext_authz http check"
_GRPC_ATTRS: Mapping[str, AttributeValue] = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.auth.v3.Authorization",
    "rpc.method": "Check",
}
_NO_ATTRS: Mapping[str, AttributeValue] = {}

CheckFn = Callable[[RequestAttrs], Awaitable[Decision]]
CheckNowFn = Callable[[RequestAttrs], Decision | None]


def otlp_exporter(settings: TracingSettings) -> SpanExporter:
    """The OTLP span exporter ``settings`` name (gRPC or HTTP/protobuf)."""
    endpoint = settings.otlp_endpoint or None
    if settings.otlp_protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint, timeout=settings.otlp_timeout_s)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint, timeout=settings.otlp_timeout_s)


def _decision_word(d: Decision) -> str:
    if not d.allowed:
        return "deny"
    return "dry-run-allow" if d.would_deny else "allow"


class CheckTracer:
    """A tracer provider of our own (never the process-global one) and the check wrappers.

    Without ``exporter``, the configured OTLP exporter runs behind a ``BatchSpanProcessor`` (a
    background thread; a full queue drops spans, never blocks a check). A given ``exporter``
    (tests: an ``InMemorySpanExporter``) is called synchronously unless ``batched``."""

    def __init__(
        self,
        settings: TracingSettings,
        *,
        exporter: SpanExporter | None = None,
        batched: bool = False,
    ) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if exporter is None:
            self.provider.add_span_processor(BatchSpanProcessor(otlp_exporter(settings)))
        elif batched:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("authz")
        self._propagator = TraceContextTextMapPropagator()
        self._failed: set[str] = set()

    def wrap(self, check: CheckFn, *, grpc: bool) -> CheckFn:
        """``check`` recording one span per decision (named for the transport)."""
        name, extra = (GRPC_SPAN, _GRPC_ATTRS) if grpc else (HTTP_SPAN, _NO_ATTRS)
        record, failed = self._record, self._record_error

        async def traced(attrs: RequestAttrs) -> Decision:
            start = time.time_ns()
            try:
                decision = await check(attrs)
            except Exception as exc:  # cancellation is not an error: not recorded
                failed(name, extra, attrs, start, exc)
                raise
            record(name, extra, attrs, start, decision)
            return decision

        return traced

    def wrap_now(self, check_now: CheckNowFn, *, grpc: bool = False) -> CheckNowFn:
        """``check_now`` recording a span when it decided (None: ``check`` will, and records)."""
        name, extra = (GRPC_SPAN, _GRPC_ATTRS) if grpc else (HTTP_SPAN, _NO_ATTRS)
        record, failed = self._record, self._record_error

        def traced(attrs: RequestAttrs) -> Decision | None:
            start = time.time_ns()
            try:
                decision = check_now(attrs)
            except Exception as exc:  # cancellation is not an error: not recorded
                failed(name, extra, attrs, start, exc)
                raise
            if decision is not None:
                record(name, extra, attrs, start, decision)
            return decision

        return traced

    def shutdown(self) -> None:
        """Flush what is queued and stop the exporter (bounded by its own timeout)."""
        try:
            self.provider.shutdown()
        except Exception:
            log.exception("tracing shutdown failed")

    # -- internals -------------------------------------------------------------------------------

    def _parent(self, attrs: RequestAttrs) -> Context | None:
        headers = attrs.headers
        if "traceparent" not in headers:
            return None
        return self._propagator.extract(headers)

    def _record(
        self,
        name: str,
        extra: Mapping[str, AttributeValue],
        attrs: RequestAttrs,
        start: int,
        d: Decision,
    ) -> None:
        attributes: dict[str, AttributeValue] = {
            **extra,
            "authz.api": d.api,
            "authz.route": d.route,
            "authz.decision": _decision_word(d),
            "authz.code": d.code,
            "authz.decision_id": d.decision_id,
            "http.response.status_code": d.status,
        }
        error = "internal_error" if d.code == "internal_error" else None
        self._emit(name, attrs, start, attributes, error, "record", "could not record a check span")

    def _record_error(
        self,
        name: str,
        extra: Mapping[str, AttributeValue],
        attrs: RequestAttrs,
        start: int,
        exc: BaseException,
    ) -> None:
        attributes = {**extra, "authz.decision": "deny", "authz.code": "internal_error"}
        # The exception type only: a message could quote request data.
        self._emit(
            name,
            attrs,
            start,
            attributes,
            type(exc).__name__,
            "error",
            "could not record a failed check's span",
        )

    def _emit(
        self,
        name: str,
        attrs: RequestAttrs,
        start: int,
        attributes: Mapping[str, AttributeValue],
        error: str | None,
        kind: str,
        failure: str,
    ) -> None:
        """One ended SERVER span (``error``: its ERROR status description); a failure to record
        is logged once per ``kind`` and never reaches the check."""
        try:
            span = self._tracer.start_span(
                name,
                context=self._parent(attrs),
                kind=SpanKind.SERVER,
                start_time=start,
                attributes=attributes,
            )
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
        except Exception:
            self._once(kind, failure)

    def _once(self, kind: str, message: str) -> None:
        if kind not in self._failed:
            self._failed.add(kind)
            log.exception("%s (tracing never changes a decision; logged once)", message)
