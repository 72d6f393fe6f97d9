"""The gRPC floor: a grpc.aio ext_authz server that allows everything and does nothing else.

What any grpc.aio ext_authz server costs before it decides anything (on uvloop, like ours).
``python -m bench.floor_grpc PORT``.
"""

from __future__ import annotations

import sys

import grpc

from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from bench._serve import until_sigterm

OK = external_auth_pb2.CheckResponse()
OK.status.code = 0
OK.ok_response.SetInParent()


class Floor(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return OK


async def main(port: int) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await until_sigterm(lambda: server.stop(1))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1])))
