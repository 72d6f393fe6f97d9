"""One truth for host:port: ``authz.policy.routes.split_host_port`` tells a host and its port
apart for the route table, config's instance URLs and the listen addresses
(``authz.server.ports.split_listen``, which the servers bind with). Config's listen validator
accepts exactly what splits into a host and a port number."""

from __future__ import annotations

import pytest

from authz import config as config_mod
from authz.policy.routes import split_host_port
from authz.server.ports import pin, plan_listens, split_listen

LISTENS = [
    ("ipv4", "127.0.0.1:9001", ("127.0.0.1", 9001)),
    ("ipv6", "[::1]:9000", ("[::1]", 9000)),
    ("ipv6-any", "[::]:0", ("[::]", 0)),
    ("name", "localhost:65535", ("localhost", 65535)),
]


@pytest.mark.parametrize(
    ("addr", "expected"), [c[1:] for c in LISTENS], ids=[c[0] for c in LISTENS]
)
def test_split_listen(addr: str, expected: tuple[str, int]) -> None:
    assert split_listen(addr) == expected
    # config accepts it, and its regex splits it the same way
    m = config_mod.LISTEN_RE.match(addr)
    assert m is not None
    assert (m.group(1), int(m.group(2))) == expected == (expected[0], int(split_host_port(addr)[1]))


BAD = [
    ("missing-port", "127.0.0.1"),
    ("empty-port", "127.0.0.1:"),
    ("ipv6-missing-port", "[::1]"),
    ("ipv6-unbracketed", "::1:9000"),
    ("bad-port", "127.0.0.1:http"),
    ("port-too-big", "127.0.0.1:65536"),
    ("junk-after-bracket", "[::1]x:9000"),
]


@pytest.mark.parametrize("addr", [c[1] for c in BAD], ids=[c[0] for c in BAD])
def test_config_refuses_a_listen_address_without_a_valid_port(addr: str) -> None:
    text = f'server: {{grpc_listen: "{addr}"}}\n'
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(text, env={})
    assert any(
        p.startswith("server.grpc_listen:") and "expected host:port" in p
        for p in err.value.problems
    ), err.value.problems


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.1:", "[::1]", "127.0.0.1:http"])
def test_split_listen_refuses_a_missing_or_bad_port(addr: str) -> None:
    with pytest.raises(ValueError, match="invalid literal for int"):
        split_listen(addr)


def test_per_worker_ports_keep_an_ipv6_host() -> None:
    (plan,) = plan_listens("[::1]:9001", "", 1, {})
    assert plan.grpc_own == "[::1]:9101"
    assert pin("[::1]:9001") == "[::1]:9001"  # a concrete port is kept as it is
