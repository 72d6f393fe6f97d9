"""The servicer with real generated messages: whole responses, the never-raise path, and a real
grpc.aio server on 127.0.0.1:0 called through a real stub (plus reflection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import MappingProxyType

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from authz.policy.decisions import internal_error
from authz.policy.model import Decision, RequestAttrs
from authz.server.convert import decision_to_response
from authz.server.servicer import (
    SERVICE_NAME,
    AuthorizationServicer,
    add_to_server,
    enable_reflection,
)

AC = attribute_context_pb2.AttributeContext


def request(path: str = "/v1/orders", request_id: str = "req-1") -> external_auth_pb2.CheckRequest:
    http = AC.HttpRequest(id=request_id, method="GET", path=path, host="api", headers={"x-a": "1"})
    return external_auth_pb2.CheckRequest(attributes=AC(request=AC.Request(http=http)))


ALLOW = Decision(
    allowed=True,
    status=200,
    code="ok",
    reason="allowed",
    decision_id="d-allow",
    upstream_headers=(("x-user-id", "oid"),),
    remove_headers=("authorization",),
    metadata=MappingProxyType({"decision_id": "d-allow", "code": "ok"}),
)


class Recorder:
    def __init__(self, decision: Decision = ALLOW) -> None:
        self.decision = decision
        self.seen: list[RequestAttrs] = []

    async def __call__(self, attrs: RequestAttrs) -> Decision:
        self.seen.append(attrs)
        return self.decision


async def test_check_converts_request_and_decision() -> None:
    check = Recorder()
    got = await AuthorizationServicer(check).Check(request(), None)
    assert got == decision_to_response(ALLOW)
    assert check.seen == [
        RequestAttrs(
            method="GET", path="/v1/orders", host="api", headers={"x-a": "1"}, request_id="req-1"
        )
    ]


async def test_a_raising_check_becomes_the_503_internal_error_deny() -> None:
    boom = RuntimeError("bug")
    errors: list[BaseException] = []

    async def check(attrs: RequestAttrs) -> Decision:
        raise boom

    servicer = AuthorizationServicer(check, errors.append, new_id=lambda: "d-err")
    got = await servicer.Check(request(request_id="req-7"), None)

    assert got == decision_to_response(internal_error("d-err", "req-7"))
    assert got.status.code == 14
    assert got.denied_response.status.code == 503
    assert errors == [boom]


async def test_a_broken_request_becomes_the_internal_error_deny() -> None:
    servicer = AuthorizationServicer(Recorder(), new_id=lambda: "d-x")
    got = await servicer.Check(None, None)  # type: ignore[arg-type]
    assert got == decision_to_response(internal_error("d-x", ""))


async def test_a_non_decision_becomes_the_internal_error_deny() -> None:
    async def check(attrs: RequestAttrs) -> Decision:
        return "allow"  # type: ignore[return-value]

    got = await AuthorizationServicer(check, new_id=lambda: "d-y").Check(request(), None)
    assert got == decision_to_response(internal_error("d-y", "req-1"))


async def test_a_broken_logger_and_id_source_still_get_a_fail_closed_answer() -> None:
    def bad_log(exc: BaseException) -> None:
        raise ValueError("logger down")

    def bad_id() -> str:
        raise OSError("no entropy")

    async def check(attrs: RequestAttrs) -> Decision:
        raise RuntimeError("bug")

    got = await AuthorizationServicer(check, bad_log, new_id=bad_id).Check(request(), None)
    assert got == decision_to_response(internal_error("", ""))
    assert got.WhichOneof("http_response") == "denied_response"


async def test_cancellation_is_not_swallowed() -> None:
    async def check(attrs: RequestAttrs) -> Decision:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await AuthorizationServicer(check).Check(request(), None)


async def test_check_wire_answers_the_same_bytes_as_check_serialised() -> None:
    got = await AuthorizationServicer(Recorder()).check_wire(request(), None)
    assert external_auth_pb2.CheckResponse.FromString(got) == decision_to_response(ALLOW)


async def test_check_wire_fails_closed_like_check() -> None:
    errors: list[BaseException] = []

    async def check(attrs: RequestAttrs) -> Decision:
        raise RuntimeError("bug")

    servicer = AuthorizationServicer(check, errors.append, new_id=lambda: "d-err")
    got = await servicer.check_wire(request(request_id="req-7"), None)
    expected = decision_to_response(internal_error("d-err", "req-7"))
    assert external_auth_pb2.CheckResponse.FromString(got) == expected
    assert len(errors) == 1


async def test_check_wire_with_a_broken_id_source_sends_the_fallback() -> None:
    def bad_id() -> str:
        raise OSError("no entropy")

    async def check(attrs: RequestAttrs) -> Decision:
        raise RuntimeError("bug")

    got = await AuthorizationServicer(check, new_id=bad_id).check_wire(request(), None)
    expected = decision_to_response(internal_error("", ""))
    assert external_auth_pb2.CheckResponse.FromString(got) == expected


# ---------------------------------------------------------------------- real grpc.aio server


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    add_to_server(AuthorizationServicer(Recorder()), server)
    names = enable_reflection(server, health_pb2.DESCRIPTOR.services_by_name["Health"])
    assert names[0] == SERVICE_NAME
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(None)


async def test_check_over_a_real_grpc_server(channel: grpc.aio.Channel) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    got = await stub.Check(request(), timeout=5)
    assert got == decision_to_response(ALLOW)


async def test_reflection_serves_our_service_from_the_private_pool(
    channel: grpc.aio.Channel,
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    ]
    answers = [a async for a in stub.ServerReflectionInfo(iter(asks), timeout=5)]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert listed == {
        SERVICE_NAME,
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.health.v1.Health",
    }
    assert answers[1].file_descriptor_response.file_descriptor_proto  # found, not an error
    assert answers[2].file_descriptor_response.file_descriptor_proto


async def test_default_decision_ids_are_random_hex() -> None:
    async def check(attrs: RequestAttrs) -> Decision:
        raise RuntimeError("bug")

    servicer = AuthorizationServicer(check)
    a = (await servicer.Check(request(), None)).dynamic_metadata.fields["decision_id"]
    b = (await servicer.Check(request(), None)).dynamic_metadata.fields["decision_id"]
    assert len(a.string_value) == 32
    assert a.string_value != b.string_value
    int(a.string_value, 16)
