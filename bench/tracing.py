"""What tracing costs per check, in-process (docs/tracing.md): ``python -m bench.tracing``.

The wrapper is measured around a check that returns a prepared allow at once, so the figures are
the tracing overhead alone (add them to a check's own cost, docs/performance.md). The exporter is a
``BatchSpanProcessor`` in front of an exporter that drops every batch: the processor's queue,
thread and batching are real, the network is not. Off means "not wrapped" (what the app does when
``tracing.enabled`` is false), so its cost is the bare call.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from authz.config import TracingSettings
from authz.policy.decisions import allow
from authz.policy.model import Decision, HeaderContract, RequestAttrs
from authz.server.tracing import CheckTracer

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _tracer(ratio: float) -> CheckTracer:
    # As in production: batched off the check path.
    settings = TracingSettings(enabled=True, sample_ratio=ratio)
    return CheckTracer(settings, exporter=_Drop(), batched=True)


def best_us(fn: object, number: int, rounds: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6  # type: ignore[arg-type]


def measure(number: int) -> dict[str, float]:
    decision = allow(
        decision_id="d" * 32,
        request_id="r-1",
        api=None,
        route=None,
        principal=None,
        contract=HeaderContract(),
    )

    def check_now(attrs: RequestAttrs) -> Decision | None:
        return decision

    plain = RequestAttrs(method="GET", path="/orders/42", headers={"authorization": "Bearer x"})
    parented = RequestAttrs(
        method="GET",
        path="/orders/42",
        headers={"authorization": "Bearer x", "traceparent": TRACEPARENT},
    )
    sampled = _tracer(1.0)
    unsampled = _tracer(0.0)
    on = sampled.wrap_now(check_now)
    on_zero = unsampled.wrap_now(check_now)
    out = {
        "tracing_off_us": best_us(lambda: check_now(plain), number),
        "tracing_on_root_us": best_us(lambda: on(plain), number),
        "tracing_on_traceparent_us": best_us(lambda: on(parented), number),
        "tracing_on_ratio0_root_us": best_us(lambda: on_zero(plain), number),
    }
    sampled.shutdown()
    unsampled.shutdown()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=20000, help="calls per round (best of 5)")
    args = p.parse_args(argv)
    print(json.dumps({k: round(v, 2) for k, v in measure(args.number).items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
