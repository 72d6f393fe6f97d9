"""Where the servers listen: the listen addresses a transport choice leaves, whether they are
free, and the per-worker port plan.

Worker ``i`` binds the shared gRPC/HTTP ports (SO_REUSEPORT) and also a port of its own,
``port + 100 * (i + 1)`` (gRPC 9001 -> 9101, 9201, ...; HTTP 9002 -> 9102, 9202, ...), or
``base + i`` with ``AUTHZ_WORKER_GRPC_PORT_BASE`` / ``AUTHZ_WORKER_HTTP_PORT_BASE``;
``AUTHZ_WORKER_PORTS=off`` turns the own ports off. Port 0 is pinned to one free port first, so
every worker shares it. Why the own ports exist: ``authz.server.workers``.

Must not import: the servers, the service, prometheus_client (plain values in, plain values out).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from authz.config import Settings
from authz.policy.routes import split_host_port

PORTS_ENV = "AUTHZ_WORKER_PORTS"
GRPC_BASE_ENV = "AUTHZ_WORKER_GRPC_PORT_BASE"
HTTP_BASE_ENV = "AUTHZ_WORKER_HTTP_PORT_BASE"
OWN_PORT_STRIDE = 100  # worker i also listens on shared port + 100 * (i + 1)


def listens(settings: Settings, transport: str) -> tuple[str, str]:
    """The gRPC and HTTP listen addresses for ``--transport`` (``""``: that transport is off)."""
    grpc_listen, http_listen = settings.server.grpc_listen, settings.server.http_listen
    if transport in ("http", "both") and not http_listen:
        http_listen = "127.0.0.1:9002"
    if transport == "grpc":
        http_listen = ""
    elif transport == "http":
        grpc_listen = ""
    return grpc_listen, http_listen


def unavailable(addresses: dict[str, str]) -> str:
    """Why a configured address cannot be listened on (a port in use, an address not ours), or
    "". Checked before any server starts, so the answer is one clear line (gRPC's own bind
    failure is a C-core line on stderr and a vague RuntimeError). Port 0 is always free."""
    for key, addr in addresses.items():
        if not addr:
            continue
        host, port = split_listen(addr)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(
                host.strip("[]") or None,
                port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            family, kind, proto, _, sockaddr = infos[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as e:
            reason = e.strerror or str(e)
            return f"cannot listen on {addr} ({key}): {reason}"
    return ""


def split_listen(addr: str) -> tuple[str, int]:
    """A listen address (validated by config: ``host:port``) as ``(host, port)``, the host as
    written (``[::1]:9000`` -> ``("[::1]", 9000)``). The split is ``split_host_port``'s, the one
    place a host and its port are told apart; ValueError when there is no port or it is not a
    number."""
    host, port = split_host_port(addr)
    return host, int(port)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]") or "0.0.0.0", 0))  # noqa: S104 - mirrors the configured host
        port: int = s.getsockname()[1]
        return port


def pin(addr: str) -> str:
    """``host:0`` -> ``host:<a free port>``, so N workers share one concrete port."""
    if not addr:
        return addr
    host, port = split_listen(addr)
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
            port = split_listen(addr)[1]
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
        host, port = split_listen(shared)
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
