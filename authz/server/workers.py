"""Process model: one process (``workers: 1``) or a supervisor with N worker processes; this
module is the supervisor (the lifecycle every serving process runs is ``authz.server.lifecycle``).

``workers: 0`` / ``--workers 0`` (the default) means one worker per available CPU (the affinity
mask capped by the cgroup CPU quota, see :func:`available_cpus`). One worker (``--workers 1``, or
a single available CPU) runs the service in this process, with no supervisor.

``--workers N`` (N > 1) makes this process a *supervisor* that starts N workers
(``sys.executable`` re-run, not ``fork``: gRPC's core does not survive a fork) and never decides
a request itself:

- Each worker runs its own ``Service``/``App`` (``lifecycle.run_process``): its own key store,
  claims cache and event loop.
- Listening: every worker binds the configured gRPC/HTTP ports with SO_REUSEPORT (the kernel
  spreads *connections*), and also a port of its own, ``port + 100 * (i + 1)`` for worker ``i``
  (gRPC 9001 -> 9101, 9201, ...; HTTP 9002 -> 9102, 9202, ...: adjacent ports never collide).
  Envoy multiplexes all checks of one Envoy worker over one HTTP/2 connection, so a shared port pins
  every gRPC check to one process; listing the per-worker ports as endpoints
  (``envoy/sidecar-workers.yaml``) spreads them per check. Environment knobs (no config keys, so
  a config file stays valid for single-process runs):
  ``AUTHZ_WORKER_PORTS=off`` (no per-worker ports), ``AUTHZ_WORKER_GRPC_PORT_BASE`` /
  ``AUTHZ_WORKER_HTTP_PORT_BASE`` (worker ``i`` listens on ``base + i`` instead). Port 0 (tests)
  is resolved to a free port once, by the supervisor, so every worker shares the same one. The
  plan is ``authz.server.ports``.
- The admin listener (``/metrics``, ``/healthz``, ``/readyz``) is the supervisor's. Metrics use
  prometheus-client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is a fresh temporary
  directory set in every worker's environment before it imports prometheus_client, and
  ``/metrics`` is ``MultiProcessCollector`` over it (counters and histograms sum across workers,
  gauges follow their ``multiprocess_mode``) plus ``authz_workers`` / ``authz_worker_restarts``
  and ``process_*`` for the supervisor and its workers together, read from ``/proc``
  (``authz.server.procfs``).
  A dead worker's gauge files are removed (its counters stay: totals must not go backwards).
- The revocation admin API (``revocation.admin_api``) is the supervisor's too, as it owns the admin
  listener: it runs its own ``Service`` (keys, verifier, revocation file) only to decide admin
  requests with the same engine; rules it adds go to the file, which every worker polls.
- Readiness: each worker reports ready/not ready over a pipe; ``/readyz`` is 200 only while every
  worker is alive and ready.
- Signals: SIGTERM/SIGINT are forwarded (each worker reports NOT_SERVING, finishes in-flight
  checks within ``shutdown_grace_seconds`` and exits; stragglers are killed after the grace
  period + 5 s); SIGHUP is forwarded (each worker reloads its configuration).
- A worker that exits unexpectedly is restarted after a backoff (0.5 s doubling to 30 s; reset
  once a worker has lived 60 s). A worker exits by itself when its supervisor disappears.

Must not import: ``authz.server.lifecycle`` (it imports this module; a worker is started by
name, ``_BOOT``) or ``authz.cli``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from authz.config import Settings
from authz.server.ports import WorkerListens
from authz.server.procfs import cpu_seconds, open_fds, rss_bytes

if TYPE_CHECKING:
    from authz.service import Service

log = logging.getLogger("authz.workers")

WORKER_ENV = "AUTHZ_WORKER"  # JSON spec of one worker (set by the supervisor only)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
KILL_AFTER_GRACE_S = 5.0


# -------------------------------------------------------------------------------- supervisor


@dataclass
class _Worker:
    index: int
    listens: WorkerListens
    proc: subprocess.Popen[bytes] | None = None
    ready_r: int = -1
    ready: bool = False
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)


_BOOT = "import sys; from authz.server.lifecycle import worker_main; sys.exit(worker_main())"


class Supervisor:
    """Starts, watches, restarts and signals the workers; serves the admin endpoint."""

    def __init__(
        self,
        settings: Settings,
        plans: Sequence[WorkerListens],
        *,
        config_path: str,
        log_level: str,
        plain_logs: bool,
        multiproc_dir: str,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log_level = log_level
        self.plain_logs = plain_logs
        self.workers = [_Worker(i, p) for i, p in enumerate(plans)]
        self.grace_s = settings.server.shutdown_grace_s
        self.restarts = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self.multiproc_dir = multiproc_dir  # PROMETHEUS_MULTIPROC_DIR of every worker
        self.admin_service: Service | None = None  # with revocation.admin_api only
        self._reloads: set[asyncio.Task[bool]] = set()

    # ------------------------------------------------------------------------------- run

    async def main(self) -> int:
        """Run until SIGTERM/SIGINT; then stop every worker (``lifecycle.serve`` runs this)."""
        from authz.server.admin_api import RevocationApi  # noqa: PLC0415  (lazy: importing the lifecycle loads no server code)
        from authz.server.app import AdminServer, split_hostport  # noqa: PLC0415  (lazy: importing the lifecycle loads no server code)

        self.admin_service = await self._admin_service()
        api = RevocationApi(self.admin_service) if self.admin_service is not None else None
        admin = AdminServer(metrics_body=self.metrics_body, ready=self.ready, api=api)
        admin_port = 0
        if self.settings.server.admin_listen:
            admin_port = await admin.start(*split_hostport(self.settings.server.admin_listen))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._hup)
        for w in self.workers:
            self._spawn(w)
        p = self.workers[0].listens
        log.info(
            "supervisor: %d workers, grpc=%s http=%s admin=%s, per-worker grpc=%s http=%s",
            len(self.workers),
            p.grpc or "-",
            p.http or "-",
            admin_port or "-",
            ",".join(w.listens.grpc_own for w in self.workers if w.listens.grpc_own) or "-",
            ",".join(w.listens.http_own for w in self.workers if w.listens.http_own) or "-",
        )
        try:
            while not self._stop.is_set():
                self._reap()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=0.1)
        finally:
            self.stopping = True
            await self._shutdown()
            await admin.close()
            if self.admin_service is not None:
                await self.admin_service.close()
        log.info("supervisor stopped")
        return 0

    async def _admin_service(self) -> Service | None:
        """The supervisor's own Service for the admin API (None when it is off)."""
        if not self.settings.revocation.admin_api.enabled:
            return None
        import prometheus_client as prom  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)

        from authz.observability import AuditLog, Metrics  # noqa: PLC0415  (lazy: the admin API's Service only when it is on)
        from authz.service import Service  # noqa: PLC0415  (lazy: the admin API's Service only when it is on)

        service = Service(
            self.settings,
            metrics=Metrics(prom.CollectorRegistry()),  # private: /metrics is the workers'
            audit=AuditLog(),
            config_path=self.config_path,
        )
        await service.start()
        return service

    def _hup(self) -> None:
        self.forward(signal.SIGHUP)
        if self.admin_service is not None:
            task = asyncio.get_running_loop().create_task(self.admin_service.reload())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    # --------------------------------------------------------------------------- workers

    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        os.set_blocking(r, False)
        spec = {
            "index": w.index,
            "config": self.config_path,
            "log_level": self.log_level,
            "plain_logs": self.plain_logs,
            "grpc": w.listens.grpc,
            "http": w.listens.http,
            "grpc_own": w.listens.grpc_own,
            "http_own": w.listens.http_own,
            "ready_fd": wfd,
        }
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps(spec)
        env[MULTIPROC_ENV] = self.multiproc_dir
        w.proc = subprocess.Popen([sys.executable, "-c", _BOOT], env=env, pass_fds=(wfd,))
        os.close(wfd)
        w.ready_r, w.ready, w.started_at, w.restart_at = r, False, time.monotonic(), None
        w.pids.append(w.proc.pid)
        asyncio.get_running_loop().add_reader(r, self._on_ready_pipe, w)
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def _on_ready_pipe(self, w: _Worker) -> None:
        try:
            data = os.read(w.ready_r, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the worker is gone
            self._close_pipe(w)
            w.ready = False
            return
        w.ready = data[-1:] == b"1"

    def _close_pipe(self, w: _Worker) -> None:
        if w.ready_r >= 0:
            asyncio.get_running_loop().remove_reader(w.ready_r)
            os.close(w.ready_r)
            w.ready_r = -1

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                code, pid = w.proc.returncode, w.proc.pid
                w.proc = None
                w.ready = False
                self._close_pipe(w)
                self._forget(pid)
                if self.stopping:
                    continue
                lived = now - w.started_at
                w.failures = 1 if lived >= STABLE_AFTER_S else w.failures + 1
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (w.failures - 1))
                w.restart_at = now + delay
                log.error(
                    "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                    w.index,
                    pid,
                    code,
                    lived,
                    delay,
                )
            elif w.proc is None and w.restart_at is not None and now >= w.restart_at:
                self.restarts += 1
                self._spawn(w)

    def _forget(self, pid: int) -> None:
        """A dead worker's gauges describe nothing any more; its counters must stay."""
        from prometheus_client import multiprocess  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)

        multiprocess.mark_process_dead(pid, self.multiproc_dir)  # type: ignore[no-untyped-call]
        for path in glob.glob(os.path.join(self.multiproc_dir, f"gauge_*_{pid}.db")):
            with contextlib.suppress(OSError):
                os.remove(path)

    def forward(self, sig: int) -> None:
        log.info("forwarding signal %s to %d workers", signal.Signals(sig).name, len(self.alive))
        for proc in self.alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    @property
    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]

    async def _shutdown(self) -> None:
        self.forward(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + KILL_AFTER_GRACE_S
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.alive:
            log.error("worker pid %d did not stop in time; killing it", proc.pid)
            proc.kill()
        for w in self.workers:
            if w.proc is not None:
                w.proc.wait()
                self._forget(w.proc.pid)
            self._close_pipe(w)

    # ------------------------------------------------------------------------------ admin

    def ready(self) -> bool:
        return (
            not self.stopping
            and not self._stop.is_set()
            and all(w.proc is not None and w.ready for w in self.workers)
        )

    def metrics_body(self) -> tuple[bytes, str]:
        import prometheus_client as prom  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)
        from prometheus_client import multiprocess  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)

        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        registry.register(_SupervisorCollector(self))
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


class _SupervisorCollector:
    """The supervisor's own facts, computed at scrape time (no multiprocess files)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        yield GaugeMetricFamily(
            "authz_workers", "Worker processes alive.", value=len(self._sup.alive)
        )
        yield GaugeMetricFamily(
            "authz_workers_ready",
            "Worker processes reporting ready.",
            value=sum(1 for w in self._sup.workers if w.proc is not None and w.ready),
        )
        yield CounterMetricFamily(
            "authz_worker_restarts", "Workers restarted after exiting.", value=self._sup.restarts
        )
        yield from _process_tree_metrics([os.getpid(), *(p.pid for p in self._sup.alive)])


def _process_tree_metrics(pids: Sequence[int]) -> Iterator[Any]:
    """``process_*`` for the supervisor and its workers together, read from ``/proc`` at scrape
    time: prometheus-client's multiprocess mode cannot aggregate its own process collector. A
    worker that exits takes its CPU seconds with it (Prometheus reads the drop as a reset)."""
    from prometheus_client.core import (  # noqa: PLC0415  (lazy: importing the lifecycle loads no metrics code)
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    cpu = sum(cpu_seconds(pid) for pid in pids)
    rss = sum(rss_bytes(pid) for pid in pids)
    fds = max((open_fds(pid) for pid in pids), default=0)
    yield CounterMetricFamily(
        "process_cpu_seconds",
        "CPU seconds of the supervisor and its workers.",
        value=cpu,
    )
    yield GaugeMetricFamily(
        "process_resident_memory_bytes",
        "Resident memory of the supervisor and its workers.",
        value=rss,
    )
    yield GaugeMetricFamily(
        "process_open_fds",
        "Open file descriptors of the busiest of the supervisor and its workers (vs max_fds).",
        value=fds,
    )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield GaugeMetricFamily(
        "process_max_fds", "The per-process open file descriptor limit.", value=soft
    )
