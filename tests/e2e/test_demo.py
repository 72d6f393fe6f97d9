"""`make demo ARGS=--once`: the scripted tour through real Envoy passes every step."""

from __future__ import annotations

import argparse

import pytest

from authz.dev import demo

pytestmark = pytest.mark.e2e


def test_demo_tour_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(argparse.Namespace(once=True)) == 0
    out = capsys.readouterr().out
    assert out.count("[PASS]") == len(demo.STEPS)
    assert "[FAIL]" not in out
    assert "forged x-user-id on an anonymous route -> dropped" in out
