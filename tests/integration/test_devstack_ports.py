"""Ports for the local stack: free, distinct, and outside the kernel's ephemeral range (so an
outgoing connection cannot take one between the probe and the server's bind)."""

from __future__ import annotations

import socket

import pytest

from authz.dev import stack as devstack

pytestmark = pytest.mark.integration


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = devstack._ephemeral_low()
    ports = [devstack.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_free_port_falls_back_to_the_kernel_when_there_is_no_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devstack, "_ephemeral_low", lambda: 1024)
    assert 0 < devstack.free_port() < 65536
