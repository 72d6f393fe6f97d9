"""The gRPC ``envoy.service.auth.v3.Authorization`` service: ``Check`` and its wiring helpers.

The server runs ``check_wire``, three seams (OPA-Envoy's shape): ``request_to_attrs`` ->
``check`` -> ``decision_to_bytes`` (the answer's wire bytes from per-header-set templates; tests
compare them with ``decision_to_response``), registered as a generic handler without a response
serializer (measured: docs/performance.md, "CPU per check II"); ``Check`` is the same answer
parsed into a message. Neither raises: anything unexpected becomes the explicit fail-closed 503
``internal_error`` deny (Envoy would otherwise apply ``status_on_error``, or worse
``failure_mode_allow``). Cancellation (``asyncio.CancelledError``) is not an error and propagates.

App code uses ``AuthorizationServicer``, ``add_to_server``, ``SERVICE_NAME`` and
``enable_reflection`` from here and never imports generated ``*_pb2_grpc`` modules. Our messages
live in a private descriptor pool (docs/protos.md), so reflection must be given a pool that holds
them: ``enable_reflection`` builds one.

Imports only grpc, the generated code and ``authz.server.convert``/``authz.policy``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from authz.engine import new_decision_id
from authz.policy.decisions import internal_error
from authz.policy.model import Decision, RequestAttrs
from authz.server.convert import (
    CheckRequest,
    CheckResponse,
    decision_to_bytes,
    decision_to_response,
    request_id_of,
    request_to_attrs,
)

CheckFn = Callable[[RequestAttrs], Awaitable[Decision]]
ErrorHook = Callable[[BaseException], None]

SERVICE: ServiceDescriptor = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
SERVICE_NAME: str = SERVICE.full_name  # "envoy.service.auth.v3.Authorization"

# Last resort when even rendering the internal error fails: built once, 503 UNAVAILABLE.
_FALLBACK_BYTES: bytes = decision_to_response(internal_error("", "")).SerializeToString()


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's ext_authz gRPC service around an async ``check(attrs) -> Decision``."""

    def __init__(
        self,
        check: CheckFn,
        on_error: ErrorHook | None = None,
        *,
        new_id: Callable[[], str] = new_decision_id,
    ) -> None:
        self._check = check
        self._on_error = on_error
        self._new_id = new_id

    async def Check(self, request: CheckRequest, context: Any) -> CheckResponse:
        """The answer as a message: ``check_wire``'s bytes parsed (what a client receives). The
        server itself runs ``check_wire``; this is the typed entry point for Python callers."""
        return CheckResponse.FromString(await self.check_wire(request, context))

    async def check_wire(self, request: CheckRequest, context: Any) -> bytes:
        """``Check``, answered as the response's serialised bytes (what the server sends)."""
        try:
            return decision_to_bytes(await self._check(request_to_attrs(request)))
        except Exception as exc:  # fail closed: a bug or an outage must never allow, nor raise
            self._report(exc)
            try:
                return decision_to_bytes(internal_error(self._new_id(), request_id_of(request)))
            except Exception as again:
                self._report(again)
                return _FALLBACK_BYTES

    def _report(self, exc: BaseException) -> None:
        if self._on_error is not None:
            # A broken logger must not turn a deny into an error.
            with contextlib.suppress(Exception):
                self._on_error(exc)


def add_to_server(servicer: AuthorizationServicer, server: Any) -> None:
    """Register ``servicer`` on a ``grpc.aio.Server``: ``Check`` is served by ``check_wire``, a
    generic handler with the generated request parser and no response serializer (the handler
    returns the bytes)."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.check_wire, request_deserializer=CheckRequest.FromString
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _add_file(pool: descriptor_pool.DescriptorPool, fd: FileDescriptor) -> None:
    try:
        pool.FindFileByName(fd.name)
    except KeyError:
        for dep in fd.dependencies:
            _add_file(pool, dep)
        pool.AddSerializedFile(fd.serialized_pb)


def reflection_pool(*services: ServiceDescriptor) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding the files (with their dependencies) that define ``services``.

    Services may come from different pools (ours is private, health/reflection use the default
    one); file names must not clash, which holds for ours vs grpc's."""
    pool = descriptor_pool.DescriptorPool()
    for service in services:
        _add_file(pool, service.file)
    return pool


def enable_reflection(server: Any, *extra: ServiceDescriptor) -> tuple[str, ...]:
    """Enable gRPC server reflection for Authorization, the reflection service itself and
    ``extra`` (e.g. ``health_pb2.DESCRIPTOR.services_by_name["Health"]``). Returns the names."""
    refl = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    services = (SERVICE, refl, *extra)
    names = tuple(s.full_name for s in services)
    reflection.enable_server_reflection(names, server, pool=reflection_pool(*services))
    return names
