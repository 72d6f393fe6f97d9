"""Process model: one process (``workers: 1``) or a supervisor with N worker processes.

``workers: 0`` / ``--workers 0`` (the default) means one worker per available CPU (the affinity
mask capped by the cgroup CPU quota, see :func:`available_cpus`). One worker (``--workers 1``, or
a single available CPU) runs the service in this process, with no supervisor.

``--workers N`` (N > 1) makes this process a *supervisor* that starts N workers
(``sys.executable`` re-run, not ``fork``: gRPC's core does not survive a fork) and never decides
a request itself:

- Each worker runs its own ``Service``/``App``: its own key store, claims cache and event loop.
- Listening: every worker binds the configured gRPC/HTTP ports with SO_REUSEPORT (the kernel
  spreads *connections*), and also a port of its own, ``port + 100 * (i + 1)`` for worker ``i``
  (gRPC 9001 -> 9101, 9201, ...; HTTP 9002 -> 9102, 9202, ...: adjacent ports never collide).
  Envoy multiplexes all checks of one Envoy worker over one HTTP/2 connection, so a shared port pins
  every gRPC check to one process; listing the per-worker ports as endpoints
  (``envoy/sidecar-workers.yaml``) spreads them per check. Environment knobs (no config keys, so
  a config file stays valid for single-process runs):
  ``AUTHZ_WORKER_PORTS=off`` (no per-worker ports), ``AUTHZ_WORKER_GRPC_PORT_BASE`` /
  ``AUTHZ_WORKER_HTTP_PORT_BASE`` (worker ``i`` listens on ``base + i`` instead). Port 0 (tests)
  is resolved to a free port once, by the supervisor, so every worker shares the same one.
- The admin listener (``/metrics``, ``/healthz``, ``/readyz``) is the supervisor's. Metrics use
  prometheus-client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is a fresh temporary
  directory set in every worker's environment before it imports prometheus_client, and
  ``/metrics`` is ``MultiProcessCollector`` over it (counters and histograms sum across workers,
  gauges follow their ``multiprocess_mode``) plus ``authz_workers`` / ``authz_worker_restarts``
  and ``process_*`` for the supervisor and its workers together, read from ``/proc``.
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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authz.config import Settings

if TYPE_CHECKING:
    from authz.service import Service

log = logging.getLogger("authz.workers")

WORKER_ENV = "AUTHZ_WORKER"  # JSON spec of one worker (set by the supervisor only)
PORTS_ENV = "AUTHZ_WORKER_PORTS"
GRPC_BASE_ENV = "AUTHZ_WORKER_GRPC_PORT_BASE"
HTTP_BASE_ENV = "AUTHZ_WORKER_HTTP_PORT_BASE"
OWN_PORT_STRIDE = 100  # worker i also listens on shared port + 100 * (i + 1)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
KILL_AFTER_GRACE_S = 5.0


# ------------------------------------------------------------------------------------ CPU count


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"$QUOTA $PERIOD"``); None when unlimited
    (``"max ..."``) or unreadable. ``"150000 100000"`` -> 1.5."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` (-1 = unlimited) / ``cpu.cfs_period_us``."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup, or None when there is none (or none readable).

    cgroup v2: ``cpu.max`` of our own cgroup (from ``/proc/self/cgroup``) and of every ancestor up
    to ``root`` -- the smallest wins; cgroup v1: ``cpu/cpu.cfs_quota_us``."""
    limits: list[float] = []
    own = _read(Path("/proc/self/cgroup")) or ""
    rel = ""
    for line in own.splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
    here = root / rel if rel else root
    while True:
        text = _read(here / "cpu.max")
        if text is not None and (limit := parse_cpu_max(text)) is not None:
            limits.append(limit)
        if here == root or root not in here.parents:
            break
        here = here.parent
    quota = _read(root / "cpu" / "cpu.cfs_quota_us")
    period = _read(root / "cpu" / "cpu.cfs_period_us")
    if quota is not None and period is not None and (v1 := parse_cfs(quota, period)) is not None:
        limits.append(v1)
    return min(limits) if limits else None


def available_cpus(
    *,
    affinity: Callable[[], int] | None = None,
    limit: Callable[[], float | None] = cgroup_cpu_limit,
) -> int:
    """CPUs this process may really use: the affinity mask, capped by the cgroup quota (rounded
    up: a 1.5-CPU quota still benefits from a second process), at least 1."""
    if affinity is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
    else:
        cpus = affinity()
    quota = limit()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def resolve_workers(configured: int, cli: int | None) -> int:
    """``--workers`` wins over ``server.workers``; 0 means one per available CPU."""
    n = configured if cli is None else cli
    if n < 0:
        raise ValueError("--workers must be >= 0")
    return available_cpus() if n == 0 else n


# ------------------------------------------------------------------------------------- listens


def _listens(settings: Settings, transport: str) -> tuple[str, str]:
    grpc_listen, http_listen = settings.server.grpc_listen, settings.server.http_listen
    if transport in ("http", "both") and not http_listen:
        http_listen = "127.0.0.1:9002"
    if transport == "grpc":
        http_listen = ""
    elif transport == "http":
        grpc_listen = ""
    return grpc_listen, http_listen


def _hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]") or "0.0.0.0", 0))  # noqa: S104 - mirrors the configured host
        port: int = s.getsockname()[1]
        return port


def _pin(addr: str) -> str:
    """``host:0`` -> ``host:<a free port>``, so N workers share one concrete port."""
    if not addr:
        return addr
    host, port = _hostport(addr)
    return addr if port else f"{host}:{_free_port(host)}"


@dataclass(frozen=True, slots=True)
class WorkerListens:
    """What worker ``index`` binds: the shared ports and (optionally) its own."""

    grpc: str
    http: str
    grpc_own: str = ""
    http_own: str = ""


def plan_listens(
    grpc_listen: str, http_listen: str, n: int, env: dict[str, str] | os._Environ[str]
) -> list[WorkerListens]:
    """Per-worker listen addresses; ValueError when they collide with each other."""
    own = env.get(PORTS_ENV, "auto").strip().lower()
    if own not in ("auto", "off"):
        raise ValueError(f"{PORTS_ENV} must be 'auto' or 'off', not {own!r}")
    plans: list[WorkerListens] = []
    used: dict[str, str] = {}

    def claim(addr: str, what: str) -> str:
        if addr:
            port = _hostport(addr)[1]
            if str(port) in used:
                raise ValueError(
                    f"per-worker port {port} ({what}) collides with {used[str(port)]}: set "
                    f"{GRPC_BASE_ENV}/{HTTP_BASE_ENV} to move the per-worker ports, or "
                    f"{PORTS_ENV}=off"
                )
            used[str(port)] = what
        return addr

    claim(grpc_listen, "the shared gRPC port")
    claim(http_listen, "the shared HTTP port")

    def own_addr(shared: str, base_env: str, i: int, what: str) -> str:
        if not shared or own == "off":
            return ""
        host, port = _hostport(shared)
        base = env.get(base_env, "")
        p = int(base) + i if base else port + OWN_PORT_STRIDE * (i + 1)
        if not 0 < p < 65536:
            raise ValueError(f"per-worker port {p} out of range")
        return claim(f"{host}:{p}", f"worker {i} {what}")

    for i in range(n):
        plans.append(
            WorkerListens(
                grpc=grpc_listen,
                http=http_listen,
                grpc_own=own_addr(grpc_listen, GRPC_BASE_ENV, i, "gRPC"),
                http_own=own_addr(http_listen, HTTP_BASE_ENV, i, "HTTP"),
            )
        )
    return plans


def envoy_endpoints(ports: Sequence[int], host: str = "127.0.0.1") -> str:
    """The ``lb_endpoints`` value of ``envoy/sidecar-workers.yaml`` (${AUTHZ_ENDPOINTS}) for
    these per-worker ports: one line of JSON, which is also YAML flow syntax."""
    return json.dumps(
        [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}}
            for p in ports
        ],
        separators=(",", ":"),
    )


# ---------------------------------------------------------------------------- entry point


def serve(settings: Settings, args: argparse.Namespace) -> int:
    try:
        n = resolve_workers(settings.server.workers, getattr(args, "workers", None))
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    grpc_listen, http_listen = _listens(settings, args.transport)
    if n <= 1:
        return _serve_single(settings, args, grpc_listen, http_listen)
    try:
        plans = plan_listens(_pin(grpc_listen), _pin(http_listen), n, os.environ)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    return Supervisor(settings, args, plans).run()


def _serve_single(
    settings: Settings, args: argparse.Namespace, grpc_listen: str, http_listen: str
) -> int:
    import prometheus_client as prom  # noqa: PLC0415

    from authz.cli import run_async  # noqa: PLC0415
    from authz.observability import AuditLog, Metrics  # noqa: PLC0415
    from authz.server.app import App  # noqa: PLC0415
    from authz.service import Service  # noqa: PLC0415

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


# ------------------------------------------------------------------------------------ worker


def worker_main() -> int:
    """A worker process: ``python -c 'from authz.server.workers import worker_main; ...'`` with
    ``AUTHZ_WORKER`` (JSON) and ``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor."""
    spec: dict[str, Any] = json.loads(os.environ[WORKER_ENV])
    from authz import config as config_mod  # noqa: PLC0415
    from authz.cli import run_async  # noqa: PLC0415
    from authz.observability import configure_logging  # noqa: PLC0415

    configure_logging(
        spec["log_level"], json_format=not spec["plain_logs"], worker=int(spec["index"])
    )
    try:
        settings = config_mod.load(spec["config"])
    except config_mod.ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    return run_async(lambda: _worker(settings, spec))


async def _worker(settings: Settings, spec: dict[str, Any]) -> int:
    import prometheus_client as prom  # noqa: PLC0415  (after PROMETHEUS_MULTIPROC_DIR is set)

    from authz.observability import AuditLog, Metrics  # noqa: PLC0415
    from authz.server.app import App  # noqa: PLC0415
    from authz.service import Service  # noqa: PLC0415

    registry = prom.CollectorRegistry()  # values live in the multiprocess files
    metrics = Metrics(registry)
    audit = AuditLog(
        log_allows=settings.audit.log_allows, allow_sample_rate=settings.audit.allow_sample_rate
    )
    service = Service(settings, metrics=metrics, audit=audit, config_path=spec["config"])
    app = App(
        service,
        metrics_body=lambda: (b"", "text/plain"),
        grpc_listen=spec["grpc"],
        http_listen=spec["http"],
        admin_listen="",
        reuse_port=True,
        grpc_extra_listens=[spec["grpc_own"]] if spec["grpc_own"] else [],
        http_extra_listens=[spec["http_own"]] if spec["http_own"] else [],
    )
    ready_fd: int = spec["ready_fd"]
    parent = os.getppid()

    async def report() -> None:
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

    try:
        await app.start()
    except Exception:
        log.exception("worker %s failed to start", spec["index"])
        await app.stop()
        return 1
    app.install_signal_handlers()
    reporter = asyncio.create_task(report())
    await app.wait()
    await app.stop()
    reporter.cancel()
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"0")
    return 0


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


_BOOT = "import sys; from authz.server.workers import worker_main; sys.exit(worker_main())"


class Supervisor:
    """Starts, watches, restarts and signals the workers; serves the admin endpoint."""

    def __init__(
        self, settings: Settings, args: argparse.Namespace, plans: Sequence[WorkerListens]
    ) -> None:
        self.settings = settings
        self.args = args
        self.workers = [_Worker(i, p) for i, p in enumerate(plans)]
        self.grace_s = settings.server.shutdown_grace_s
        self.restarts = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self.multiproc_dir = ""
        self.admin_service: Service | None = None  # with revocation.admin_api only
        self._reloads: set[asyncio.Task[bool]] = set()

    # ------------------------------------------------------------------------------- run

    def run(self) -> int:
        from authz.cli import run_async  # noqa: PLC0415

        self.multiproc_dir = tempfile.mkdtemp(prefix="authz-metrics-")
        try:
            return run_async(self._main)
        finally:
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    async def _main(self) -> int:
        from authz.server.admin_api import RevocationApi  # noqa: PLC0415
        from authz.server.app import AdminServer, split_hostport  # noqa: PLC0415

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
        import prometheus_client as prom  # noqa: PLC0415

        from authz.observability import AuditLog, Metrics  # noqa: PLC0415
        from authz.service import Service  # noqa: PLC0415

        service = Service(
            self.settings,
            metrics=Metrics(prom.CollectorRegistry()),  # private: /metrics is the workers'
            audit=AuditLog(),
            config_path=self.args.config,
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
            "config": self.args.config,
            "log_level": self.args.log_level,
            "plain_logs": bool(self.args.plain_logs),
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
        from prometheus_client import multiprocess  # noqa: PLC0415

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
        import prometheus_client as prom  # noqa: PLC0415
        from prometheus_client import multiprocess  # noqa: PLC0415

        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        registry.register(_SupervisorCollector(self))
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


class _SupervisorCollector:
    """The supervisor's own facts, computed at scrape time (no multiprocess files)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        # after "pid (comm)": state is fields[0]; utime, stime are the 14th, 15th of the line
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_bytes(pid: int) -> int:
    """Resident memory of one process; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _process_tree_metrics(pids: Sequence[int]) -> Iterator[Any]:
    """``process_*`` for the supervisor and its workers together, read from ``/proc`` at scrape
    time: prometheus-client's multiprocess mode cannot aggregate its own process collector. A
    worker that exits takes its CPU seconds with it (Prometheus reads the drop as a reset)."""
    from prometheus_client.core import (  # noqa: PLC0415
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
