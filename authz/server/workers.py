"""Process model: run the service in this process (``workers: 1``).

The multi-process mode (``--workers N``) lives here too once built; see README "Performance".
"""

from __future__ import annotations

import argparse
import logging

import prometheus_client as prom

from authz.config import Settings
from authz.observability import AuditLog, Metrics

log = logging.getLogger("authz.workers")


def _listens(settings: Settings, transport: str) -> tuple[str, str]:
    grpc_listen, http_listen = settings.server.grpc_listen, settings.server.http_listen
    if transport in ("http", "both") and not http_listen:
        http_listen = "127.0.0.1:9002"
    if transport == "grpc":
        http_listen = ""
    elif transport == "http":
        grpc_listen = ""
    return grpc_listen, http_listen


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from authz.cli import run_async  # noqa: PLC0415
    from authz.server.app import App  # noqa: PLC0415
    from authz.service import Service  # noqa: PLC0415

    grpc_listen, http_listen = _listens(settings, args.transport)
    registry = prom.CollectorRegistry()
    prom.ProcessCollector(registry=registry)
    prom.PlatformCollector(registry=registry)
    metrics = Metrics(registry)
    audit = AuditLog(
        log_allows=settings.audit.log_allows, allow_sample_rate=settings.audit.allow_sample_rate
    )

    def metrics_body() -> tuple[bytes, str]:
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST

    async def main() -> int:
        service = Service(settings, metrics=metrics, audit=audit, config_path=args.config)
        app = App(
            service,
            metrics_body=metrics_body,
            grpc_listen=grpc_listen,
            http_listen=http_listen,
        )
        await app.run()
        return 0

    return run_async(main)
