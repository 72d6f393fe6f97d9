"""The process lifecycle, in one place: build the service once, run it, reload it, drain it.

``serve`` is what ``authz serve`` calls (``authz.cli`` only parses arguments): it checks the
listen addresses, picks the process model (``authz.server.workers`` documents it) and runs either

- one process: ``run_process`` with the configured listeners and an own ``/metrics``, or
- a ``Supervisor`` that starts N worker processes; each worker's entry point, ``worker_main``,
  calls the same ``run_process`` with a worker's options (SO_REUSEPORT, its own ports, metrics
  in prometheus-client's multiprocess files, no admin listener, readiness over a pipe).

``run_process``: build ``Service`` + ``App``; start (every listener, then the key refresh);
SIGHUP (or a change of the watched config file) reloads; SIGTERM/SIGINT drain (NOT_SERVING,
in-flight checks answered within ``shutdown_grace_seconds``) and exit.

The cyclic garbage collector (``settle_heap``, docs/performance.md "Many users and the GC"):
what start-up built (modules, protobuf descriptors, grpc, the compiled configuration: most of
the heap) lives until exit and holds no garbage, yet every full collection would walk it again.
After start-up and after each reload, ``settle_heap`` collects once and moves everything alive
to the permanent generation (``gc.freeze()``), so full collections walk only what was allocated
since: the claims cache and per-check garbage. Collection pauses are timed into
``authz_gc_pause_seconds`` (``authz.observability.GcPauses``).

Must not import: ``authz.cli`` or the dev tools; the servers and prometheus_client are imported
inside the functions that run them (``worker_main`` must set up logging and the multiprocess
directory before prometheus_client is imported).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authz import config as config_mod
from authz.config import Settings
from authz.server import ports, procfs
from authz.server.workers import WORKER_ENV, Supervisor

if TYPE_CHECKING:
    from authz.server.app import App
    from authz.service import Service

log = logging.getLogger("authz.lifecycle")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What ``authz serve`` was asked for, beside the configuration file's settings."""

    config_path: str
    transport: str = "config"  # config | grpc | http | both
    workers: int | None = None  # None: server.workers; 0: one per available CPU
    log_level: str = "INFO"
    plain_logs: bool = False


@dataclass(frozen=True, slots=True)
class ProcessOptions:
    """How one serving process (the only one, or worker ``worker``) listens and reports."""

    config_path: str
    grpc_listen: str
    http_listen: str
    admin_listen: str | None = None  # None: server.admin_listen; "": none (the supervisor's)
    reuse_port: bool = False
    grpc_extra_listens: tuple[str, ...] = ()
    http_extra_listens: tuple[str, ...] = ()
    shared_metrics: bool = False  # values in PROMETHEUS_MULTIPROC_DIR; the supervisor serves them
    worker: int | None = None  # the worker's index; None: the only process
    ready_fd: int = -1  # a worker reports readiness here (b"1"/b"0") and stops if orphaned


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed (it cuts per-check CPU), plain asyncio otherwise."""
    try:
        import uvloop  # noqa: PLC0415  (optional: absent off Linux, the ImportError falls back)

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def resolve_workers(configured: int, cli: int | None) -> int:
    """``--workers`` wins over ``server.workers``; 0 means one per available CPU."""
    n = configured if cli is None else cli
    if n < 0:
        raise ValueError("--workers must be >= 0")
    return procfs.available_cpus() if n == 0 else n


# ---------------------------------------------------------------------------- entry point


def serve(settings: Settings, opts: ServeOptions) -> int:
    """``authz serve``: 0 after a clean stop, 2 when it cannot start (one logged line).

    Raises OSError/RuntimeError when a listener fails to bind after the checks (the CLI turns
    it into one "cannot start" line)."""
    grpc_listen, http_listen = ports.listens(settings, opts.transport)
    problem = ports.unavailable(
        {
            "server.grpc_listen": grpc_listen,
            "server.http_listen": http_listen,
            "server.admin_listen": settings.server.admin_listen,
        }
    )
    if problem:
        log.error("cannot start: %s", problem)
        return 2
    try:
        n = resolve_workers(settings.server.workers, opts.workers)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if n <= 1:
        single = ProcessOptions(
            config_path=opts.config_path, grpc_listen=grpc_listen, http_listen=http_listen
        )
        return run_async(lambda: run_process(settings, single))
    try:
        plans = ports.plan_listens(ports.pin(grpc_listen), ports.pin(http_listen), n, os.environ)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    multiproc_dir = tempfile.mkdtemp(prefix="authz-metrics-")
    try:
        supervisor = Supervisor(
            settings,
            plans,
            config_path=opts.config_path,
            log_level=opts.log_level,
            plain_logs=opts.plain_logs,
            multiproc_dir=multiproc_dir,
        )
        return run_async(supervisor.main)
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)


def worker_main() -> int:
    """A worker process: ``python -c 'from authz.server.lifecycle import worker_main; ...'`` with
    ``AUTHZ_WORKER`` (JSON) and ``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor."""
    spec: dict[str, Any] = json.loads(os.environ[WORKER_ENV])
    from authz.observability import configure_logging  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)

    configure_logging(
        spec["log_level"], json_format=not spec["plain_logs"], worker=int(spec["index"])
    )
    try:
        settings = config_mod.load(spec["config"])
    except config_mod.ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    opts = ProcessOptions(
        config_path=spec["config"],
        grpc_listen=spec["grpc"],
        http_listen=spec["http"],
        admin_listen="",
        reuse_port=True,
        grpc_extra_listens=(spec["grpc_own"],) if spec["grpc_own"] else (),
        http_extra_listens=(spec["http_own"],) if spec["http_own"] else (),
        shared_metrics=True,
        worker=int(spec["index"]),
        ready_fd=int(spec["ready_fd"]),
    )
    return run_async(lambda: run_process(settings, opts))


# -------------------------------------------------------------------------- one process


# gc.set_threshold: the young generations as CPython's default (700, 10: a young collection walks
# at most a few thousand objects, well under a millisecond), the oldest one collected after 100
# collections of the middle one instead of 10. A full collection walks the whole claims cache;
# with every check a miss (more users than cache entries) the default ran one every ~6 000
# checks, 15-35 ms each on the bench machine; 100 makes that ten times rarer. Cyclic garbage
# waits longer in the oldest generation (the check path makes none: tests/unit/test_gc_shape.py).
# Measured: docs/performance.md, "Many users and the GC".
GC_THRESHOLDS = (700, 10, 100)


def settle_heap() -> None:
    """Collect, then freeze every surviving object into the permanent generation: start-up's
    (and a reload's) long-lived objects stop costing each full collection a walk over them.

    ``gc.unfreeze()`` first: the previous configuration's objects, frozen at the last settle,
    are garbage after a reload; frozen, a reference cycle among them would never be collected.
    Objects without cycles (every claims-cache entry) are freed by reference counting whether
    frozen or not. One full collection per start or reload (tens of ms with a full cache)."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def run_process(settings: Settings, opts: ProcessOptions) -> int:
    """Build once, run until SIGTERM/SIGINT (SIGHUP reloads), drain. 0 after a clean stop;
    a worker that fails to start logs why and answers 1 (its supervisor restarts it)."""
    parent = os.getppid()  # a worker stops when this is no longer its parent
    import prometheus_client as prom  # noqa: PLC0415  (a worker: after PROMETHEUS_MULTIPROC_DIR)

    from authz.observability import AuditLog, GcPauses, Metrics  # noqa: PLC0415  (lazy: importing the lifecycle loads no server code)
    from authz.server.app import App  # noqa: PLC0415  (lazy: importing the lifecycle loads no server code)
    from authz.service import Service  # noqa: PLC0415  (lazy: importing the lifecycle loads no server code)

    registry = prom.CollectorRegistry()
    if opts.shared_metrics:  # values live in the multiprocess files; /metrics is the supervisor's

        def metrics_body() -> tuple[bytes, str]:
            return b"", "text/plain"

    else:
        prom.ProcessCollector(registry=registry)
        prom.PlatformCollector(registry=registry)

        def metrics_body() -> tuple[bytes, str]:
            return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST

    audit = AuditLog(
        log_allows=settings.audit.log_allows, allow_sample_rate=settings.audit.allow_sample_rate
    )
    metrics = Metrics(registry)
    service = Service(settings, metrics=metrics, audit=audit, config_path=opts.config_path)
    app = App(
        service,
        metrics_body=metrics_body,
        grpc_listen=opts.grpc_listen,
        http_listen=opts.http_listen,
        admin_listen=opts.admin_listen,
        reuse_port=opts.reuse_port,
        grpc_extra_listens=opts.grpc_extra_listens,
        http_extra_listens=opts.http_extra_listens,
        after_reload=settle_heap,
    )
    try:
        await app.start()
    except Exception:
        if opts.worker is None:
            raise  # the only process: the CLI turns it into one "cannot start" line
        log.exception("worker %s failed to start", opts.worker)
        await app.stop()
        return 1
    gc_pauses = GcPauses(metrics.gc_pause)
    gc_pauses.install()
    flusher = asyncio.create_task(_flush_every(gc_pauses.flush, 0.25))
    settle_heap()
    app.install_signal_handlers()
    reporter = None
    if opts.ready_fd >= 0:
        reporter = asyncio.create_task(_report_to_supervisor(service, app, opts.ready_fd, parent))
    await app.wait()
    await app.stop()
    flusher.cancel()
    gc_pauses.uninstall()
    if reporter is not None:
        reporter.cancel()
        with contextlib.suppress(OSError):
            os.write(opts.ready_fd, b"0")
    return 0


async def _flush_every(flush: Callable[[], None], seconds: float) -> None:
    """GC pauses into their histogram, off the collector's callback (``GcPauses``)."""
    while True:
        await asyncio.sleep(seconds)
        flush()


async def _report_to_supervisor(service: Service, app: App, ready_fd: int, parent: int) -> None:
    """Readiness to the supervisor (b"1"/b"0" on change); stop if the supervisor is gone."""
    was: bool | None = None
    while True:
        ready = service.ready
        if ready != was:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"1" if ready else b"0")
            was = ready
        if os.getppid() != parent:
            log.warning("supervisor gone; stopping")
            app.request_stop()
            return
        await asyncio.sleep(0.1)
