"""The gRPC floor: a grpc.aio ext_authz server that allows everything and does nothing else.

What any grpc.aio ext_authz server costs before it decides anything (on uvloop, like ours).
``python -m bench.floor_grpc PORT``. ``python -m bench.floor_grpc PORT VARIANT`` runs one of the
experiments of docs/performance.md ("CPU per check II") instead, still deciding nothing:

- ``generic``: grpc.aio with a generic handler, no request parsing, pre-serialised answer bytes;
- ``sync``: the synchronous ``grpc.server`` with a 4-thread pool (generated servicer);
- ``sync-generic``: both;
- ``throughput``: grpc.aio with ``grpc.optimization_target=throughput``;
- ``streams``: grpc.aio with ``grpc.max_concurrent_streams=1000`` and BDP probing off;
- ``nobdp``: grpc.aio with BDP probing off (``grpc.http2.bdp_probe=0``) alone.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from bench._serve import until_sigterm

OK = external_auth_pb2.CheckResponse()
OK.status.code = 0
OK.ok_response.SetInParent()
OK_BYTES = OK.SerializeToString()
METHOD = "Check"
SERVICE = "envoy.service.auth.v3.Authorization"

OPTIONS: dict[str, list[tuple[str, Any]]] = {
    "throughput": [("grpc.optimization_target", "throughput")],
    "streams": [("grpc.max_concurrent_streams", 1000), ("grpc.http2.bdp_probe", 0)],
    "nobdp": [("grpc.http2.bdp_probe", 0)],
}


class Floor(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return OK


class SyncFloor(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(self, request: Any, context: Any) -> Any:
        return OK


def _generic(behaviour: Any) -> grpc.GenericRpcHandler:
    handler = grpc.unary_unary_rpc_method_handler(behaviour)  # bytes in, bytes out
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})


async def _raw_check(request: bytes, context: Any) -> bytes:
    return OK_BYTES


def _sync_raw_check(request: bytes, context: Any) -> bytes:
    return OK_BYTES


async def main(port: int, variant: str = "") -> None:
    server = grpc.aio.server(options=OPTIONS.get(variant, []))
    if variant == "generic":
        server.add_generic_rpc_handlers((_generic(_raw_check),))
    else:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await until_sigterm(lambda: server.stop(1))


def main_sync(port: int, variant: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if variant == "sync-generic":
        server.add_generic_rpc_handlers((_generic(_sync_raw_check),))
    else:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(SyncFloor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    import uvloop

    variant = sys.argv[2] if len(sys.argv) > 2 else ""
    if variant.startswith("sync"):
        main_sync(int(sys.argv[1]), variant)
    else:
        uvloop.run(main(int(sys.argv[1]), variant))
