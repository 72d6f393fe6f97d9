"""Our protos (protos/, generated into authz/_proto) against upstream Envoy's (xds-protos).

* Every message, field and enum of ours must exist upstream under the same full name with the
  same field number, type, label, message/enum type and oneof; enums must have the same values;
  the service the same methods. Fields we omit are fine (on the wire they are unknown fields).
* The comparison itself is tested: perturbed copies of our descriptors must be reported.
* Bytes round-trip both ways between our classes and upstream's.
* The committed generated code equals a fresh generation.

Ours live in a private descriptor pool, so upstream's (default pool) load in the same process:
that coexistence is itself one of the things tested here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from envoy.config.core.v3 import address_pb2 as up_address_pb2
from envoy.config.core.v3 import base_pb2 as up_base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as up_attribute_context_pb2
from envoy.service.auth.v3 import external_auth_pb2 as up_external_auth_pb2
from envoy.type.v3 import http_status_pb2 as up_http_status_pb2
from google.protobuf import descriptor_pb2, json_format
from google.rpc import status_pb2 as up_status_pb2

from authz import _protogen
from authz._proto.envoy.config.core.v3 import address_pb2, base_pb2
from authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from authz._proto.envoy.type.v3 import http_status_pb2
from authz._proto.google.rpc import status_pb2

FileProto = descriptor_pb2.FileDescriptorProto
FieldProto = descriptor_pb2.FieldDescriptorProto

# (ours, upstream) per proto file
PAIRS: tuple[tuple[ModuleType, ModuleType], ...] = (
    (external_auth_pb2, up_external_auth_pb2),
    (attribute_context_pb2, up_attribute_context_pb2),
    (base_pb2, up_base_pb2),
    (address_pb2, up_address_pb2),
    (http_status_pb2, up_http_status_pb2),
    (status_pb2, up_status_pb2),
)


def file_proto(module: ModuleType) -> FileProto:
    fdp = FileProto()
    module.DESCRIPTOR.CopyToProto(fdp)
    return fdp


# ------------------------------------------------------------------------------ the comparison


def _walk(
    prefix: str,
    messages: list[descriptor_pb2.DescriptorProto],
    enums: list[descriptor_pb2.EnumDescriptorProto],
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto]]:
    for enum in enums:
        yield f"{prefix}.{enum.name}", enum
    for msg in messages:
        name = f"{prefix}.{msg.name}"
        yield name, msg
        yield from _walk(name, list(msg.nested_type), list(msg.enum_type))


def index(files: list[FileProto]) -> dict[str, object]:
    """Every message, enum and service by full name."""
    out: dict[str, object] = {}
    for f in files:
        out.update(_walk(f.package, list(f.message_type), list(f.enum_type)))
        for svc in f.service:
            out[f"{f.package}.{svc.name}"] = svc
    return out


def _field_sig(msg: descriptor_pb2.DescriptorProto, f: FieldProto) -> tuple[object, ...]:
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else ""
    return (f.number, f.type, f.label, f.type_name, oneof, f.proto3_optional)


def compare(ours: list[FileProto], upstream: list[FileProto]) -> list[str]:
    """Mismatches between our descriptors and upstream's ([] = wire-compatible subset)."""
    theirs = index(upstream)
    problems: list[str] = []
    for name, mine in index(ours).items():
        other = theirs.get(name)
        if other is None or type(other) is not type(mine):
            problems.append(f"{name}: not upstream (as {type(mine).__name__})")
            continue
        if isinstance(mine, descriptor_pb2.DescriptorProto):
            assert isinstance(other, descriptor_pb2.DescriptorProto)
            their_fields = {f.name: f for f in other.field}
            for f in mine.field:
                tf = their_fields.get(f.name)
                if tf is None:
                    problems.append(f"{name}.{f.name}: no such field upstream")
                elif (a := _field_sig(mine, f)) != (b := _field_sig(other, tf)):
                    problems.append(
                        f"{name}.{f.name}: (number, type, label, type_name, oneof, optional) "
                        f"{a} != upstream {b}"
                    )
            if mine.options.map_entry != other.options.map_entry:
                problems.append(f"{name}: map_entry differs")
        elif isinstance(mine, descriptor_pb2.EnumDescriptorProto):
            assert isinstance(other, descriptor_pb2.EnumDescriptorProto)
            a_vals = [(v.name, v.number) for v in mine.value]
            b_vals = [(v.name, v.number) for v in other.value]
            if a_vals != b_vals:
                problems.append(f"{name}: values {a_vals} != upstream {b_vals}")
        else:
            assert isinstance(mine, descriptor_pb2.ServiceDescriptorProto)
            assert isinstance(other, descriptor_pb2.ServiceDescriptorProto)

            def methods(s: descriptor_pb2.ServiceDescriptorProto) -> set[tuple[object, ...]]:
                return {
                    (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                    for m in s.method
                }

            if methods(mine) != methods(other):
                problems.append(f"{name}: methods {methods(mine)} != {methods(other)}")
    return problems


@pytest.fixture(scope="module")
def ours() -> list[FileProto]:
    return [file_proto(m) for m, _ in PAIRS]


@pytest.fixture(scope="module")
def upstream() -> list[FileProto]:
    return [file_proto(m) for _, m in PAIRS]


def test_ours_are_a_wire_compatible_subset_of_upstream(
    ours: list[FileProto], upstream: list[FileProto]
) -> None:
    assert compare(ours, upstream) == []


def test_files_have_upstream_names_and_packages(
    ours: list[FileProto], upstream: list[FileProto]
) -> None:
    assert [(f.name, f.package) for f in ours] == [(f.name, f.package) for f in upstream]


def test_the_fields_we_rely_on_exist(ours: list[FileProto]) -> None:
    idx = index(ours)
    needed = {
        "envoy.config.core.v3.HeaderValueOption": {"header", "append", "append_action"},
        "envoy.service.auth.v3.OkHttpResponse": {"headers", "headers_to_remove"},
        "envoy.service.auth.v3.DeniedHttpResponse": {"status", "headers", "body"},
        "envoy.service.auth.v3.CheckResponse": {"status", "ok_response", "denied_response"},
        "envoy.service.auth.v3.AttributeContext": {"source", "request", "context_extensions"},
        "envoy.service.auth.v3.AttributeContext.HttpRequest": {
            "id",
            "method",
            "headers",
            "header_map",
            "path",
            "host",
            "scheme",
        },
    }
    for name, fields in needed.items():
        msg = idx[name]
        assert isinstance(msg, descriptor_pb2.DescriptorProto)
        assert fields <= {f.name for f in msg.field}, name


# ------------------------------------------------------------- the comparison catches mistakes


def _msg(files: list[FileProto], full: str) -> descriptor_pb2.DescriptorProto:
    found = index(files)[full]
    assert isinstance(found, descriptor_pb2.DescriptorProto)
    return found


def _field(files: list[FileProto], full: str, name: str) -> FieldProto:
    return next(f for f in _msg(files, full).field if f.name == name)


_HVO = "envoy.config.core.v3.HeaderValueOption"
_HTTP = "envoy.service.auth.v3.AttributeContext.HttpRequest"


def _renumber(fs: list[FileProto]) -> None:
    _field(fs, _HVO, "append_action").number = 4


def _retype(fs: list[FileProto]) -> None:
    _field(fs, _HTTP, "size").type = FieldProto.TYPE_INT32


def _relabel(fs: list[FileProto]) -> None:
    _field(fs, "envoy.service.auth.v3.DeniedHttpResponse", "body").label = FieldProto.LABEL_REPEATED


def _retarget(fs: list[FileProto]) -> None:
    ok = "envoy.service.auth.v3.OkHttpResponse"
    _field(fs, ok, "headers").type_name = ".envoy.config.core.v3.HeaderValue"


def _enum_value(fs: list[FileProto]) -> None:
    enum = index(fs)["envoy.config.core.v3.HeaderValueOption.HeaderAppendAction"]
    assert isinstance(enum, descriptor_pb2.EnumDescriptorProto)
    next(v for v in enum.value if v.name == "OVERWRITE_IF_EXISTS_OR_ADD").number = 3


def _extra_field(fs: list[FileProto]) -> None:
    _msg(fs, _HTTP).field.add(name="tenant", number=99, type=FieldProto.TYPE_STRING, label=1)


def _out_of_oneof(fs: list[FileProto]) -> None:
    _field(fs, "envoy.service.auth.v3.CheckResponse", "ok_response").ClearField("oneof_index")


def _method(fs: list[FileProto]) -> None:
    fs[0].service[0].method[0].output_type = ".envoy.service.auth.v3.OkHttpResponse"


@pytest.mark.parametrize(
    "perturb",
    [
        _renumber,
        _retype,
        _relabel,
        _retarget,
        _enum_value,
        _extra_field,
        _out_of_oneof,
        _method,
    ],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_compare_reports_a_perturbed_descriptor(
    perturb: Callable[[list[FileProto]], None], ours: list[FileProto], upstream: list[FileProto]
) -> None:
    broken = copy.deepcopy(ours)
    perturb(broken)
    assert len(compare(broken, upstream)) == 1


# ----------------------------------------------------------------------------- bytes round-trip


def _full_upstream_request() -> up_external_auth_pb2.CheckRequest:
    req = up_external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.source.address.socket_address.address = "10.0.0.7"
    attrs.source.address.socket_address.port_value = 41234
    attrs.source.principal = "spiffe://client"
    attrs.source.labels["app"] = "web"
    attrs.destination.address.socket_address.address = "10.0.0.1"
    attrs.destination.address.socket_address.port_value = 8080
    attrs.request.time.seconds = 1_700_000_000
    http = attrs.request.http
    http.id = "req-1"
    http.method = "GET"
    http.headers["authorization"] = "Bearer x"
    http.header_map.headers.add(key="x-a", raw_value=b"1")
    http.path = "/v1/items?q=1"
    http.host = "api.example.com"
    http.scheme = "https"
    http.query = "q=1"
    http.fragment = ""
    http.size = 12
    http.protocol = "HTTP/2"
    http.body = "{}"
    http.raw_body = b"{}"
    attrs.context_extensions["api"] = "orders"
    attrs.metadata_context.filter_metadata["f"].update({"k": "v"})
    attrs.route_metadata_context.filter_metadata["r"].update({"k": "v"})
    attrs.tls_session.sni = "api.example.com"
    return req


def test_upstream_request_parses_into_ours_without_loss() -> None:
    up = _full_upstream_request()
    mine = external_auth_pb2.CheckRequest.FromString(up.SerializeToString())
    assert json_format.MessageToDict(mine) == json_format.MessageToDict(up)
    assert mine.SerializeToString(deterministic=True) == up.SerializeToString(deterministic=True)


def test_our_response_parses_into_upstream_without_loss() -> None:
    mine = external_auth_pb2.CheckResponse(
        status={"code": 16},
        denied_response={
            "status": {"code": 401},
            "headers": [
                {
                    "header": {"key": "www-authenticate", "value": "Bearer"},
                    "append": {"value": False},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            "body": "{}",
        },
    )
    mine.dynamic_metadata.update({"code": "missing_token"})
    up = up_external_auth_pb2.CheckResponse.FromString(mine.SerializeToString())
    assert json_format.MessageToDict(up) == json_format.MessageToDict(mine)
    hvo = up.denied_response.headers[0]
    assert hvo.HasField("append")
    assert hvo.append.value is False
    assert hvo.append_action == up_base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert up.denied_response.status.code == up_http_status_pb2.Unauthorized


def test_ours_live_in_a_private_pool() -> None:
    from google.protobuf import descriptor_pool

    from authz._proto import POOL

    assert external_auth_pb2.DESCRIPTOR.pool is POOL
    assert up_external_auth_pb2.DESCRIPTOR.pool is descriptor_pool.Default()
    assert external_auth_pb2.CheckRequest is not up_external_auth_pb2.CheckRequest


# ------------------------------------------------------------------------------ generated code


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    _protogen.generate(out)
    fresh, committed = _tree(out), _tree(_protogen.PROTO_OUT)
    assert sorted(fresh) == sorted(committed), "run `make protos` and commit authz/_proto"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], "run `make protos` and commit authz/_proto"


def test_generated_code_imports_nothing_top_level_of_ours() -> None:
    for name, text in _tree(_protogen.PROTO_OUT).items():
        for line in text.splitlines():
            assert not line.startswith(("from envoy", "import envoy", "from google.rpc")), name
        if name.endswith("_pb2.py"):
            assert "_descriptor_pool.Default()" not in text, name


def test_protogen_main_writes_the_package_where_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"
    assert _protogen.main(["--out", str(out)]) == 0
    assert (out / "envoy/service/auth/v3/external_auth_pb2_grpc.py").is_file()
    assert not (out / "envoy/type/v3/http_status_pb2_grpc.py").exists()  # no service, no file
    assert str(out / "__init__.py") in capsys.readouterr().out.splitlines()


def test_protogen_refuses_an_empty_source_tree(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"no \.proto files"):
        _protogen.generate(tmp_path / "out", tmp_path)


def test_protogen_refuses_protoc_output_it_does_not_understand() -> None:
    with pytest.raises(RuntimeError, match="default-pool"):
        _protogen._rewrite_pb2("DESCRIPTOR = something_else()\n")


def test_protogen_reports_a_protoc_failure(tmp_path: Path) -> None:
    (tmp_path / "bad.proto").write_text('syntax = "proto3"; message {')
    with pytest.raises(RuntimeError, match="protoc failed"):
        _protogen.generate(tmp_path / "out", tmp_path)
